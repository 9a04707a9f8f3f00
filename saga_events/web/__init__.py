"""The web surface of the gateway."""
