from __future__ import annotations

import json
import shlex
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import TYPE_CHECKING, Any

import pytest

from stl.jobs.queue.notify import format_duration, notify_grid_done, summary_line

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

SUMMARY = {"finished": 22, "failed": 1, "canceled": 1, "wall_s": 3 * 3600 + 12 * 60 + 5}
RECORDER = """\
import json, sys
with open(sys.argv[1], "w") as f:
    json.dump({"argv": sys.argv[2:], "stdin": sys.stdin.read()}, f)
"""


class Log(list[str]):
    def __call__(self, message: str) -> None:
        self.append(message)


def python_command(script: Path, *args: str) -> str:
    return shlex.join([sys.executable, str(script), *args])


@pytest.fixture
def recorder(tmp_path: Path) -> Path:
    script = tmp_path / "record notify.py"  # a space, to prove the command is split, not shelled
    script.write_text(RECORDER)
    return script


class Webhook:
    def __init__(self, status: int) -> None:
        self.status = status
        self.requests: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.requests.append(
                    {
                        "path": self.path,
                        "content_type": self.headers["Content-Type"],
                        "body": json.loads(body),
                    }
                )
                self.send_response(hook.status)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/services/T000/B000/secret-token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook(200)
    yield hook
    hook.close()


def test_command_gets_grid_argument_and_json_summary_on_stdin(tmp_path: Path, recorder: Path) -> None:
    out = tmp_path / "out.json"
    log = Log()
    ok = notify_grid_done("mtl-sweep", SUMMARY, command=python_command(recorder, str(out)), url=None, log=log)

    assert ok is True and log == []
    recorded = json.loads(out.read_text())
    assert recorded["argv"] == ["mtl-sweep"]
    assert json.loads(recorded["stdin"]) == {"grid": "mtl-sweep", **SUMMARY}


def test_webhook_gets_a_slack_text_body(webhook: Webhook) -> None:
    log = Log()
    assert notify_grid_done("mtl-sweep", SUMMARY, command=None, url=webhook.url, log=log) is True
    assert log == []
    (request,) = webhook.requests
    assert request["path"] == "/services/T000/B000/secret-token"
    assert request["content_type"] == "application/json"
    assert request["body"] == {
        "text": "stl: grid mtl-sweep is done: 22 finished, 1 failed, 1 canceled in 3 h 12 min"
    }


def test_both_channels_run_even_when_one_fails(webhook: Webhook) -> None:
    log = Log()
    ok = notify_grid_done("g", SUMMARY, command="/nonexistent/stl-notify-hook", url=webhook.url, log=log)
    assert ok is False
    assert len(webhook.requests) == 1
    assert len(log) == 1 and "cannot run STL_NOTIFY_CMD '/nonexistent/stl-notify-hook'" in log[0]


def test_nothing_configured_is_a_quiet_success() -> None:
    log = Log()
    assert notify_grid_done("g", SUMMARY, command=None, url=None, log=log) is True
    assert log == []


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        (
            "import sys; sys.stderr.write('token expired\\n'); sys.exit(3)",
            "exited with status 3: token expired",
        ),
        ("import time; time.sleep(10)", "did not finish within 0.5 s"),
    ],
)
def test_failing_command_returns_false(tmp_path: Path, script: str, expected: str) -> None:
    hook = tmp_path / "hook.py"
    hook.write_text(script)
    log = Log()
    ok = notify_grid_done(
        "g", SUMMARY, command=python_command(hook), url=None, log=log, command_timeout_s=0.5
    )
    assert ok is False
    assert len(log) == 1 and expected in log[0]


def test_unbalanced_quotes_return_false() -> None:
    log = Log()
    assert notify_grid_done("g", SUMMARY, command="notify-send 'stl", url=None, log=log) is False
    assert "quoting" in log[0]


def test_server_error_returns_false_and_hides_the_secret() -> None:
    hook = Webhook(500)
    try:
        log = Log()
        assert notify_grid_done("g", SUMMARY, command=None, url=hook.url, log=log) is False
    finally:
        hook.close()
    assert len(log) == 1 and "HTTP 500" in log[0]
    assert "secret-token" not in log[0]


def test_refused_connection_returns_false() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = Log()
    url = f"http://127.0.0.1:{port}/hook"
    assert notify_grid_done("g", SUMMARY, command=None, url=url, log=log, webhook_timeout_s=2) is False
    assert len(log) == 1 and "cannot reach the webhook at 127.0.0.1" in log[0]


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.org/hook", "hooks.slack.com/x", "http://"]
)
def test_only_http_urls_are_accepted(url: str) -> None:
    log = Log()
    assert notify_grid_done("g", SUMMARY, command=None, url=url, log=log) is False
    assert "must be an http:// or https:// URL" in log[0]


def test_summary_line_tolerates_missing_and_odd_fields() -> None:
    assert summary_line("g", {}) == "stl: grid g is done: 0 finished, 0 failed, 0 canceled"
    assert summary_line("g", {"finished": ["r1", "r2"], "failed": "1", "wall_s": 59.6}) == (
        "stl: grid g is done: 2 finished, 1 failed, 0 canceled in 1 min 0 s"
    )
    assert format_duration(2 * 86400 + 3 * 3600) == "2 d 3 h"
    assert format_duration(42) == "42 s"


def test_unserialisable_summary_never_raises(tmp_path: Path, recorder: Path) -> None:
    circular: dict[str, Any] = {"finished": 1}
    circular["self"] = circular
    log = Log()
    ok = notify_grid_done(
        "g", circular, command=python_command(recorder, str(tmp_path / "o")), url=None, log=log
    )
    assert ok is False
    assert "cannot be written as JSON" in log[0]
