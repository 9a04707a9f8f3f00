"""`saga-events setup`, the bootstrap `up` runs on its own Redis, the start banner, and
registry text escaped by `ls`."""

from __future__ import annotations

import redis
from click.testing import CliRunner

from saga_events.cli import _echo_ready, main
from saga_events.keys import Keys
from saga_events.notify import PROTO_MAX_BULK_LEN, flags_cover
from tests.gateway_helpers import saga_up


def settings(url: str) -> dict[str, str]:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        return {
            k: str(client.config_get(k)[k])
            for k in ("notify-keyspace-events", "proto-max-bulk-len", "client-output-buffer-limit")
        }
    finally:
        client.close()


def test_setup_merges_flags_sets_limits_and_is_idempotent(redis_url: str) -> None:
    """Flags are merged in (others kept), the transport limits set; a second run keeps all."""
    admin = redis.Redis.from_url(redis_url)
    admin.config_set("notify-keyspace-events", "Elh")
    admin.config_set("client-output-buffer-limit", "pubsub 0 0 0")
    admin.close()
    first = CliRunner().invoke(main, ["setup", "--redis", redis_url])
    assert first.exit_code == 0, first.output
    assert "set  notify-keyspace-events" in first.output
    now = settings(redis_url)
    assert flags_cover(now["notify-keyspace-events"])
    assert set("Elh") <= set(now["notify-keyspace-events"])
    assert now["proto-max-bulk-len"] == str(PROTO_MAX_BULK_LEN)
    assert "pubsub 33554432 8388608 60" in now["client-output-buffer-limit"]
    second = CliRunner().invoke(main, ["setup", "--redis", redis_url])
    assert second.exit_code == 0, second.output
    assert "set " not in second.output and second.output.count("kept") == 3
    assert settings(redis_url) == now


def test_setup_can_leave_proto_max_bulk_len_and_print_redis_conf(redis_url: str) -> None:
    before = settings(redis_url)["proto-max-bulk-len"]
    kept = CliRunner().invoke(main, ["setup", "--redis", redis_url, "--keep-proto-max-bulk-len"])
    assert kept.exit_code == 0, kept.output
    assert settings(redis_url)["proto-max-bulk-len"] == before
    conf = CliRunner().invoke(main, ["setup", "--print-conf"])
    assert conf.output.splitlines() == [
        "notify-keyspace-events KEg$xe",
        f"proto-max-bulk-len {PROTO_MAX_BULK_LEN}",
        "client-output-buffer-limit pubsub 33554432 8388608 60",
    ]


def test_setup_without_config_rights_says_who_must_run_it(redis_url: str) -> None:
    admin = redis.Redis.from_url(redis_url)
    admin.execute_command("ACL", "SETUSER", "weak", "on", ">pw", "~*", "+@all", "-config")
    admin.close()
    weak = redis_url.replace("redis://", "redis://weak:pw@")
    result = CliRunner().invoke(main, ["setup", "--redis", weak])
    assert result.exit_code == 1
    assert "administrator" in result.output and "notify-keyspace-events" in result.output
    assert "pw@" not in result.output


def test_up_sets_up_its_own_redis() -> None:
    """The laptop case: `up` owns its redis-server and bootstraps it like `setup`."""
    with saga_up() as up:
        now = settings(up.redis_url)
        assert flags_cover(now["notify-keyspace-events"])
        assert now["proto-max-bulk-len"] == str(PROTO_MAX_BULK_LEN)
        assert "pubsub 33554432 8388608 60" in now["client-output-buffer-limit"]


class _FakeRegistrar:
    rid = "host-1-abc"
    notifications_ok = False
    notifications_reason = "notify-keyspace-events lacks 'x'"


def test_banner_masks_the_password_and_never_offers_the_registrars_credentials(
    capsys: object,
) -> None:
    url = "redis://saga-registrar:s3cret-pw@10.0.0.9:6379/0"
    _echo_ready(url, "default", False)(_FakeRegistrar(), ("127.0.0.1", 8030))
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert "s3cret-pw" not in out
    assert "redis://saga-registrar:****@10.0.0.9:6379/0" in out
    assert "SAGA_REDIS_URL" not in out
    assert "saga-events acl" in out
    assert "lacks 'x'" in out  # a registrar that sees the flags off says so at once
    _echo_ready("redis://127.0.0.1:6399/0", "default", True)(_FakeRegistrar(), None)
    assert "export SAGA_REDIS_URL=redis://127.0.0.1:6399/0" in capsys.readouterr().out  # type: ignore[attr-defined]


def test_ls_prints_registry_text_escaped(redis_url: str) -> None:
    """A record that holds control and bidi characters (written before the URL checks, or
    by anyone with write access) is printed escaped, never raw."""
    keys = Keys("default")
    record = (
        '{"incarnation":1,"seq":1,"registered_at_ms":1700000000000,"service_name":"pay",'
        '"service_id":"p-1","service_url":"http://evil\\u001b[2J\\u202egnp.exe\\u0007",'
        '"capabilities":["rest\\u001b]0;pwned\\u0007"],"metadata":{},"ttl_ms":60000,'
        '"draining":false}'
    )
    admin = redis.Redis.from_url(redis_url)
    admin.set(keys.inst("pay", "p-1"), record)
    admin.sadd(keys.index, keys.inst("pay", "p-1"))
    admin.set(keys.epoch, "1-a:ready")
    admin.close()
    result = CliRunner().invoke(main, ["ls", "--redis", redis_url])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\u202e" not in result.output
    assert "\x07" not in result.output
    assert "http://evil\\x1b[2J\\u202egnp.exe\\x07" in result.output
    assert "rest\\x1b]0;pwned\\x07" in result.output
