"""The operator commands against something that is not the saga-events HTTP API."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from saga_events.cli import main


class _NotTheApi(BaseHTTPRequestHandler):
    def do_DELETE(self) -> None:
        listy = "/listy" in self.path  # JSON, but not an object
        body = b"[1, 2]" if listy else b"<html>hello</html>"
        self.send_response(200)
        self.send_header("Content-Type", "application/json" if listy else "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # JSON, but not the gateway's answer
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        body = b'{"status": "ok"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet


@pytest.fixture
def other_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotTheApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_200_that_is_not_json_is_a_clear_error_not_a_traceback(other_server: str) -> None:
    """--saga-url pointing at another web server: exit 1 with a hint, no traceback."""
    res = CliRunner().invoke(main, ["deregister", "auth", "--saga-url", other_server])
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert "not JSON" in res.output and "--saga-url" in res.output


def test_a_200_json_answer_of_another_shape_is_a_clear_error_not_a_traceback(
    other_server: str,
) -> None:
    """register against a JSON API that is not ours: exit 1 with a one-line hint."""
    res = CliRunner().invoke(
        main, ["register", "auth", "http://auth:1", "--saga-url", other_server]
    )
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert "not the saga-events answer" in res.output and "--saga-url" in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output


def test_deregister_given_json_that_is_not_an_object_is_a_clear_error(other_server: str) -> None:
    """deregister against a JSON API that answers a list: exit 1 with a one-line hint."""
    res = CliRunner().invoke(main, ["deregister", "listy", "--saga-url", other_server])
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert "not the saga-events answer" in res.output and "--saga-url" in res.output
