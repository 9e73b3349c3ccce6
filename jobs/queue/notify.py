"""Tell people a grid is done: run STL_NOTIFY_CMD and/or POST to a Slack-compatible STL_NOTIFY_URL.

A notification is a courtesy: every failure is logged and reported as False, never raised, so a
broken hook cannot fail the run that finished the grid.
"""

from __future__ import annotations

import http.client
import json
import shlex
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any

from stl.jobs.humanize import format_duration

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

COMMAND_TIMEOUT_S = 30.0
WEBHOOK_TIMEOUT_S = 10.0


def notify_setting_problems(command: str | None, url: str | None) -> list[str]:
    """What is wrong with STL_NOTIFY_CMD and STL_NOTIFY_URL, found when the worker starts rather than when the
    first grid ends, hours later."""
    problems = []
    if command:
        try:
            argv = shlex.split(command)
        except ValueError as e:
            argv = []
            problems.append(f"STL_NOTIFY_CMD is not a valid command line ({e}); fix its quoting")
        if argv and shutil.which(argv[0]) is None:
            problems.append(f"STL_NOTIFY_CMD names {argv[0]!r}, which is not a program on PATH (it runs without "
                            "a shell: for pipes or redirections, point it at a script)")
    if url:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            problems.append(f"STL_NOTIFY_URL must be an http:// or https:// URL with a host, got scheme "
                            f"{parsed.scheme!r}")
    return problems


def notify_grid_done(
    grid: str,
    summary: Mapping[str, Any],
    *,
    command: str | None,
    url: str | None,
    log: Callable[[str], None],
    command_timeout_s: float = COMMAND_TIMEOUT_S,
    webhook_timeout_s: float = WEBHOOK_TIMEOUT_S,
) -> bool:
    """Run `command GRID` with the JSON summary on stdin, and/or POST {"text": ...} to `url`.

    `summary` keys read for the message: finished, failed, canceled (counts), wall_s (seconds from
    first enqueue to last run done); all optional. True when every configured channel succeeded
    (also when none is configured).
    """
    ok = True
    try:
        if command:
            ok = run_notify_command(command, grid, summary, log=log, timeout_s=command_timeout_s) and ok
        if url:
            ok = post_webhook(url, summary_line(grid, summary), log=log, timeout_s=webhook_timeout_s) and ok
    except Exception as e:  # a notification must never fail the worker that finished the grid
        log(f"unexpected error while notifying about grid {grid}: {e!r}")
        return False
    return ok


def summary_line(grid: str, summary: Mapping[str, Any]) -> str:
    """`stl: grid mtl-sweep is done: 22 finished, 1 failed, 1 canceled in 3 h 12 min`."""
    counts = ", ".join(f"{_count(summary, status)} {status}" for status in ("finished", "failed", "canceled"))
    line = f"stl: grid {grid} is done: {counts}"
    wall_s = summary.get("wall_s")
    if isinstance(wall_s, int | float) and not isinstance(wall_s, bool) and wall_s >= 0:
        line += f" in {format_duration(float(wall_s))}"
    return line


def _count(summary: Mapping[str, Any], status: str) -> int:
    value = summary.get(status, 0)
    if isinstance(value, list | tuple | set):  # a list of run ids counts as its length
        return len(value)
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def run_notify_command(
    command: str,
    grid: str,
    summary: Mapping[str, Any],
    *,
    log: Callable[[str], None],
    timeout_s: float = COMMAND_TIMEOUT_S,
) -> bool:
    """`shlex.split(command) + [grid]`, no shell; the summary as JSON on stdin."""
    try:
        argv = [*shlex.split(command), grid]
    except ValueError as e:
        log(f"STL_NOTIFY_CMD is not a valid command line ({e}); fix its quoting")
        return False
    if len(argv) < 2:
        log("STL_NOTIFY_CMD is empty; set it to a program, e.g. STL_NOTIFY_CMD='notify-send stl'")
        return False
    try:
        payload = json.dumps({"grid": grid, **summary}, default=str)
    except ValueError as e:  # a circular summary is a caller bug, not a reason to fail the worker
        log(f"the summary of grid {grid} cannot be written as JSON ({e}); command not run")
        return False
    try:
        result = subprocess.run(
            argv,
            input=payload,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        log(f"{argv[0]} did not finish within {timeout_s:g} s; it was stopped")
        return False
    except OSError as e:  # not found, not executable, ...
        log(f"cannot run STL_NOTIFY_CMD {argv[0]!r}: {e}")
        return False
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        log(f"{argv[0]} exited with status {result.returncode}: {detail[0][:300]}")
        return False
    return True


def post_webhook(
    url: str,
    text: str,
    *,
    log: Callable[[str], None],
    timeout_s: float = WEBHOOK_TIMEOUT_S,
) -> bool:
    """POST {"text": text} as JSON (Slack, Mattermost, Discord's /slack endpoint, ...)."""
    parsed = urllib.parse.urlsplit(url)
    # Webhook URLs embed their secret in the path, so logs name only the host.
    where = parsed.hostname or "(no host)"
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        log(f"STL_NOTIFY_URL must be an http:// or https:// URL, got scheme {parsed.scheme!r}")
        return False
    request = urllib.request.Request(
        url,
        data=json.dumps({"text": text}).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "stl-notify"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status = response.status
    except urllib.error.HTTPError as e:
        log(f"webhook at {where} answered HTTP {e.code} {e.reason}")
        return False
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        log(f"cannot reach the webhook at {where}: {reason}")
        return False
    if not 200 <= status < 300:
        log(f"webhook at {where} answered HTTP {status}")
        return False
    return True
