"""``python -m saga_events``: the ``saga-events`` command (see :mod:`saga_events.cli`)."""

from .cli import main

main()
