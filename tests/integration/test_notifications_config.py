"""The registrar merges the keyspace-notification flags it needs into the server's config."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from saga_events import Agent, Mirror, Registrar
from saga_events.embedded import RedisServer
from saga_events.keys import Keys
from saga_events.notify import flags_cover, merge_flags, parse_flags, probe
from saga_events.testing import eventually, wait_mirror_matches

pytestmark = pytest.mark.anyio


async def config(url: str) -> str:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        return str((await client.config_get("notify-keyspace-events"))["notify-keyspace-events"])
    finally:
        await client.aclose()


@pytest.mark.parametrize("existing", ["", "Elh", "KEA", "Ez", "Kl"])
async def test_registrar_adds_flags_without_dropping_others(redis_url: str, existing: str) -> None:
    """Whatever flags the server has, they stay, and the registrar's are added."""
    client = aioredis.Redis.from_url(redis_url)
    await client.config_set("notify-keyspace-events", existing)
    before = await config(redis_url)
    await client.aclose()
    async with Registrar(redis_url, rebuild_wait=0.1):
        after = await config(redis_url)
    assert flags_cover(after)
    for flag in before:
        if flag == "A":
            assert flags_cover(after, "g$lshzxet")
        else:
            assert flag in after, f"flag {flag!r} of {before!r} was dropped: {after!r}"


def test_merge_flags_expands_all_before_checking() -> None:
    """'AKE' already covers everything; 'Elh' gains exactly the missing letters."""
    assert flags_cover("AKE")
    assert merge_flags("AKE") == "AKE"
    assert sorted(merge_flags("Elh")) == sorted("ElhKg$xe")


async def test_registrar_without_config_runs_and_reports_the_flags(redis_url: str) -> None:
    """Without CONFIG rights the registrar does not stop: it probes the flags, says which
    are missing and what to run, and keeps applying events."""
    admin = aioredis.Redis.from_url(redis_url)
    await admin.execute_command(
        "ACL", "SETUSER", "noconfig", "on", ">secret", "~*", "&*", "+@all", "-config"
    )
    await admin.config_set("notify-keyspace-events", "Kg")
    host_port = redis_url.removeprefix("redis://")
    url = f"redis://noconfig:secret@{host_port}"
    try:
        async with Registrar(url, rebuild_wait=0.1) as registrar:
            assert registrar.notifications_ok is False
            assert "'$x'" in registrar.notifications_reason
            async with Agent(url, "payment", "http://10.0.0.5:1", service_id="p-1"):
                await eventually(lambda: admin.exists("saga:{default}:inst:payment:p-1"), 5)
        assert await config(redis_url) == "gK"  # untouched
    finally:
        await admin.aclose()


async def test_no_manage_config_never_sets_the_flags(redis_url: str) -> None:
    """manage_config=False (--no-manage-config) only checks, even as an administrator."""
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await admin.config_set("notify-keyspace-events", "")
        async with Registrar(redis_url, manage_config=False, rebuild_wait=0.1) as registrar:
            assert registrar.notifications_ok is False
            assert await config(redis_url) == ""
        await admin.config_set("notify-keyspace-events", "KEA")
        async with Registrar(redis_url, manage_config=False, rebuild_wait=0.1) as registrar:
            assert registrar.notifications_ok is True
            assert registrar.notifications.may_config is None  # never asked
    finally:
        await admin.aclose()


@pytest.mark.parametrize(
    "flags", ["", "g$xe", "KE$xe", "KEgxe", "KEg$e", "KEg$x", "KEg$xe", "KEA", "Eg$xe"]
)
async def test_probe_names_exactly_the_missing_flags(redis_url: str, flags: str) -> None:
    """The probe sees K, E, $, g and x (e cannot be probed without evicting something;
    E shows only with x: without x, x is named)."""
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await admin.config_set("notify-keyspace-events", flags)
        missing = await probe(admin, Keys("default"), "test-rid")
        if "K" not in flags and "E" not in flags:
            assert missing == "KE$gx"
        elif "K" not in flags:  # the key-event channel alone: $ and g cannot be seen
            assert missing == "K$g"
        else:
            have = parse_flags(flags) | ({"E"} if "x" not in flags else set())
            expected = "".join(f for f in "KE$gx" if f not in have)
            assert missing == expected
        assert await admin.exists("saga:{default}:probe:test-rid") == 0
    finally:
        await admin.aclose()


async def test_reset_flags_are_reapplied_and_mirrors_resync(redis_server: RedisServer) -> None:
    """Someone resets the flags: the registrar re-applies them and bumps the epoch; the
    mirror resyncs over the gap and sees what changed while notifications were off."""
    url = redis_server.url
    async with (
        Registrar(url, rebuild_wait=0.1, config_check_interval=0.2, liveness_interval=0.2) as reg,
        Mirror(url) as mirror,
    ):
        await eventually(lambda: mirror.epoch is not None and mirror.epoch.endswith(":ready"))
        admin = aioredis.Redis.from_url(url)
        try:
            await admin.config_set("notify-keyspace-events", "")
            async with Agent(url, "silent", "http://10.0.0.2:80", service_id="s"):
                # Registered while notifications were off. The change feed does not
                # depend on the flags, so the mirror may see it before the registrar
                # notices the reset; the reset is still repaired and resynced over.
                await mirror.wait_for("silent", 5)
                await eventually(lambda: reg.stats.flags_reapplied >= 1, 5, what="reapplied")
                assert flags_cover(await config(url))
                await eventually(lambda: mirror.stats.resyncs >= 1, 5, what="the resync")
                await wait_mirror_matches(mirror, url)
        finally:
            await admin.aclose()
