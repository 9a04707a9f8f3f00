"""The Prometheus http_sd target groups, as a pure function of the instances."""

from __future__ import annotations

from typing import Any

import msgspec

from saga_events.model import Instance
from saga_events.web import sd
from saga_events.web.sd import label_name, target_of


def prometheus_targets(*args: Any, **kwargs: Any) -> Any:
    """The groups as the JSON Prometheus reads."""
    return msgspec.to_builtins(sd.prometheus_targets(*args, **kwargs))


def inst(name: str, sid: str, url: str, **kw: object) -> Instance:
    return Instance(
        incarnation=1, seq=1, registered_at_ms=0, service_name=name, service_id=sid,
        service_url=url, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_target_group_has_host_port_and_every_label() -> None:
    """One group per instance: host:port from its URL and the __meta_saga_* labels."""
    [group] = prometheus_targets(
        [
            inst(
                "orders", "o1", "https://orders.internal:8443/api",
                capabilities=("rest", "grpc"), metadata={"zone": "eu-1", "team.name": "core"},
                draining=True,
            )
        ]
    )  # fmt: skip
    assert group == {
        "targets": ["orders.internal:8443"],
        "labels": {
            "__meta_saga_service": "orders",
            "__meta_saga_service_id": "o1",
            "__meta_saga_capabilities": ",rest,grpc,",
            "__meta_saga_draining": "true",
            "__meta_saga_url_scheme": "https",
            "__meta_saga_url": "https://orders.internal:8443/api",
            "__meta_saga_metadata_zone": "eu-1",
            "__meta_saga_metadata_team_name": "core",
        },
    }


def test_default_ports_by_scheme_and_ipv6() -> None:
    """A URL without a port gets its scheme's default; an IPv6 host keeps its brackets."""
    assert target_of("http://a") == ("a:80", "http")
    assert target_of("https://a/x") == ("a:443", "https")
    assert target_of("grpc://a") == ("a:80", "grpc")
    assert target_of("grpcs://a") == ("a:443", "grpcs")
    assert target_of("redis://a") == ("a:6379", "redis")
    assert target_of("HTTP://A:81") == ("a:81", "http")
    assert target_of("http://[::1]:9000/") == ("[::1]:9000", "http")
    assert target_of("http://[::1]") == ("[::1]:80", "http")


def test_instance_without_any_port_is_left_out() -> None:
    """tcp:// has no default port: without one in the URL there is no target to scrape."""
    assert target_of("tcp://a") is None
    assert target_of("http://a:notaport") is None
    assert prometheus_targets([inst("x", "1", "tcp://a"), inst("x", "2", "tcp://a:7")]) == [
        {
            "targets": ["a:7"],
            "labels": {
                "__meta_saga_service": "x",
                "__meta_saga_service_id": "2",
                "__meta_saga_capabilities": "",
                "__meta_saga_draining": "false",
                "__meta_saga_url_scheme": "tcp",
                "__meta_saga_url": "tcp://a:7",
            },
        }
    ]


def test_filters_by_service_and_capability_and_sorts() -> None:
    """?service= and ?capability= narrow the groups; the order is (service, id)."""
    insts = [
        inst("b", "2", "http://h:2", capabilities=("rest",)),
        inst("a", "1", "http://h:1", capabilities=("grpc",)),
        inst("b", "1", "http://h:3"),
    ]
    ids = lambda groups: [g["labels"]["__meta_saga_service_id"] for g in groups]  # noqa: E731
    assert [g["targets"] for g in prometheus_targets(insts)] == [["h:1"], ["h:3"], ["h:2"]]
    assert ids(prometheus_targets(insts, service="b")) == ["1", "2"]
    assert ids(prometheus_targets(insts, capability="rest")) == ["2"]
    assert prometheus_targets(insts, service="a", capability="rest") == []


def test_metadata_keys_become_label_names() -> None:
    """Every character outside [a-zA-Z0-9_] becomes _; on a clash the first sorted key wins."""
    assert label_name("a-b.c/d é") == "a_b_c_d__"
    [group] = prometheus_targets([inst("x", "1", "http://h", metadata={"a.b": "1", "a-b": "2"})])
    labels = group["labels"]
    assert labels["__meta_saga_metadata_a_b"] == "2"  # "a-b" sorts before "a.b"
