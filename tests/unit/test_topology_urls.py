"""Topology URLs: what parses to what, and bad URLs name the part at fault."""

from __future__ import annotations

import pytest

from saga_events._redis import connect
from saga_events.errors import SagaError, TopologyError
from saga_events.topology import Topology, is_topology_url, parse_url, slot_of


def test_sentinel_url_with_everything() -> None:
    """Credentials, several Sentinels (IPv6 too), master name, db and our query options."""
    url = parse_url(
        "rediss+sentinel://app:s%3Acret@s1:26380,s2,[::1]:26381/mymaster/3"
        "?sentinel_password=sp&sentinel_username=su&read_from=replica&socket_timeout=2.5"
    )
    assert url.kind == "sentinel" and url.tls
    assert url.hosts == (("s1", 26380), ("s2", 26379), ("::1", 26381))
    assert (url.username, url.password) == ("app", "s:cret")
    assert (url.master_name, url.db, url.read_from) == ("mymaster", 3, "replica")
    assert (url.sentinel_username, url.sentinel_password) == ("su", "sp")
    assert url.options == (("socket_timeout", "2.5"),)
    assert url.node_url(("10.0.0.5", 6379)) == (
        "rediss://app:s%3Acret@10.0.0.5:6379/3?socket_timeout=2.5"
    )
    assert url.sentinel_url(("::1", 26381)) == "rediss://su:sp@[::1]:26381/0?socket_timeout=2.5"


def test_passwords_never_show_in_messages_or_repr() -> None:
    """Errors and repr carry the URL with its passwords redacted."""
    url = parse_url("redis+sentinel://u:hunter2@h:1/m?sentinel_password=hunter3")
    assert "hunter" not in repr(url) and "hunter" not in url.text
    with pytest.raises(TopologyError) as info:
        parse_url("redis+sentinel://u:hunter2@h:1/m?sentinel_password=hunter3&read_from=x")
    assert "hunter" not in str(info.value)
    with pytest.raises(TopologyError) as info:
        parse_url("redis+sentinel://u:hun@ter2@h:1/m?read_from=x")  # a raw '@' in it
    assert "hun" not in str(info.value) and "ter2" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "hosts", "read_from"),
    [
        ("redis+cluster://a:7000", (("a", 7000),), "master"),
        ("redis+cluster://a:7000,b:7001/", (("a", 7000), ("b", 7001)), "master"),
        ("redis+cluster://a/0", (("a", 6379),), "master"),
        ("rediss+cluster://u:p@a:1?read_from=replica", (("a", 1),), "replica"),
        ("REDIS+CLUSTER://a:1", (("a", 1),), "master"),
    ],
)
def test_cluster_urls(url: str, hosts: tuple[tuple[str, int], ...], read_from: str) -> None:
    """Any nodes are seeds; db 0 only; read_from defaults to master."""
    parsed = parse_url(url)
    assert parsed.kind == "cluster" and parsed.hosts == hosts and parsed.read_from == read_from
    assert parsed.master_name is None and parsed.db == 0


@pytest.mark.parametrize(
    ("url", "plain"),
    [
        ("redis://h:1/0", "redis://h:1/0"),
        ("redis://h:1/0?read_from=master", "redis://h:1/0"),
        ("rediss://h:1/2?ssl_cert_reqs=none&read_from=master", "rediss://h:1/2?ssl_cert_reqs=none"),
        ("unix:///tmp/r.sock?db=1", "unix:///tmp/r.sock?db=1"),
    ],
)
def test_plain_urls_pass_through_without_our_options(url: str, plain: str) -> None:
    """A one-node URL stays redis-py's; read_from=master is accepted and dropped."""
    parsed = parse_url(url)
    assert parsed.kind == "plain" and parsed.plain_url == plain


