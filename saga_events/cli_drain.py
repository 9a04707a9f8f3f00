"""``saga-events drain`` and ``undrain``: an operator's drain through the HTTP API.

One job: translate the two commands into ``POST /api/v1/services/{name}/drain``
and ``/undrain`` (see docs/API.md) and print the answer. Importing this module
registers the commands on :data:`saga_events.cli.main`.
"""

from __future__ import annotations

import getpass
import json
import urllib.parse
from typing import Any

import click

from ._cli_http import _api_call, _not_the_answer, api_options, instance_command


def _path(name: str, action: str, query: dict[str, str]) -> str:
    path = f"/api/v1/services/{urllib.parse.quote(name, safe='')}/{action}"
    return path + ("?" + urllib.parse.urlencode(query) if query else "")


def _report(action: str, name: str, payload: Any, saga_url: str, as_json: bool) -> None:
    if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list):
        _not_the_answer(action, saga_url, payload)
    if as_json:
        click.echo(json.dumps(payload))
        return
    ids = [str(i.get("service_id")) for i in payload["instances"] if isinstance(i, dict)]
    noun = "instance" if len(ids) == 1 else "instances"
    click.echo(f"{action}ed {name}: {len(ids)} {noun} ({', '.join(ids)})")


@instance_command("drain")
@click.option(
    "--for",
    "duration",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds until the drain ends by itself (default: until undrain).",
)
@click.option("--reason", default="", help="Why (shown in ls, the API and the dashboard).")
@click.option("--by", default=None, help="Who (default: the local user name).")
@api_options
def drain_command(
    name: str, service_id: str | None, duration: float | None, reason: str, by: str | None,
    saga_url: str, token: str | None, as_json: bool,
) -> None:  # fmt: skip
    """Take service NAME (or only instance SERVICE_ID) out of rotation.

    The instances' own heartbeats do not undo it; `undrain` or --for ends it.
    """
    query = {"service_id": service_id} if service_id else {}
    if duration is not None:
        query["duration"] = repr(duration)
    body = {"by": by or getpass.getuser(), "reason": reason}
    payload = _api_call(
        "drain", "POST", saga_url, _path(name, "drain", query), token, as_json, body
    )
    _report("drain", name, payload, saga_url, as_json)


@instance_command("undrain")
@api_options
def undrain_command(
    name: str, service_id: str | None, saga_url: str, token: str | None, as_json: bool
) -> None:
    """End an operator's drain of service NAME (or only instance SERVICE_ID)."""
    query = {"service_id": service_id} if service_id else {}
    payload = _api_call("undrain", "POST", saga_url, _path(name, "undrain", query), token, as_json)
    _report("undrain", name, payload, saga_url, as_json)
