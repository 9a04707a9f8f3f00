"""The operator commands' calls to the HTTP API (register, deregister, drain, undrain).

One job: one request to the gateway with the standard library, and the one-line
errors for a gateway that is unreachable, refuses, or answers something else.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from ._cli_base import click, main

__all__ = [
    "_api_call",
    "_api_failed",
    "_call_api",
    "_not_the_answer",
    "api_options",
    "instance_command",
    "json_option",
    "saga_url_option",
    "token_option",
]

saga_url_option = click.option(
    "--saga-url", envvar="SAGA_SERVICE_URL", default="http://localhost:8030", show_default=True,
    help="Base URL of the HTTP API (env SAGA_SERVICE_URL).",
)  # fmt: skip
token_option = click.option(
    "--token", envvar="SAGA_API_TOKEN", default=None,
    help="Bearer token for writes, if the API requires one (env SAGA_API_TOKEN).",
)  # fmt: skip
json_option = click.option("--json", "as_json", is_flag=True, help="Print the API's JSON answer.")


F = TypeVar("F", bound=Callable[..., Any])


def api_options(f: F) -> F:
    """``--saga-url``, ``--token`` and ``--json``: the options of every command that calls
    the HTTP API (put it last, under the command's own options)."""
    return saga_url_option(token_option(json_option(f)))


def instance_command(name: str) -> Callable[[Callable[..., None]], click.Command]:
    """``saga-events <name> NAME [SERVICE_ID]``: a command on a service's instances
    (deregister, drain, undrain); its options follow, then :func:`api_options`."""

    def command(f: Callable[..., None]) -> click.Command:
        f = click.argument("name")(click.argument("service_id", required=False)(f))
        return main.command(name=name)(f)

    return command


def _api_call(
    what: str, method: str, base: str, path: str, token: str | None, as_json: bool, body: Any = None
) -> Any:
    """:func:`_call_api`; on an answer other than 200, :func:`_api_failed`. The payload."""
    status, payload = _call_api(method, base, path, token, body)
    if status != 200:
        _api_failed(what, status, payload, as_json)
    return payload


def _call_api(
    method: str, base: str, path: str, token: str | None, body: Any = None
) -> tuple[int, Any]:
    """One request to the HTTP API with the standard library; (status, decoded JSON)."""
    import urllib.error
    import urllib.request

    url = base.rstrip("/") + path
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, raw = int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = {"error": "http_error", "detail": raw.decode(errors="replace")[:500]}
        return int(exc.code), payload
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise click.ClickException(
            f"cannot reach the HTTP API at {base}: {reason}. Is `saga-events up` running? "
            "(set --saga-url or SAGA_SERVICE_URL)"
        ) from None
    try:
        return status, json.loads(raw or b"null")
    except ValueError:
        raise click.ClickException(
            f"{url} answered {status} with a body that is not JSON: is {base} the "
            "saga-events HTTP API? (set --saga-url or SAGA_SERVICE_URL)"
        ) from None


def _api_failed(what: str, status: int, payload: Any, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(payload))
        raise SystemExit(1)
    detail = payload.get("detail", payload) if isinstance(payload, dict) else payload
    raise click.ClickException(f"{what} failed with HTTP {status}: {detail}")


def _not_the_answer(what: str, base: str, payload: Any) -> NoReturn:
    shown = json.dumps(payload)
    shown = shown if len(shown) <= 200 else shown[:200] + "..."
    raise click.ClickException(
        f"{what} answered 200 with JSON that is not the saga-events answer ({shown}): "
        f"is {base} the saga-events HTTP API? (set --saga-url or SAGA_SERVICE_URL)"
    )
