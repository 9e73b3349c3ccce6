"""One artifact store per queue: the workers of one Redis share one STL_HOME.

A stage starts from its parent's model under STL_HOME/stages, and any worker of the queue may run either,
so workers that write to different folders take each other's stages and cannot find their parents. Each
STL_HOME gets a random id (STL_HOME/store.json, written once, atomically); the first worker of a Redis
records its id there, and a worker whose STL_HOME has another id refuses to start.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from stl.jobs import keys
from stl.jobs.codec import text
from stl.jobs.errors import StlError, StoreMismatch, UsageError

if TYPE_CHECKING:
    from pathlib import Path

    import redis

    from stl.jobs.settings import Settings

STORE_FILE = "store.json"  # in STL_HOME: {id, home, host, created_at}


@dataclass(frozen=True)
class Store:
    id: str
    home: str  # the folder, as the worker that made (or registered) it named it
    host: str
    created_at: float

    @property
    def short(self) -> str:
        return self.id[:8]

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Store:
        data = json.loads(raw)
        return cls(id=str(data["id"]), home=str(data["home"]), host=str(data["host"]),
                   created_at=float(data["created_at"]))


def read_store(home: Path) -> Store | None:
    """The id of the store in `home`; None where it has none yet (a new or emptied folder)."""
    path = home / STORE_FILE
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UsageError(f"cannot read {path} ({e.strerror or e}); check its permissions") from e
    try:
        return Store.from_json(raw)
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path} is not a store id stl wrote ({e}); delete it and start the worker with "
                         "--adopt-store") from e


def create_store(home: Path) -> Store:
    """The store id of `home`, made now if it has none. Two workers making one at once agree on the first."""
    made = Store(id=uuid.uuid4().hex, home=str(home), host=socket.gethostname(), created_at=time.time())
    home.mkdir(parents=True, exist_ok=True)
    temporary = home / f".{STORE_FILE}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(made.to_json(), indent=2) + "\n")
    try:
        os.link(temporary, home / STORE_FILE)  # whole, and never over one that exists: the first maker wins
    except FileExistsError:
        pass
    except OSError:  # a filesystem without hard links: create it exclusively, then write it
        with contextlib.suppress(FileExistsError), (home / STORE_FILE).open("x") as f:
            f.write(temporary.read_text())
    finally:
        temporary.unlink(missing_ok=True)
    found = read_store(home)
    if found is None:
        raise StlError(f"{home / STORE_FILE} vanished as it was made; start the worker again")
    return found


def registered_store(conn: redis.Redis) -> Store | None:
    """The store the workers of this Redis share; None until a worker starts."""
    raw = conn.get(keys.STORE)
    if not raw:
        return None
    try:
        return Store.from_json(text(raw))
    except (ValueError, KeyError, TypeError):
        conn.delete(keys.STORE)  # a damaged record says nothing: the next worker records its own
        return None


def claim_store(conn: redis.Redis, settings: Settings, *, adopt: bool = False) -> Store:
    """Check, before a worker takes any stage, that its STL_HOME is the queue's store (recording it if the
    queue has none yet). With `adopt`, make it the queue's store, unless workers of another store run."""
    local = read_store(settings.home)
    registered = registered_store(conn)
    if registered is None:
        local = local or create_store(settings.home)
        if conn.set(keys.STORE, json.dumps(local.to_json()), nx=True):
            return local
        registered = registered_store(conn)  # another worker recorded its store a moment ago
        if registered is None:
            raise StlError("the queue's store changed while this worker started; start it again")
    if local is not None and local.id == registered.id:
        return local
    users = _live_workers(conn)
    if not adopt:
        raise StoreMismatch(_mismatch(settings, local, registered, users))
    if users:
        raise StoreMismatch(
            f"cannot adopt STL_HOME {settings.home}: {len(users)} worker(s) use the queue's store "
            f"{registered.home} on {registered.host} ({', '.join(users[:3])}); stop them first, or share their "
            "STL_HOME")
    local = local or create_store(settings.home)
    conn.set(keys.STORE, json.dumps(local.to_json()))
    return local


def _mismatch(settings: Settings, local: Store | None, registered: Store, users: list[str]) -> str:
    if local is not None:
        here = f"STL_HOME {settings.home} is store {local.short}"
    elif registered.home == str(settings.home) and registered.host == socket.gethostname():
        here = f"STL_HOME {settings.home} has no store id any more (it was wiped or made again since it was the store)"
    else:
        here = f"STL_HOME {settings.home} has no store id (a new or emptied folder)"
    used = f"{len(users)} worker(s) use it now" if users else "no worker uses it now"
    way_out = ("; if that store is gone for good (wiped or moved), `stl worker --adopt-store` makes this folder the "
               "queue's store, and models its stages need are made again" if not users else "")
    return (f"{here}, but the workers of this Redis share store {registered.short} in {registered.home} on "
            f"{registered.host} ({used}): a stage starts from its parent's model there. Share that STL_HOME (the "
            f"same folder, on a shared filesystem across machines), or point this worker at another Redis database "
            f"(STL_REDIS_URL={another_database(settings.redis_url)}){way_out}")


def _live_workers(conn: redis.Redis) -> list[str]:
    """Workers whose record is fresh: they passed this check against the store the queue has now."""
    from stl.jobs.queue.records import WORKER_STALE_S, list_workers
    from stl.jobs.queue.recovery import worker_is_dead

    now = time.time()
    return [w.name for w in list_workers(conn)
            if w.last_seen is not None and now - w.last_seen <= WORKER_STALE_S and not worker_is_dead(w.name)]


def another_database(url: str) -> str:
    """`url` with the next database number, and no password (it goes into messages)."""
    parsed = urlparse(url)
    if parsed.scheme == "unix":
        return f"unix://{parsed.path}?db=1"
    database = 0
    with contextlib.suppress(ValueError):
        database = int((parsed.path or "/0").strip("/") or 0)
    auth = ":PASSWORD@" if parsed.password else ""
    return f"{parsed.scheme}://{auth}{parsed.hostname or 'localhost'}:{parsed.port or 6379}/{database + 1}"


def check_queue_store(conn: redis.Redis, settings: Settings, *, action: str) -> None:
    """Refuse `action`, which writes the queue's records from what this STL_HOME holds, where this STL_HOME is
    not the queue's store (the queue would record as deleted models that its store still has)."""
    registered = registered_store(conn)
    if registered is None:
        return
    local = read_store(settings.home)
    if local is not None and local.id == registered.id:
        return
    raise StoreMismatch(
        f"cannot {action} in STL_HOME {settings.home}: it is not the store the workers of this Redis share "
        f"({registered.home} on {registered.host}, store {registered.short}), whose records it would change; "
        f"run it where STL_HOME is that folder")
