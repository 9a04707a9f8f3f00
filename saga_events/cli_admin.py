"""The administration commands of ``saga-events``: ``setup``, ``acl`` and ``doctor``.

They register themselves on :data:`saga_events.cli.main` when the CLI is
imported. ``setup`` is the one step that needs a Redis administrator (the
notification flags and the transport limits, docs/SECURITY.md); ``acl``
prints the least-privilege users; ``doctor`` checks a deployment.
"""

from __future__ import annotations

import json

import anyio
import click

from ._cli_base import main, namespace_option, redis_option
from ._text import mask_url
from .errors import NotificationConfigError
from .notify import PROTO_MAX_BULK_LEN, SetupChange, redis_conf_lines


async def setup_redis(url: str, proto_max_bulk_len: int | None) -> list[SetupChange]:
    from ._redis import connect
    from .notify import apply_setup

    client = connect(url)
    try:
        return await apply_setup(client, proto_max_bulk_len=proto_max_bulk_len)
    finally:
        await client.aclose()


@main.command(name="setup")
@click.option(
    "--redis", "redis_url", envvar="SAGA_ADMIN_REDIS_URL",
    help="Redis URL of an administrator (a user that may CONFIG; env SAGA_ADMIN_REDIS_URL).",
)  # fmt: skip
@namespace_option
@click.option(
    "--proto-max-bulk-len", "proto_max_bulk_len", default=PROTO_MAX_BULK_LEN,
    show_default=True, help="Largest bulk string Redis accepts from any client (min 1 MB).",
)  # fmt: skip
@click.option(
    "--keep-proto-max-bulk-len", is_flag=True,
    help="Leave proto-max-bulk-len alone (other applications store bigger values).",
)  # fmt: skip
@click.option("--print-conf", is_flag=True, help="Only print the redis.conf lines; change nothing.")
def setup_command(
    redis_url: str | None,
    namespace: str,
    proto_max_bulk_len: int,
    keep_proto_max_bulk_len: bool,
    print_conf: bool,
) -> None:
    """Set what registrars may not: notification flags and transport limits (idempotent).

    Flags are merged in (no other flag is removed). Run it once per Redis as an
    administrator, or put the lines of --print-conf in redis.conf.
    """
    if print_conf:
        for line in redis_conf_lines(proto_max_bulk_len):
            click.echo(line)
        return
    if not redis_url:
        raise click.UsageError("give --redis ADMIN_URL (or set SAGA_ADMIN_REDIS_URL)")
    from ._redis import TRANSIENT

    limit = None if keep_proto_max_bulk_len else proto_max_bulk_len
    try:
        changes = anyio.run(setup_redis, redis_url, limit)
    except NotificationConfigError as exc:
        raise click.ClickException(
            f"{exc}\nsetup needs a user that may CONFIG (an administrator)."
        ) from None
    except TRANSIENT as exc:
        raise click.ClickException(f"cannot reach {mask_url(redis_url)}: {exc}") from None
    except Exception as exc:  # a refused CONFIG SET value, e.g. on a managed Redis
        raise click.ClickException(f"Redis refused the setup: {exc}") from None
    for change in changes:
        what = "set" if change.changed else "kept"
        click.echo(f"{what:4} {change.setting}: {change.before!r} -> {change.after!r}")
    click.echo(
        f"done: registrars of namespace {namespace!r} can now run without CONFIG "
        "(users: `saga-events acl`)"
    )


@main.command(name="acl")
@namespace_option
@click.option(
    "--service", "-s", "services", multiple=True,
    help="A service that gets its own publisher user (repeat the option).",
)  # fmt: skip
@click.option("--db", default=0, show_default=True, help="Database number of the registry.")
@click.option(
    "--generate-passwords", is_flag=True, help="Fill in random passwords instead of <password>."
)
@click.option("--acl-file", is_flag=True, help="Print aclfile lines (user ...), not ACL SETUSER.")
def acl_command(
    namespace: str, services: tuple[str, ...], db: int, generate_passwords: bool, acl_file: bool
) -> None:
    """Print least-privilege ACL users: registrar, reader, one publisher per service."""
    import secrets

    from .acl import PASSWORD_PLACEHOLDER, roles

    try:
        chosen = roles(namespace, services, db)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    for role in chosen:
        password = secrets.token_urlsafe(24) if generate_passwords else PASSWORD_PLACEHOLDER
        click.echo(f"# {role.user}: {role.purpose}")
        click.echo(role.acl_file_line(password) if acl_file else role.setuser_line(password))


@main.command(name="doctor")
@redis_option
@namespace_option
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.option(
    "--canary-wait", default=3.5, show_default=True,
    help="Seconds to wait for a registrar's liveness notification.",
)  # fmt: skip
def doctor_command(
    redis_url: str | None, namespace: str, as_json: bool, canary_wait: float
) -> None:
    """Check a deployment; exit status 0 when healthy, 1 when not (with the fixes)."""
    from .doctor import diagnose, healthy, render

    if not redis_url:
        raise click.UsageError("give --redis URL or set SAGA_REDIS_URL")
    findings = anyio.run(lambda: diagnose(redis_url, namespace, canary_wait=canary_wait))
    if as_json:
        click.echo(json.dumps({"healthy": healthy(findings),
                               "findings": [f.as_dict() for f in findings]}))  # fmt: skip
    else:
        click.echo(render(findings))
    raise SystemExit(0 if healthy(findings) else 1)
