"""ZooKeeper and etcd, set up the way a service registry uses them.

* ZooKeeper (Debian's ``zookeeper`` package, client: kazoo): an instance is
  an ephemeral znode ``/services/<name>/<id>`` of its session; a watcher
  keeps a ``ChildrenWatch`` on ``/services/<name>``; a crashed instance goes
  when its session times out.
* etcd (Debian's ``etcd-server`` package, v3 API through etcd's own JSON
  gateway over HTTP with httpx, so no gRPC stubs are needed): an instance is
  a key ``/services/<name>/<id>`` attached to a lease; a watcher watches the
  prefix; a crashed instance goes when its lease expires.

The servers run on loopback from a temporary directory, started and stopped
by the benchmark. Both are skipped with a message when not installed.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ZK_JAR = Path("/usr/share/java/zookeeper.jar")
ZK_CONF_DIR = Path("/etc/zookeeper/conf")
ZK_TICK_MS = 500  # session timeouts from 2 ticks (1 s) to 20 ticks (10 s)
ROOT = "/services"


def _free_port() -> int:
    from saga_events.embedded import free_port

    return free_port()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _prefix_end(prefix: str) -> str:
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode()


class _ChildServer:
    """A server child process with its data and log in a temp dir (the part both peers share)."""

    name = "server"

    def __init__(self) -> None:
        self.port = _free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix=f"bench-{self.name}-")
        self.dir = Path(self._tmp.name)
        self.proc: subprocess.Popen[bytes] | None = None

    def _launch(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        with open(self.dir / f"{self.name}.out", "wb") as out:  # the child keeps its own copy
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)

    def _wait_ready(self, ready: Callable[[], bool], timeout: float, pause: float) -> None:
        """Poll ``ready`` until it answers True; stop and raise if the child dies or times out."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"{self.name} did not start")
            time.sleep(pause)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        self._tmp.cleanup()


# -- ZooKeeper ----------------------------------------------------------------------


def zookeeper_missing() -> str | None:
    """None when ZooKeeper and kazoo can run here, else why not."""
    java = shutil.which("java")
    if not ZK_JAR.is_file() or java is None:
        return "ZooKeeper is not installed (apt-get install zookeeper)"
    try:
        import kazoo  # noqa: F401
    except ImportError:
        return "kazoo is not installed (pip install 'saga-events[bench]')"
    return None


