"""``saga-events doctor`` against real deployments: healthy, and broken in known ways."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner

from saga_events import Registrar
from saga_events.acl import Role, publisher_role, reader_role, registrar_role
from saga_events.cli import main
from saga_events.doctor import Finding, diagnose, healthy
from saga_events.embedded import RedisServer
from saga_events.keys import Keys
from saga_events.notify import apply_setup
from saga_events.testing import eventually


async def _epoch_ready(admin: aioredis.Redis) -> bool:
    epoch = await admin.get(Keys("default").epoch)
    return epoch is not None and epoch.endswith(b":ready")


def by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {f.check: f for f in findings}


async def _url_as(redis_url: str, role: Role) -> str:
    """Create ``role``'s user (password ``pw``); return the URL that logs in as it."""
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await admin.execute_command("ACL", "SETUSER", role.user, *role.setuser_args("pw"))
    finally:
        await admin.aclose()
    return redis_url.replace("redis://", f"redis://{role.user}:pw@")


@pytest.mark.anyio
async def test_a_healthy_deployment_passes(redis_url: str, registrar: Registrar) -> None:
    """With a registrar running, every check passes (or only warns) and the canary is seen."""
    admin = aioredis.Redis.from_url(redis_url)
    try:  # past the first start's rebuild (doctor warns while one runs)
        await eventually(lambda: _epoch_ready(admin), 10, what="epoch ready")
    finally:
        await admin.aclose()
    findings = await diagnose(redis_url)
    checks = by_check(findings)
    assert healthy(findings), findings
    assert checks["registrar"].status == "ok"
    assert checks["notification flags"].status == "ok"
    assert checks["redis version"].detail.startswith("Redis ")
    assert "ms" in checks["latency"].detail and "ms" in checks["clock skew"].detail
    assert checks["epoch"].status == "ok"


@pytest.mark.anyio
async def test_reset_flags_are_found_with_the_fix(redis_url: str) -> None:
    """Notifications off: the flags check and the canary check fail, each with a fix."""
    # A registrar that will not re-apply the flags during the check.
    async with Registrar(redis_url, config_check_interval=3600, rebuild_wait=0.1):
        admin = aioredis.Redis.from_url(redis_url)
        try:
            await admin.config_set("notify-keyspace-events", "")
            findings = await diagnose(redis_url, canary_wait=2.5)
        finally:
            await admin.aclose()
    checks = by_check(findings)
    assert not healthy(findings)
    assert checks["notification flags"].status == "fail"
    assert "CONFIG SET notify-keyspace-events KEg$xe" in checks["notification flags"].fix
    assert checks["registrar"].status == "fail"
    assert "notifications are off" in checks["registrar"].detail


@pytest.mark.anyio
async def test_reader_user_gets_warnings_not_failures(redis_url: str, registrar: Registrar) -> None:
    """As the least-privilege reader, doctor reports what it may not check and still passes."""
    url = await _url_as(redis_url, reader_role())
    findings = await diagnose(url)
    checks = by_check(findings)
    assert healthy(findings), findings
    assert checks["notification flags"].status == "warn"
    assert (
        "cannot CONFIG" in checks["acl"].detail and "can read the registry" in checks["acl"].detail
    )
    assert checks["registrar"].status == "ok"  # the canary proves notifications flow


@pytest.mark.anyio
async def test_a_publisher_user_gets_findings_not_a_crash(
    redis_url: str, registrar: Registrar
) -> None:
    """As a publisher (no GET, no PSUBSCRIBE), doctor reports what it may not check."""
    url = await _url_as(redis_url, publisher_role("svc"))
    checks = by_check(await diagnose(url, canary_wait=0.5))
    assert checks["epoch"].status == "warn"
    assert "cannot read" in checks["epoch"].detail
    assert checks["registrar"].status == "warn"
    assert checks["acl"].status == "fail"  # it may not read the registry: the real finding


def test_cli_fails_without_a_registrar_and_says_how_to_fix(redis_server: RedisServer) -> None:
    """No registrar: exit status 1, and the output names the command to start one."""
    result = CliRunner().invoke(main, ["doctor", "--redis", redis_server.url, "--canary-wait", "1"])
    assert result.exit_code == 1, result.output
    assert "no registrar is running" in result.output
    assert "saga-events registrar --redis URL" in result.output
    assert result.output.rstrip().endswith("NOT healthy")


