"""The ``saga-events`` command's daily subcommands (needs the ``server`` extra).

One job: translate the command line into the parts: ``up`` (a private
redis-server, a registrar and the HTTP API with one mirror), ``registrar``,
``ls``, ``watch``, ``register``/``deregister`` (through the HTTP API) and
``bench``. Setup, acl and doctor live in :mod:`saga_events.cli_admin`; the
group and shared options in :mod:`saga_events._cli_base`. Contract: a part
that fails to start ends the command with one line naming the cause.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import anyio

from . import __version__, _loop
from ._cli_base import (
    click,
    namespace_option,
    redis_option,
    verbose_option,
)
from ._cli_base import (
    main as main,
)
from ._cli_base import (
    setup_logging as _setup_logging,
)
from ._cli_http import _api_call, _not_the_answer, api_options, instance_command
from ._text import escape_text, mask_url
from .embedded import RedisServer, port_is_free
from .errors import NotificationConfigError, SagaError
from .notify import PROTO_MAX_BULK_LEN

if TYPE_CHECKING:
    from .model import Instance

DEFAULT_REDIS_PORT = 6399
log = logging.getLogger("saga_events.cli")


async def _until_signal() -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.warning("received %s, stopping", signal.Signals(signum).name)
            return


async def _serve_registrar(
    url: str,
    namespace: str,
    manage_config: bool,
    on_ready: Any,
    http: tuple[str, int] | None = None,
    api_token: str | None = None,
) -> None:
    from .mirror import Mirror
    from .registrar import Registrar

    # With HTTP, one mirror serves the gateway and is the registrar's last view
    # (restored after an empty Redis restart); without, the registrar runs its own.
    mirror = Mirror(url, namespace=namespace) if http is not None else None

    def view() -> Iterable[Instance]:
        return mirror.snapshot().values() if mirror is not None else ()

    registrar = Registrar(
        url,
        namespace=namespace,
        manage_config=manage_config,
        view=view if mirror is not None else None,
        lookup=mirror.view.get if mirror is not None else None,
    )
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(registrar.run)
            if http is None or mirror is None:
                on_ready(registrar, None)
                await _until_signal()
            else:
                # Imported only here: the web stack costs ~1 s of start-up.
                from .web import run_gateway

                serve = functools.partial(
                    run_gateway, registrar, url, http[0], http[1], api_token, mirror=mirror
                )
                async with mirror, anyio.create_task_group() as web:
                    address = await web.start(serve)
                    on_ready(registrar, address)
                    await _until_signal()
                    web.cancel_scope.cancel()
            tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # A part that fails to start (a refused CONFIG, a taken HTTP port)
        # arrives wrapped by the task group: surface it for a one-line message.
        first = _first_saga_error(group)
        if first is None:
            raise
        raise first from None
    finally:
        await registrar.aclose()


def _first_saga_error(group: BaseExceptionGroup[Any]) -> SagaError | None:
    for exc in group.exceptions:
        if isinstance(exc, SagaError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_saga_error(exc)
            if found is not None:
                return found
    return None


def _echo_ready(url: str, namespace: str, started_redis: bool) -> Any:
    def ready(registrar: Any, http: tuple[str, int] | None = None) -> None:
        click.echo(f"saga-events {__version__} is up")
        where = "private redis-server" if started_redis else "existing Redis"
        click.echo(f"  Redis:     {mask_url(url)}  ({where})")
        click.echo(f"  namespace: {namespace}")
        click.echo(f"  registrar: {registrar.rid}")
        if registrar.notifications_ok is False:
            click.echo(f"  WARNING:   {registrar.notifications_reason}")
        if http is not None:
            host = f"[{http[0]}]" if ":" in http[0] else http[0]
            click.echo(f"  HTTP API:  http://{host}:{http[1]}  (OpenAPI: /schema/openapi.json)")
        if mask_url(url) == url:
            click.echo(f"Use it:      export SAGA_REDIS_URL={url}")
        else:
            # The registrar's credentials are not for clients: each gets its own user.
            click.echo(
                "Use it:      give agents and mirrors their own Redis users "
                "(`saga-events acl`, docs/SECURITY.md)"
            )
        if http is not None:
            click.echo(f"             export SAGA_SERVICE_URL=http://{host}:{http[1]}")
        click.echo("Press Ctrl-C to stop.")

    return ready


def _parse_http(value: str | None) -> tuple[str, int] | None:
    """``HOST:PORT`` (or ``:PORT``, ``[::1]:PORT``) of the HTTP gateway; None for off."""
    if value is None or value.lower() in ("", "off", "no", "none"):
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:8030)")
    return (host.strip("[]") or "127.0.0.1", int(port))


api_token_option = click.option(
    "--api-token", envvar="SAGA_API_TOKEN", default=None,
    help="Bearer token the HTTP API requires for writes (env SAGA_API_TOKEN).",
)  # fmt: skip


@main.command()
@click.option("--redis", "redis_url", default=None, help="Use this Redis instead of a private one.")
@click.option(
    "--redis-port", default=DEFAULT_REDIS_PORT, show_default=True,
    help="Port of the private redis-server (0: any free port).",
)  # fmt: skip
@namespace_option
@click.option(
    "--http", "http", default="127.0.0.1:8030", show_default=True, envvar="SAGA_HTTP",
    help="Address of the HTTP API (the seed's REST API); 'off' to serve none (env SAGA_HTTP).",
)  # fmt: skip
@click.option("--no-http", is_flag=True, help="Serve no HTTP API.")
@api_token_option
@verbose_option
def up(
    redis_url: str | None,
    redis_port: int,
    namespace: str,
    http: str,
    no_http: bool,
    api_token: str | None,
    verbose: int,
) -> None:
    """Start a private redis-server, a registrar and the HTTP API, in one command."""
    _setup_logging(verbose + 1)
    address = None if no_http else _parse_http(http)
    server: RedisServer | None = None
    try:
        if redis_url is None:
            port = redis_port or None
            if port is not None and not port_is_free(port):
                click.echo(f"port {port} is busy; using a free port instead", err=True)
                port = None
            server = RedisServer(port).start()
            redis_url = server.url
            # It owns this Redis: the administrator's bootstrap is its job too.
            from .cli_admin import setup_redis

            anyio.run(setup_redis, redis_url, PROTO_MAX_BULK_LEN)
        ready = _echo_ready(redis_url, namespace, server is not None)
        _loop.run(_serve_registrar, redis_url, namespace, True, ready, address, api_token)
    except NotificationConfigError as exc:
        raise click.ClickException(str(exc)) from None
    except SagaError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            server.close()
            click.echo("stopped redis-server")


@main.command()
@redis_option
@namespace_option
@click.option(
    "--no-manage-config", is_flag=True,
    help="Never CONFIG: only check the notification flags (an administrator sets them "
    "with `saga-events setup`). A user without CONFIG does this by itself.",
)  # fmt: skip
@click.option(
    "--http", "http", default=None, envvar="SAGA_HTTP",
    help="Also serve the HTTP API on HOST:PORT, e.g. 0.0.0.0:8030 (env SAGA_HTTP).",
)  # fmt: skip
@api_token_option
@verbose_option
def registrar(
    redis_url: str | None,
    namespace: str,
    no_manage_config: bool,
    http: str | None,
    api_token: str | None,
    verbose: int,
) -> None:
    """Run a registrar against an existing Redis (production)."""
    _setup_logging(verbose + 1)
    if not redis_url:
        raise click.UsageError("give --redis URL or set SAGA_REDIS_URL")
    address = _parse_http(http)
    try:
        _loop.run(
            _serve_registrar, redis_url, namespace, not no_manage_config,
            _echo_ready(redis_url, namespace, False), address, api_token,
        )  # fmt: skip
    except (NotificationConfigError, SagaError) as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass


def _instance_row(inst: Any) -> dict[str, Any]:
    from .model import iso_utc

    return {
        "service_name": inst.service_name,
        "service_id": inst.service_id,
        "service_url": inst.service_url,
        "capabilities": list(inst.capabilities),
        "draining": inst.draining,
        "registered_at": iso_utc(inst.registered_at_ms),
        "drained_by": inst.override.by if inst.override is not None else None,
        "drain_reason": inst.override.reason if inst.override is not None else None,
    }


@main.command(name="ls")
@redis_option
@namespace_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def ls_command(redis_url: str | None, namespace: str, as_json: bool) -> None:
    """List services and their live instances."""
    if not redis_url:
        raise click.UsageError("give --redis URL or set SAGA_REDIS_URL")

    async def run() -> dict[str, list[Any]]:
        from .mirror import Mirror

        async with Mirror(redis_url, namespace=namespace, sync_timeout=10) as mirror:
            return mirror.services()

    services = anyio.run(run)
    if as_json:
        click.echo(json.dumps({n: [_instance_row(i) for i in v] for n, v in services.items()}))
        return
    if not services:
        click.echo("no live instances")
        return
    rows = [_instance_row(i) for insts in services.values() for i in insts]
    headers = ["SERVICE", "ID", "URL", "CAPABILITIES", "STATE", "SINCE"]
    table = [
        [escape_text(r["service_name"]), escape_text(r["service_id"]),
         escape_text(r["service_url"]), escape_text(",".join(r["capabilities"])),
         _state(r), r["registered_at"]]
        for r in rows
    ]  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *table, strict=False)]
    for line in [headers, *table]:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def _state(row: dict[str, Any]) -> str:
    if row["drained_by"] is not None:
        why = f": {row['drain_reason']}" if row["drain_reason"] else ""
        return escape_text(f"draining (by {row['drained_by']}{why})")
    return "draining" if row["draining"] else "live"


def _change_line(kind: str, row: dict[str, Any]) -> str:
    """One line of `watch`: registry text escaped (docs/SECURITY.md)."""
    return (
        f"{kind:8} {escape_text(row['service_name'])}/{escape_text(row['service_id'])} "
        f"{escape_text(row['service_url'])}{' (draining)' if row['draining'] else ''}"
    )


@main.command()
@redis_option
@namespace_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per change.")
def watch(redis_url: str | None, namespace: str, as_json: bool) -> None:
    """Print changes to the registry as they happen (Ctrl-C to stop)."""
    if not redis_url:
        raise click.UsageError("give --redis URL or set SAGA_REDIS_URL")

    async def run() -> None:
        from .mirror import Added, Mirror, Removed

        mirror = Mirror(redis_url, namespace=namespace)
        async with mirror, anyio.create_task_group() as tg:
            if not as_json:
                click.echo(f"watching {len(mirror)} instances; Ctrl-C to stop")

            async def stop() -> None:
                await _until_signal()
                tg.cancel_scope.cancel()

            tg.start_soon(stop)
            async for change in mirror.changes():
                kind = {Added: "added", Removed: "removed"}.get(type(change), "updated")
                row = _instance_row(change.instance)
                if as_json:
                    click.echo(json.dumps({"change": kind, **row}))
                else:
                    click.echo(_change_line(kind, row))

    try:
        anyio.run(run)
    except KeyboardInterrupt:
        pass


# -- operator commands over the HTTP API (register, deregister) -------------------------
# (the HTTP helpers they share with drain/undrain are in _cli_http.py)


@main.command(name="register")
@click.argument("name")
@click.argument("url")
@click.option("--capability", "-c", "capabilities", multiple=True, help="A capability (repeat).")
@click.option(
    "--ttl", type=click.FloatRange(1, 3600), default=60.0, show_default=True,
    help="Seconds until the registration expires unless heartbeated or registered again.",
)  # fmt: skip
@click.option(
    "--id", "service_id", default=None, help="Instance id (default: derived from NAME, URL)."
)
@click.option("--meta", "-m", "meta", multiple=True, help="Metadata KEY=VALUE (repeat).")
@api_options
def register_command(
    name: str,
    url: str,
    capabilities: tuple[str, ...],
    ttl: float,
    service_id: str | None,
    meta: tuple[str, ...],
    saga_url: str,
    token: str | None,
    as_json: bool,
) -> None:
    """Register instance URL of service NAME through the HTTP API (for operators).

    Registering the same NAME and URL again refreshes the same instance.
    """
    metadata: dict[str, str] = {}
    for item in meta:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--meta")
        metadata[key] = value
    body: dict[str, Any] = {
        "service_name": name,
        "service_url": url,
        "capabilities": list(capabilities),
        "ttl_seconds": ttl,
    }
    if metadata:
        body["metadata"] = metadata
    if service_id:
        body["service_id"] = service_id
    payload = _api_call(
        "register", "POST", saga_url, "/api/v1/services/register", token, as_json, body
    )
    if as_json:
        click.echo(json.dumps(payload))
        return
    fields = ("service_name", "service_id", "service_url", "registered_at")
    if not (
        isinstance(payload, dict)
        and all(isinstance(payload.get(f), str) for f in fields)
        and isinstance(payload.get("capabilities", []), list)
        and all(isinstance(c, str) for c in payload.get("capabilities", []))
    ):
        _not_the_answer("register", saga_url, payload)
    caps = ",".join(payload.get("capabilities", [])) or "-"
    click.echo(
        f"registered {payload['service_name']}/{payload['service_id']}  "
        f"{payload['service_url']}  capabilities: {caps}"
    )
    click.echo(
        f"  since {payload['registered_at']}; expires {ttl:g} s after the last heartbeat "
        f"(POST {saga_url.rstrip('/')}/api/v1/services/{name}/heartbeat)"
    )


@instance_command("deregister")
@api_options
def deregister_command(
    name: str, service_id: str | None, saga_url: str, token: str | None, as_json: bool
) -> None:
    """Remove every instance of service NAME, or only instance SERVICE_ID (for operators).

    An instance kept by a running Agent comes back within its next two heartbeats.
    """
    import urllib.parse

    path = f"/api/v1/services/{urllib.parse.quote(name, safe='')}"
    if service_id:
        path += "?service_id=" + urllib.parse.quote(service_id, safe="")
    payload = _api_call("deregister", "DELETE", saga_url, path, token, as_json)
    if not isinstance(payload, dict) or not isinstance(payload.get("removed", []), list):
        _not_the_answer("deregister", saga_url, payload)
    if as_json:
        click.echo(json.dumps(payload))
        return
    removed = payload.get("removed", [])
    noun = "instance" if len(removed) == 1 else "instances"
    click.echo(f"deregistered {name}: {len(removed)} {noun} ({', '.join(removed)})")


@main.command(
    name="bench",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.argument("scenario", default="all")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_command(scenario: str, args: tuple[str, ...]) -> None:
    """Run benchmark SCENARIO (cache, propagation, heartbeat, throughput, scale, peers, all).

    Extra arguments go to the script, e.g. `saga-events bench cache --quick`.
    Needs a source checkout and the bench extra.
    """
    from .bench import BenchError, run

    try:
        status = run(scenario, args)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from None
    if status:
        raise SystemExit(status)


# setup, acl and doctor live in cli_admin.py, drain and undrain in cli_drain.py;
# importing them registers them on main.
from . import cli_admin, cli_drain  # noqa: E402, F401

if __name__ == "__main__":  # pragma: no cover
    main()
