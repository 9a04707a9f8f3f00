"""Hostile HTTP clients (issue 9) and the heartbeat that races the reaper (issue 8).

Each test sends the attack to a real gateway (real uvicorn, real redis-server)
and checks the secure behaviour: the registry keeps answering, nothing is
written, and callers learn nothing about the internals.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from saga_events import Mirror, Registrar, model
from saga_events.testing import eventually, registry_truth
from saga_events.web import Limits
from tests.gateway_helpers import Served, serve_gateway

pytestmark = pytest.mark.anyio

REGISTER = "/api/v1/services/register"
BODY = {"service_name": "pay", "service_url": "http://localhost:9000"}


@pytest.fixture
async def served(registrar: Registrar, mirror: Mirror, redis_url: str) -> AsyncIterator[Served]:
    async with serve_gateway(registrar, mirror, redis_url) as s:
        yield s


# -- bodies -------------------------------------------------------------------------------------


async def test_json_bomb_is_a_400_bad_json_logged_without_tracebacks(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """A deeply nested body (RecursionError in the decoder) answers 400 bad_json, every
    time, changes nothing, and the log gets a few rate-limited lines, no traceback."""
    depth = 4_000  # 8 KB: under the body limit, far over the decoder's stack
    bomb = (
        b'{"service_name":"pay","service_url":"http://x","extra":'
        + b"[" * depth
        + b"]" * depth
        + b"}"
    )
    caplog.set_level(logging.DEBUG, logger="saga_events")
    for _ in range(12):
        r = await served.client.post(
            REGISTER, content=bomb, headers={"content-type": "application/json"}
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"] == "bad_json"
    assert served.gateway.stats.rejected["bad_json"] == 12
    assert await registry_truth(served.redis_url) == {}
    gateway_records = [rec for rec in caplog.records if rec.name == "saga_events.gateway"]
    assert not [rec for rec in gateway_records if rec.exc_info], "a traceback was logged"
    assert len([r for r in gateway_records if r.levelno >= logging.WARNING]) <= 5
    assert (await served.client.get("/health")).status_code == 200


# -- cross-site writes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "ctype"),
    [
        (REGISTER, "application/x-www-form-urlencoded"),
        (REGISTER, "text/plain"),
        (REGISTER, "multipart/form-data; boundary=x"),
        (REGISTER, None),
        ("/api/v1/services/pay/heartbeat", "application/x-www-form-urlencoded"),
        ("/api/v1/services/pay/heartbeat", "text/plain"),
    ],
)
async def test_writes_without_json_content_type_get_415(
    served: Served, path: str, ctype: str | None
) -> None:
    """What a cross-site form can send (form, text/plain) or no type at all on a register
    gets 415 and changes nothing; a JSON register then works."""
    import json

    headers = {"content-type": ctype} if ctype else {}
    r = await served.client.post(path, content=json.dumps(BODY).encode(), headers=headers)
    assert r.status_code == 415, r.text
    assert r.json()["error"] == "unsupported_media_type"
    assert await registry_truth(served.redis_url) == {}
    ok = await served.client.post(REGISTER, json=BODY)
    assert ok.status_code == 200, ok.text
    # A heartbeat with no body and no Content-Type (what the seed's clients send) works.
    assert (await served.client.post("/api/v1/services/pay/heartbeat")).status_code == 200


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:{port}", "127.0.0.1:1", "localhost", "10.0.0.1:{port}"]
)
async def test_loopback_gateway_refuses_foreign_host_headers(served: Served, host: str) -> None:
    """DNS rebinding: a page on another name that resolves to 127.0.0.1 sends its own
    Host; a loopback gateway answers 421 to reads and writes and changes nothing."""
    port = served.gateway.address[1] if served.gateway.address else 0
    headers = {"host": host.format(port=port)}
    r = await served.client.get("/api/v1/services", headers=headers)
    assert r.status_code == 421, r.text
    assert r.json()["error"] == "bad_host"
    w = await served.client.post(REGISTER, json=BODY, headers=headers)
    assert w.status_code == 421
    assert await registry_truth(served.redis_url) == {}
    for good in (f"localhost:{port}", f"127.0.0.1:{port}", f"LOCALHOST:{port}"):
        assert (await served.client.get("/health", headers={"host": good})).status_code == 200


async def test_non_loopback_bind_without_token_warns_loudly(
    registrar: Registrar, mirror: Mirror, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Bound to every interface with no token: a warning says anyone can write; any Host
    is accepted there (the operator chose to be reachable by name)."""
    caplog.set_level(logging.WARNING, logger="saga_events.gateway")
    async with serve_gateway(registrar, mirror, redis_url, host="0.0.0.0") as s:
        assert any("NO TOKEN" in rec.getMessage() for rec in caplog.records), caplog.text
        r = await s.client.get("/health", headers={"host": "registry.internal"})
        assert r.status_code == 200


