"""A hub model that cannot be had: a mistyped id, a private or gated one, a hub in trouble, a machine offline.

Each fails its stage once, the mistyped ones at once, with a short reason that fits `stl status`'s failure row,
and the hub's whole answer in `stl logs`. The hub is a local HTTP server that answers as huggingface.co does
(404 or 401 with X-Error-Code RepoNotFound, 403 GatedRepo, 503); nothing leaves the machine.
"""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

import pytest

from stl.cli.render import ERROR_CHARS
from stl.jobs import keys
from stl.jobs.codec import text
from tests.conftest import REPO, free_port
from tests.helpers import child_env, enqueue, grid_done, runs_by_model, small_grid, stage_log, stl

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    import redis

# model id -> (HTTP status, X-Error-Code) the hub answers for anything of that repository
ANSWERS = {"someone/no-such-model": (404, "RepoNotFound"), "someone/private-model": (401, "RepoNotFound"),
           "someone/gated-model": (403, "GatedRepo"), "someone/busy-model": (503, "")}
NOT_ON_THE_HUB = "model {} is not on the Hugging Face hub; check the id"


class FakeHub:
    """An HTTP server on 127.0.0.1 that answers as the hub does for repositories it will not serve."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(self) -> None:
                hub.requests.append(f"{self.command} {self.path}")
                status, code = next((a for model, a in ANSWERS.items() if f"/{model}/" in f"{self.path}/"),
                                    (404, "RepoNotFound"))
                body = b'{"error":"Repository not found"}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if code:
                    self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", "Repository not found")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def config_requests(self, model: str) -> int:
        return sum(r.endswith(f"/{model}/resolve/main/config.json") for r in self.requests)


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    hub = FakeHub()
    hub.thread.start()
    yield hub
    hub.server.shutdown()
    hub.server.server_close()


def online_env(tmp_path: Path, endpoint: str) -> dict[str, str]:
    """A worker that asks `endpoint` for hub models, with an empty cache of its own."""
    env = child_env(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(name, None)
    return env


def run_burst_worker(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "stl.cli.main", "worker", "--burst"], capture_output=True, text=True,
                            cwd=REPO, env=env, timeout=400, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def only_stage(conn: redis.Redis, run_id: str) -> dict[str, str]:
    import json

    (stage_id,) = json.loads(text(conn.hget(keys.run(run_id), "stages")))
    record = {text(k): text(v) for k, v in conn.hgetall(keys.stage(stage_id)).items()}
    return {**record, "id": stage_id}


def failure_row(env: dict[str, str], run_id: str) -> str:
    """The line of `stl status --once`'s failures table that names this run, on a screen wide enough for the
    longest error it shows (ERROR_CHARS): on a narrower one, rich wraps the error between words."""
    result = stl("status", "--once", env={**env, "COLUMNS": "300"})
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if run_id[:10] in line and "│" in line]
    return line


@pytest.mark.slow
def test_models_the_hub_will_not_serve_fail_once_with_a_short_reason_and_the_hubs_answer_in_the_log(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path, fake_hub: FakeHub) -> None:
    grid = small_grid(tmp_path, demo_data, "hub-says-no", shots=[0], models=list(ANSWERS))
    enqueue(grid)
    env = online_env(tmp_path, fake_hub.url)
    run_burst_worker(env)
    assert grid_done(conn, "hub-says-no")

    payload = stl("status", "--json", env=env)
    assert payload.returncode == 0, payload.stderr
    import json

    runs = runs_by_model(json.loads(payload.stdout), "hub-says-no")
    reasons = {
        "someone/no-such-model": NOT_ON_THE_HUB.format("someone/no-such-model"),
        "someone/private-model": NOT_ON_THE_HUB.format("someone/private-model"),
        "someone/gated-model": "model someone/gated-model is gated on the Hugging Face hub: accept its terms, "
                               "then `hf auth login`",
        "someone/busy-model": "the Hugging Face hub answered HTTP 503 for model someone/busy-model; `stl retry` it "
                              "later",
    }
    for model, reason in reasons.items():
        run = runs[model]
        stage = only_stage(conn, run["id"])
        assert run["status"] == "failed", run
        assert run["error"] == f"eval stage {stage['id']}: ModelError: {reason}", run["error"]
        # The row shows the whole reason, on one line, without the stage id.
        assert len(f"eval: ModelError: {reason}") <= ERROR_CHARS
        assert f"eval: ModelError: {reason}" in failure_row(env, run["id"])
        # Tried once; `stl logs` has the hub's own answer.
        log = stage_log(conn, stage["id"])
        assert sum(" started on " in line for line in log) == 1, log
        logs = stl("logs", run["id"], env=env).stdout
        assert f"failed: ModelError: {reason}" in logs
        assert "in full: OSError: " in logs and f"{fake_hub.url}/{model}/resolve/main/config.json" in logs, logs
    for model in ("someone/no-such-model", "someone/private-model", "someone/gated-model"):
        # Refused at once: one request for its config, no retries, a stage of seconds.
        stage = only_stage(conn, runs[model]["id"])
        assert fake_hub.config_requests(model) == 1, fake_hub.requests
        assert float(stage["ended_at"]) - float(stage["started_at"]) < 15, stage
    private_logs = stl("logs", runs["someone/private-model"]["id"], env=env).stdout
    assert "Repository Not Found" in private_logs and "`hf auth login`" in private_logs
    # A hub in trouble (503) is a passing fault: the hub library retried it before the stage failed.
    assert fake_hub.config_requests("someone/busy-model") > 1


@pytest.mark.slow
def test_a_worker_that_cannot_reach_the_hub_says_it_looks_offline(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connections are refused, as offline
    enqueue(small_grid(tmp_path, demo_data, "offline", shots=[0], models=["someone/some-model"]))
    env = online_env(tmp_path, closed)
    started = time.monotonic()
    run_burst_worker(env)
    took = time.monotonic() - started
    (run_id,) = [text(r) for r in conn.zrange(keys.grid_runs("offline"), 0, -1)]
    run = {text(k): text(v) for k, v in conn.hgetall(keys.run(run_id)).items()}
    stage = only_stage(conn, run_id)
    reason = "the worker looks offline: cannot reach the Hugging Face hub for model someone/some-model"
    assert run["status"] == "failed" and run["error"] == f"eval stage {stage['id']}: ModelError: {reason}", run
    assert reason in failure_row(env, run_id)
    log = stage_log(conn, stage["id"])
    assert sum(" started on " in line for line in log) == 1, log  # no retry of the stage: the hub library retried
    logs = stl("logs", run_id, env=env).stdout
    assert "Connection refused" in logs and f"it tried {closed.removeprefix('http://')}" in logs, logs
    print(f"offline: the burst worker took {took:.0f} s in all")


def test_an_id_the_hub_would_refuse_and_a_model_offline_mode_cannot_fetch_fail_with_short_reasons() -> None:
    from stl.jobs.errors import ModelError
    from stl.jobs.ml.models import load_model_and_tokenizer

    # The worker's side: `stl enqueue` refuses such ids now, but runs queued before still reach a worker.
    with pytest.raises(ModelError) as caught:
        load_model_and_tokenizer("someone/bad-", device="cpu", seed=0)
    assert str(caught.value) == "model someone/bad- is not a valid Hugging Face hub id; check the id"
    assert "HFValidationError: " in caught.value.detail
    # The tests run with HF_HUB_OFFLINE=1 (conftest): a model not in the cache is not asked for.
    with pytest.raises(ModelError) as caught:
        load_model_and_tokenizer("someone/no-such-model", device="cpu", seed=0)
    assert str(caught.value) == "model someone/no-such-model is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
    assert "unset HF_HUB_OFFLINE" in caught.value.detail