@pytest.mark.parametrize(
    ("url", "part"),
    [
        ("http://h:1", "scheme"),
        ("h:1", "scheme"),
        ("redis+zookeeper://h:1/m", "scheme"),
        ("redis+sentinel://", "host list"),
        ("redis+sentinel:///m", "host list"),
        ("redis+sentinel://a:1,,b:2/m", "host list"),
        ("redis+sentinel://a:1,/m", "host list"),
        ("redis+sentinel://a:0/m", "port in 'a:0'"),
        ("redis+sentinel://a:65536/m", "port in 'a:65536'"),
        ("redis+sentinel://a:x/m", "port in 'a:x'"),
        ("redis+sentinel://a b:1/m", "host 'a b:1'"),
        ("redis+sentinel://[::1/m", "host '[::1'"),
        ("redis+sentinel://[::1]x/m", "host '[::1]x'"),
        ("redis+sentinel://a:1,a:1/m", "host 'a:1'"),
        ("redis+sentinel://a:1", "master name"),
        ("redis+sentinel://a:1/", "master name"),
        ("redis+sentinel://a:1/m/x", "db"),
        ("redis+sentinel://a:1/m/-1", "db"),
        ("redis+sentinel://a:1/m/1/2", "path"),
        ("redis+sentinel://u:@a:1/m", "password"),
        ("redis+sentinel://a:1/m#frag", "fragment"),
        ("redis+sentinel://a:1/m?read_from=primary", "query read_from"),
        ("redis+sentinel://a:1/m?read_from=master&read_from=replica", "query read_from"),
        ("redis+sentinel://a:1/m?db=2", "query db"),
        ("redis+sentinel://a:1/m?password=x", "query password"),
        ("redis+sentinel://a:1/m?frobnicate=1", "query frobnicate"),
        ("redis+sentinel://a:1/m?socket_timeout=soon", "query socket_timeout"),
        ("redis+sentinel://a:1/m?novalue", "query"),
        ("redis+cluster://a:1/1", "path"),
        ("redis+cluster://a:1/m", "path"),
        ("redis+cluster://a:1?sentinel_password=x", "query sentinel_password"),
        ("redis+cluster://a:1?read_from=any", "query read_from"),
        ("redis://h:1/0?read_from=replica", "query read_from"),
        ("redis://h:1/0?read_from=nearest", "query read_from"),
        ("redis://h:1/0?sentinel_password=x", "query sentinel_password"),
    ],
)
def test_bad_urls_name_the_part_at_fault(url: str, part: str) -> None:
    """Each bad URL is one line: the (redacted) URL, the part at fault, the reason."""
    with pytest.raises(TopologyError) as info:
        parse_url(url)
    error = info.value
    assert isinstance(error, ValueError) and isinstance(error, SagaError)
    assert error.part == part
    assert str(error).startswith(f"{error.url}: {part}: ")
    assert "\n" not in str(error)


def test_replica_on_a_one_node_url_says_why() -> None:
    """read_from=replica on redis:// is refused with the schemes that can do it."""
    with pytest.raises(TopologyError, match=r"redis\+sentinel:// or redis\+cluster://"):
        parse_url("redis://h:1/0?read_from=replica")


@pytest.mark.parametrize(
    ("url", "ours"),
    [
        ("redis://h:1/0", False),
        ("rediss://h:1/0?ssl_cert_reqs=none", False),
        ("redis://h:1/0?read_from=master", True),
        ("redis+sentinel://h:1/m", True),
        ("rediss+cluster://h:1", True),
        ("unix:///tmp/s?read_from=replica", True),
    ],
)
def test_which_urls_the_topology_layer_takes(url: str, ours: bool) -> None:
    """Plain URLs keep redis-py's path; new schemes and read_from come here."""
    assert is_topology_url(url) is ours


def test_connect_delegates_the_new_schemes() -> None:
    """_redis.connect hands Sentinel and Cluster URLs to the topology layer (no I/O yet)
    and refuses read_from=replica on one node."""
    from saga_events._topology_pool import ResolvingConnection

    for url in ("redis+cluster://127.0.0.1:7000", "redis+sentinel://127.0.0.1:1/m"):
        client = connect(url)
        assert client.connection_pool.connection_class is ResolvingConnection
    with pytest.raises(TopologyError, match="read_from"):
        connect("redis://127.0.0.1:1/0?read_from=replica")


def test_slot_of_follows_the_hash_tag() -> None:
    """Every registry key of a namespace is in the slot of its {ns} tag."""
    from redis.crc import key_slot

    assert slot_of("default") == key_slot(b"default")
    assert slot_of("default") == key_slot(b"saga:{default}:inst:svc:1")
    assert slot_of("a") != slot_of("b")


@pytest.mark.anyio
async def test_one_node_topology_is_that_node() -> None:
    """A redis:// Topology needs no resolution: master() and registry_node() are the node
    (no connection is made to build them); replica() is refused with the schemes to use."""
    async with Topology("redis://127.0.0.1:6399/2?read_from=master") as topology:
        master = await topology.master()
        kwargs = master.connection_pool.connection_kwargs
        assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("127.0.0.1", 6399, 2)
        assert await topology.registry_node("team-a") is master
        with pytest.raises(TopologyError, match="knows no replica"):
            await topology.replica()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_mirror_read_from_keyword_sets_the_url_option() -> None:
    """Mirror(url, read_from=...) is the URL's ``read_from`` option (replacing one given
    there); a bad value or a one-node URL is refused with the part at fault."""
    from saga_events import Mirror
    from saga_events._topology_url import with_read_from

    url = "redis+sentinel://a:1,b:2/m?sentinel_password=p%26w&read_from=master"
    out = with_read_from(url, "replica")
    parsed = parse_url(out)
    assert parsed.read_from == "replica" and parsed.hosts == parse_url(url).hosts
    assert parsed.sentinel_password == "p&w"
    with pytest.raises(TopologyError) as info:
        Mirror(url, read_from="nearest")  # type: ignore[arg-type]
    assert info.value.part == "read_from" and "p%26w" not in str(info.value)
    with pytest.raises(TopologyError) as info:
        Mirror("redis://h:1/0", read_from="replica")
    assert info.value.part == "query read_from"
    with pytest.raises(TypeError, match="needs a URL"):
        Mirror(object(), read_from="replica")  # type: ignore[arg-type]