# -- error bodies -------------------------------------------------------------------------------


async def test_refused_commands_answer_503_without_internals(
    registrar: Registrar, mirror: Mirror, redis_url: str
) -> None:
    """Under a Redis user that may not run a command the gateway needs, the answer is 503
    'registry unavailable' with a reason code: no key names, no ACL text. (A register
    reads nothing before the script; only after a stale attempt, here a tombstone
    ahead of the writer's clock, does it need MGET.)"""
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await admin.execute_command(
            "ACL", "SETUSER", "narrow", "on", ">pw", "~*", "&*", "+@all", "-hmget", "-mget"
        )
        narrow = redis_url.replace("redis://", "redis://narrow:pw@", 1)
        async with serve_gateway(registrar, mirror, narrow) as s:
            await registrar.apply(
                model.Register(
                    service_name="pay", service_id="a", incarnation=1, seq=1,
                    service_url="http://localhost:9000",
                )
            )  # fmt: skip
            await eventually(lambda: bool(mirror.instances("pay")))
            ahead = s.gateway.writer.clock.tick() + 10**12
            await admin.set(registrar.keys.tomb("pay", "t"), f"{ahead}:2", px=60_000)
            assert (await s.client.post(REGISTER, json=BODY)).status_code == 200
            for r in (
                await s.client.post("/api/v1/services/pay/heartbeat"),
                await s.client.post(REGISTER, json={**BODY, "service_id": "t"}),
            ):
                assert r.status_code == 503, r.text
                body = r.json()
                assert body["error"] == "redis_error"
                assert body["detail"].startswith("registry unavailable (noperm)")
                for secret in ("saga:", "hmget", "mget", "narrow", "permission"):
                    assert secret not in r.text.lower()
    finally:
        await admin.aclose()


# -- connections --------------------------------------------------------------------------------


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""  # EOF (a 503 line first when over the cap)
    except BlockingIOError:
        return False
    except OSError:
        return True


async def test_idle_and_half_sent_connections_are_closed_and_health_answers(
    registrar: Registrar, mirror: Mirror, redis_url: str
) -> None:
    """Silent and half-sent sockets (more than the connection cap) cannot hold the gateway:
    those over the cap are refused at once, the others closed after the header timeout,
    and /health answers meanwhile (200 or a prompt 503) and 200 once they are gone."""
    limits = Limits(header_timeout=1.0, keep_alive_timeout=1.0, max_connections=20)
    async with serve_gateway(registrar, mirror, redis_url, limits=limits) as s:
        assert s.gateway.address is not None
        addr = ("127.0.0.1", s.gateway.address[1])
        socks: list[socket.socket] = []
        try:
            for i in range(40):
                sock = socket.create_connection(addr, timeout=5)
                if i % 2:  # half-sent: a request line and part of the headers, never finished
                    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                sock.setblocking(False)
                socks.append(sock)
            during = await s.client.get("/health")
            assert during.status_code in (200, 503)

            def all_closed() -> bool:
                return all(_closed_by_peer(sock) for sock in socks)

            await eventually(all_closed, timeout=30, what="idle connections closed")
        finally:
            for sock in socks:
                sock.close()

        async def healthy() -> bool:
            return (await s.client.get("/health")).status_code == 200

        await eventually(healthy, timeout=30, what="/health answers 200")


async def test_the_gateways_redis_pool_holds_more_than_100_commands_at_once(
    registrar: Registrar, mirror: Mirror, redis_url: str
) -> None:
    """150 Redis commands in flight at once through the gateway's client: none fails for
    want of a pool slot (redis-py's default pool of 100 raised MaxConnectionsError, a
    false 503 for the 101st concurrent write)."""
    limits = Limits(max_connections=300)
    async with serve_gateway(registrar, mirror, redis_url, limits=limits) as s:
        client = s.gateway.context.redis
        assert client.connection_pool.max_connections >= limits.max_connections
        done: list[object] = []

        async def hold() -> None:  # BLPOP holds its connection until the timeout
            done.append(await client.blpop(["saga-test:nothing"], timeout=0.5))

        async with anyio.create_task_group() as tg:
            for _ in range(150):
                tg.start_soon(hold)
        assert done == [None] * 150


async def test_more_than_100_concurrent_writes_get_no_false_503(
    registrar: Registrar, mirror: Mirror, redis_url: str
) -> None:
    """110 concurrent registrations all answer 200 (over redis-py's default pool of 100)."""
    limits = Limits(max_connections=300)
    async with serve_gateway(registrar, mirror, redis_url, limits=limits) as s:
        statuses: list[int] = []

        async def write(i: int) -> None:
            body = {**BODY, "service_id": f"w{i}"}
            # A generous read timeout: on a loaded machine the writes queue behind each other.
            reply = await s.client.post(REGISTER, json=body, timeout=120)
            statuses.append(reply.status_code)

        async with anyio.create_task_group() as tg:
            for i in range(110):
                tg.start_soon(write, i)
        assert sorted(statuses) == [200] * 110, [c for c in statuses if c != 200][:5]
        assert len(await registry_truth(redis_url)) == 110