class ZooKeeperServer(_ChildServer):
    """A standalone ZooKeeper on a free loopback port, data in a temp dir."""

    name = "zk"

    @property
    def hosts(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ZooKeeperServer:
        d = self.dir
        cfg = d / "zoo.cfg"
        cfg.write_text(
            f"tickTime={ZK_TICK_MS}\ndataDir={d / 'data'}\nclientPort={self.port}\n"
            "clientPortAddress=127.0.0.1\nadmin.enableServer=false\n"
            "maxClientCnxns=0\n"
        )
        classpath = f"{ZK_CONF_DIR}:{ZK_JAR}"
        self._launch(
            [
                "java",
                "-Xmx512m",
                f"-Dzookeeper.log.dir={d}",
                "-cp",
                classpath,
                "org.apache.zookeeper.server.quorum.QuorumPeerMain",
                str(cfg),
            ]
        )
        from kazoo.client import KazooClient

        def ready() -> bool:
            client = KazooClient(self.hosts, timeout=5.0)
            try:
                client.start(timeout=2)
                client.ensure_path(ROOT)
                client.stop()
                return True
            except Exception:
                return False
            finally:
                client.close()

        self._wait_ready(ready, timeout=60, pause=0.3)
        return self


def zk_watcher_role(hosts: str, idx: int, out: Any, target: str) -> None:
    """A kazoo ChildrenWatch on ``/services/<target>`` that reports each change."""
    logging.basicConfig(level=logging.ERROR)
    from kazoo.client import KazooClient

    client = KazooClient(hosts, timeout=10.0)
    client.start(timeout=20)
    path = f"{ROOT}/{target}"
    client.ensure_path(path)
    known: set[str] = set()
    first = threading.Event()

    def on_children(children: list[str]) -> None:
        now = time.monotonic_ns()
        current = set(children)
        if first.is_set():
            for sid in current - known:
                out.send(("add", idx, sid, now))
            for sid in known - current:
                out.send(("remove", idx, sid, now))
        known.clear()
        known.update(current)
        first.set()

    client.ChildrenWatch(path, on_children)
    first.wait(30)
    out.send(("ready", idx, str(len(known)), time.monotonic_ns()))
    threading.Event().wait()


def zk_victim_role(hosts: str, target: str, sids: Iterable[str], ttl: float, ready: Any) -> None:
    """One ZooKeeper session per instance, each holding its ephemeral znode; then SIGKILLed."""
    logging.basicConfig(level=logging.ERROR)
    from kazoo.client import KazooClient

    clients = []
    for sid in sids:
        client = KazooClient(hosts, timeout=ttl)
        client.start(timeout=20)
        client.create(f"{ROOT}/{target}/{sid}", b"{}", ephemeral=True, makepath=True)
        clients.append(client)
    ready.set()
    threading.Event().wait()


# -- etcd -----------------------------------------------------------------------------


def etcd_missing() -> str | None:
    if shutil.which("etcd") is None:
        return "etcd is not installed (apt-get install etcd-server)"
    try:
        import httpx  # noqa: F401
    except ImportError:
        return "httpx is not installed (pip install 'saga-events[bench]')"
    return None


class EtcdServer(_ChildServer):
    """A single-member etcd on free loopback ports, data in a temp dir."""

    name = "etcd"

    def __init__(self) -> None:
        super().__init__()
        self.peer_port = _free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> EtcdServer:
        import httpx

        peer = f"http://127.0.0.1:{self.peer_port}"
        env = dict(os.environ, ETCD_UNSUPPORTED_ARCH=os.environ.get("ETCD_UNSUPPORTED_ARCH", ""))
        self._launch(
            [
                "etcd",
                "--name",
                "bench",
                "--data-dir",
                str(self.dir / "data"),
                "--listen-client-urls",
                self.url,
                "--advertise-client-urls",
                self.url,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"bench={peer}",
                "--log-level",
                "error",
            ],
            env=env,
        )

        def ready() -> bool:
            try:
                r = httpx.get(f"{self.url}/health", timeout=1)
            except httpx.HTTPError:
                return False
            return r.status_code == 200 and r.json().get("health") in ("true", True)

        self._wait_ready(ready, timeout=30, pause=0.1)
        return self


class EtcdClient:
    """The few v3 calls a registry needs, over etcd's JSON gateway."""

    def __init__(self, url: str) -> None:
        import httpx

        self.url = url
        self.http = httpx.Client(base_url=url, timeout=10)

    def grant(self, ttl: int) -> str:
        r = self.http.post("/v3/lease/grant", json={"TTL": ttl})
        r.raise_for_status()
        return str(r.json()["ID"])

    def keepalive(self, lease: str) -> None:
        self.http.post("/v3/lease/keepalive", json={"ID": lease}).raise_for_status()

    def put(self, key: str, value: str, lease: str | None = None) -> None:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease is not None:
            body["lease"] = lease
        self.http.post("/v3/kv/put", json=body).raise_for_status()

    def delete(self, key: str) -> None:
        self.http.post("/v3/kv/deleterange", json={"key": _b64(key)}).raise_for_status()

    def close(self) -> None:
        self.http.close()


def etcd_watcher_role(url: str, idx: int, out: Any, target: str) -> None:
    """A watch on the prefix ``/services/<target>/`` that reports each change."""
    import httpx

    prefix = f"{ROOT}/{target}/"
    body = {"create_request": {"key": _b64(prefix), "range_end": _prefix_end(prefix)}}
    with (
        httpx.Client(base_url=url, timeout=None) as http,
        http.stream("POST", "/v3/watch", json=body) as stream,
    ):
        for line in stream.iter_lines():
            now = time.monotonic_ns()
            if not line.strip():
                continue
            result = json.loads(line).get("result", {})
            if result.get("created"):
                out.send(("ready", idx, "0", now))
            for ev in result.get("events", ()):
                kv = ev.get("kv", {})
                sid = base64.b64decode(kv.get("key", "")).decode()[len(prefix) :]
                if ev.get("type") == "DELETE":
                    kind = "remove"
                elif kv.get("create_revision") == kv.get("mod_revision"):
                    kind = "add"
                else:
                    kind = "update"
                out.send((kind, idx, sid, now))


def etcd_victim_role(url: str, target: str, sids: Iterable[str], ttl: float, ready: Any) -> None:
    """One lease per instance, kept alive every ttl/3; then SIGKILLed."""
    client = EtcdClient(url)
    leases = []
    for sid in sids:
        lease = client.grant(max(1, round(ttl)))
        client.put(f"{ROOT}/{target}/{sid}", "{}", lease)
        leases.append(lease)
    ready.set()
    while True:
        time.sleep(ttl / 3)
        for lease in leases:
            client.keepalive(lease)
