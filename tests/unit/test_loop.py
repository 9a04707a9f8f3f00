"""The process event loop choice (saga_events._loop)."""

from __future__ import annotations

import importlib.util

import pytest

from saga_events import _loop


def test_asyncio_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_loop.ENV, raising=False)
    assert _loop.backend_options() == {}
    assert _loop.run(_answer) == 42


def test_uvloop_on_request_and_a_clear_error_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_loop.ENV, "uvloop")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"saga-events\[fast\]"):
        _loop.backend_options()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert _loop.backend_options() == {"use_uvloop": True}


async def _answer() -> int:
    return 42