# -- the heartbeat that races the reaper (issue 8) -------------------------------------------


async def _delete_as_reaper(redis_url: str, registrar: Registrar, sid: str, tomb: bool) -> None:
    """What a reap does to an instance (record, index, deadline, order entry), behind the
    gateway's back; ``tomb`` also leaves a tombstone at the newest pair, as a reaper that
    writes one does."""
    keys = registrar.keys
    key = keys.inst("pay", sid)
    admin = aioredis.Redis.from_url(redis_url)
    try:
        order = await admin.hget(keys.order, key)
        async with admin.pipeline(transaction=True) as pipe:
            pipe.delete(key).srem(keys.index, key).zrem(keys.deadlines, key)
            pipe.hdel(keys.order, key)
            if tomb and order is not None:
                pipe.set(keys.tomb("pay", sid), order, px=600_000)
            await pipe.execute()
        # reap.lua's feed message for it (mirrors hear record changes on the feed only)
        await admin.eval(
            "local rev = redis.call('INCR', KEYS[1]) redis.call('PUBLISH', KEYS[2], "
            "'{\"rev\":' .. rev .. ',\"ch\":[[\"del\",' .. cjson.encode(ARGV[1]) .. ']]}')",
            2, keys.rev, keys.feed, key,
        )  # fmt: skip
    finally:
        await admin.aclose()


@pytest.mark.parametrize("tomb", [False, True], ids=["no-tombstone", "tombstone"])
async def test_heartbeat_racing_the_reaper_answers_404_and_recreates_nothing(
    served: Served, registrar: Registrar, mirror: Mirror, redis_url: str, tomb: bool
) -> None:
    """The instance is reaped between the gateway's view check and its apply: the
    heartbeat answers 404 (the seed's clients then register again) and Redis holds
    nothing for it afterwards."""
    r = await served.client.post(REGISTER, json={**BODY, "service_id": "a"})
    assert r.status_code == 200
    original = registrar.apply_many
    raced: list[bool] = []

    async def reaped_first(events: list[Any], **kw: Any) -> Any:
        if not raced and isinstance(events[0], model.Heartbeat):
            raced.append(True)
            await _delete_as_reaper(redis_url, registrar, "a", tomb)
        return await original(events, **kw)

    registrar.apply_many = reaped_first  # type: ignore[method-assign]
    try:
        beat = await served.client.post("/api/v1/services/pay/heartbeat?service_id=a")
    finally:
        registrar.apply_many = original  # type: ignore[method-assign]
    assert raced
    truth = await registry_truth(redis_url)
    assert beat.status_code == 404, (beat.text, registrar.stats.applied, truth)
    assert beat.json()["error"] == "not_found"
    assert await registry_truth(redis_url) == {}
    await eventually(lambda: not mirror.instances("pay"))
    # The client's re-register brings it back.
    again = await served.client.post(REGISTER, json={**BODY, "service_id": "a"})
    assert again.status_code == 200, again.text
    assert len(await registry_truth(redis_url)) == 1


@pytest.mark.parametrize("parser", ["httptools", "h11"])
async def test_oversized_headers_get_a_400_and_the_connection_closes(
    registrar: Registrar,
    mirror: Mirror,
    redis_url: str,
    parser: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Headers beyond max_header_bytes are refused (400, closed) with either HTTP parser:
    a client cannot make the gateway buffer an endless header block (the socket would
    otherwise stay open until the header timeout, 10 s, beyond this test's bound)."""
    monkeypatch.setenv("SAGA_HTTP_PARSER", parser)
    limits = Limits(max_header_bytes=4096)
    async with serve_gateway(registrar, mirror, redis_url, limits=limits) as s:
        assert s.gateway.address is not None
        addr = ("127.0.0.1", s.gateway.address[1])

        def oversized() -> bytes:
            with socket.create_connection(addr, timeout=5) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                got = b""
                try:
                    for _ in range(64):  # 64 KiB of one header, never finished
                        sock.sendall(b"X-Big: " + b"a" * 1017 + b"\r\n")
                except OSError:  # the gateway closed it meanwhile
                    pass
                try:
                    while chunk := sock.recv(65536):
                        got += chunk
                except ConnectionResetError:  # closed with our bytes unread: an RST
                    pass
                return got  # the connection is closed by now (recv ended)

        answer = await anyio.to_thread.run_sync(oversized)
        # An RST can discard the answer before it is read; what arrived is the 400.
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer[:200]
        assert (await s.client.get("/health")).status_code in (200, 503)