def test_cli_json_and_exit_zero_on_a_healthy_deployment(redis_server: RedisServer) -> None:
    """The exit status says healthy; --json carries every finding."""
    registrar = subprocess.Popen(
        [sys.executable, "-m", "saga_events.testing.chaos", "_registrar", redis_server.url,
         "default"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert registrar.stdout is not None
        assert "ready" in registrar.stdout.readline()
        result = CliRunner().invoke(main, ["doctor", "--redis", redis_server.url, "--json"])
    finally:
        registrar.kill()
        registrar.wait()
        if registrar.stdout:
            registrar.stdout.close()
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["healthy"] is True
    assert {f["check"] for f in report["findings"]} >= {
        "connect", "redis version", "notification flags", "acl", "latency", "clock skew",
        "epoch", "registrar",
    }  # fmt: skip


def test_cli_reports_an_unreachable_redis() -> None:
    result = CliRunner().invoke(main, ["doctor", "--redis", "redis://127.0.0.1:1/0"])
    assert result.exit_code == 1
    assert "cannot reach" in result.output and "fix:" in result.output


@pytest.mark.anyio
async def test_a_registrar_on_another_database_is_seen(redis_url: str) -> None:
    """The canary is looked for in the URL's database, not always in database 0."""
    url = redis_url.rsplit("/", 1)[0] + "/3"
    async with Registrar(url, rebuild_wait=0.2):
        admin = aioredis.Redis.from_url(url)
        try:
            await eventually(lambda: _epoch_ready(admin), 10, what="epoch ready")
        finally:
            await admin.aclose()
        findings = await diagnose(url)
    checks = by_check(findings)
    assert checks["registrar"].status == "ok", findings
    assert healthy(findings), findings


@pytest.mark.anyio
async def test_transport_limits_are_checked_and_setup_fixes_them(redis_url: str) -> None:
    """Redis's defaults let a publisher send 512 MB; an unlimited pub/sub buffer holds
    memory without bound: both warn with the setup command as the fix, then pass."""
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await admin.config_set("client-output-buffer-limit", "pubsub 0 0 0")
        checks = by_check(await diagnose(redis_url, canary_wait=0.2))
        assert checks["proto-max-bulk-len"].status == "warn"
        assert checks["pubsub output buffer"].status == "warn"
        assert "unlimited" in checks["pubsub output buffer"].detail
        for check in ("proto-max-bulk-len", "pubsub output buffer"):
            assert "saga-events setup --redis ADMIN_URL" in checks[check].fix
        await apply_setup(admin)
        checks = by_check(await diagnose(redis_url, canary_wait=0.2))
        assert checks["proto-max-bulk-len"].status == "ok"
        assert checks["pubsub output buffer"].status == "ok"
    finally:
        await admin.aclose()


@pytest.mark.anyio
async def test_a_registrar_user_that_may_config_fails_the_check(redis_url: str) -> None:
    """The old registrar role (+config|get +config|set) is found; the printed one passes."""
    old = Role("saga-registrar", "old", (*registrar_role().rules, "+config|get", "+config|set"))
    await _url_as(redis_url, old)
    checks = by_check(await diagnose(redis_url, canary_wait=0.2))
    assert checks["registrar rights"].status == "fail"
    assert "+config|get" in checks["registrar rights"].detail
    assert "saga-events acl" in checks["registrar rights"].fix
    # As that user itself (no ACL GETUSER), doctor still sees that it may CONFIG.
    own = redis_url.replace("redis://", "redis://saga-registrar:pw@")
    assert by_check(await diagnose(own, canary_wait=0.2))["registrar rights"].status == "fail"
    await _url_as(redis_url, registrar_role())
    checks = by_check(await diagnose(redis_url, canary_wait=0.2))
    assert checks["registrar rights"].status == "ok", checks["registrar rights"]


@pytest.mark.anyio
async def test_as_the_registrar_role_the_flags_are_probed(redis_url: str) -> None:
    """Without CONFIG, doctor runs the registrar's probe: flags off fail, with the fix."""
    url = await _url_as(redis_url, registrar_role())
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await admin.config_set("notify-keyspace-events", "K$")
        flags = by_check(await diagnose(url, canary_wait=0.2))["notification flags"]
        assert flags.status == "fail"
        assert "'gx'" in flags.detail and "saga-events setup" in flags.fix
        await apply_setup(admin)
        flags = by_check(await diagnose(url, canary_wait=0.2))["notification flags"]
        assert flags.status == "ok" and "probe" in flags.detail
    finally:
        await admin.aclose()
