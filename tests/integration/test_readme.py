"""The README stays true: its quick start runs against ``saga-events up``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from saga_events.embedded import port_is_free
from tests.gateway_helpers import saga_up

README = Path(__file__).resolve().parents[2] / "README.md"


def quick_start_code() -> str:
    text = README.read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the quick start should hold exactly one Python block"
    return blocks[0]


def test_readme_quick_start_runs_against_saga_events_up() -> None:
    """The quick start, with the URL that ``up`` printed, finds the agent it started."""
    code = quick_start_code()
    assert '"redis://127.0.0.1:6399/0"' in code, "the README's default URL changed"
    with saga_up() as up:
        run = subprocess.run(
            [sys.executable, "-c", code.replace("redis://127.0.0.1:6399/0", up.redis_url)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "http://10.0.0.5:8002"
    assert lines[1] == "http://10.0.0.5:8002"
    assert "service_name='payment'" in lines[2]


def test_readme_two_commands_are_the_ones_ci_runs() -> None:
    """The install-and-test command in the README is the one .ci/run executes."""
    text = README.read_text()
    assert "pip install -e '.[server]' && saga-events up" in text
    assert "pip install -e '.[test]' && pytest" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "pip install -e '.[test]' && pytest" in ci


def test_seed_default_address_works_with_up_defaults() -> None:
    """The seed's clients default to http://localhost:8030: ``up`` serves exactly there."""
    if not port_is_free(8030):
        pytest.skip("port 8030 is taken on this machine by something else; free it to run this")
    with saga_up("--http", "127.0.0.1:8030"):
        body = {
            "service_name": "gateway",
            "service_url": "http://localhost:8000",
            "capabilities": ["rest", "graphql", "grpc"],
        }
        registered = requests.post(
            "http://localhost:8030/api/v1/services/register", json=body, timeout=5
        )
        registered.raise_for_status()
        found = requests.get("http://localhost:8030/api/v1/services/gateway", timeout=5)
        assert found.status_code == 200
        assert found.json()["service_url"] == "http://localhost:8000"
        assert found.json()["service_id"] == registered.json()["service_id"]
        gone = requests.delete("http://localhost:8030/api/v1/services/gateway", timeout=5)
        assert 200 <= gone.status_code < 300
        assert (
            requests.get("http://localhost:8030/api/v1/services/gateway", timeout=5).status_code
            == 404
        )
