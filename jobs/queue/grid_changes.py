"""A grid enqueued again: who owns its name, which of its runs were made with other settings, and --replace.

A grid file edited after it was enqueued gives some cells other stages, so other run ids; left in the grid, the
old runs would be averaged with the new ones in `stl results`. `stl enqueue` refuses that unless --replace,
which cancels those runs and drops them from the grid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from stl.jobs import keys
from stl.jobs.codec import text
from stl.jobs.errors import GridChanged
from stl.jobs.queue.queueing import cancel_runs, load_runs, owned_by_another

if TYPE_CHECKING:
    import redis

    from stl.jobs.grid.parse import ExpandedGrid


def changed_runs(conn: redis.Redis, expanded: ExpandedGrid) -> list[str]:
    """Runs already in the grid whose settings differ from what this grid file gives their cells (other
    stages, so other ids): left there, they would be averaged with the new runs in `stl results`. Cells
    the file no longer lists count too (a seed dropped from the axis keeps its old settings otherwise);
    cells the file cannot express (their mixture or split is gone) are left alone."""
    grid = expanded.grid.name
    existing = [text(r) for r in conn.zrange(keys.grid_runs(grid), 0, -1)]
    if not existing:
        return []
    pipe = conn.pipeline(transaction=False)
    for run_id in existing:
        pipe.hget(keys.run(run_id), "cell")
    cells = {run_id: json.loads(text(cell)) for run_id, cell in zip(existing, pipe.execute(), strict=True) if cell}
    ids_now = expanded.run_ids_for(list(cells.values()))
    return [run_id for run_id, id_now in zip(cells, ids_now, strict=True) if id_now is not None and id_now != run_id]


def run_statuses(conn: redis.Redis, run_ids: list[str]) -> dict[str, str]:
    """The status of each of these runs that Redis has (a dry run's preview of what enqueue would skip)."""
    pipe = conn.pipeline(transaction=False)
    for run_id in run_ids:
        pipe.hget(keys.run(run_id), "status")
    return {run_id: text(status) for run_id, status in zip(run_ids, pipe.execute(), strict=True) if status}


def grid_owner(conn: redis.Redis, grid: str) -> str | None:
    """Who first queued runs under this grid name (None: nobody yet)."""
    owner = text(conn.hget(keys.grid(grid), "user"))
    if owner:
        return owner
    first = conn.zrange(keys.grid_runs(grid), 0, 0)  # grids queued before the owner was recorded
    if not first:
        return None
    return text(conn.hget(keys.run(text(first[0])), "user")) or None


def check_grid_owner(conn: redis.Redis, grid: str, user: str) -> None:
    """A grid name is its first user's: others' runs in it would mix into their results and their
    `cancel --grid`."""
    owner = grid_owner(conn, grid)
    if owner and owner != user:
        raise GridChanged(owned_by_another(grid, owner))


def check_grid_unchanged(conn: redis.Redis, expanded: ExpandedGrid, *, user: str | None = None) -> None:
    """Refuse to put runs next to older runs of the grid made with other settings (see changed_runs). With
    `user` (no --force), say how many of them are other users', which --replace keeps."""
    changed = changed_runs(conn, expanded)
    if changed:
        grid = expanded.grid.name
        from stl.jobs.axes import format_cell

        cell = format_cell(json.loads(text(conn.hget(keys.run(changed[0]), "cell"))))
        foreign = sum(map(len, split_by_owner(conn, changed, user=user)[1].values())) if user else 0
        raise GridChanged(
            f'grid "{grid}" already has {len(changed)} run(s) made with other settings (e.g. run '
            f"{changed[0][:12]}, {cell}: the grid file was edited, or an older stl queued them), and `stl "
            f"results {grid}` would average them with these; give the grid a new name, or pass --replace to "
            "cancel those runs and drop them from the grid"
            + (f" ({foreign} of them are other users': --replace keeps those, --replace --force drops them too)"
               if foreign else "")
        )


@dataclass
class DropReport:
    dropped: int = 0
    kept: dict[str, int] = field(default_factory=dict)  # other users' runs left in place: user -> how many


def split_by_owner(conn: redis.Redis, run_ids: list[str], *, user: str) -> tuple[list[str], dict[str, list[str]]]:
    """(`user`'s runs among `run_ids`, every other user's runs by user)."""
    mine: list[str] = []
    others: dict[str, list[str]] = {}
    for record in load_runs(conn, run_ids):
        if record["user"] == user:
            mine.append(record["id"])
        else:
            others.setdefault(record["user"], []).append(record["id"])
    return mine, others


# Each run leaves its grid and stl's indexes only if it is still the caller's (ARGV[2]; '' with --force): an
# enqueue between the read and this write may have queued a failed run again under another user's name.
_DROP = """
local dropped = {}
for _, run in ipairs(cjson.decode(ARGV[1])) do
  local owner = redis.call('HGET', run.key, 'user')
  if owner and (ARGV[2] == '' or owner == ARGV[2]) then
    redis.call('ZREM', run.grid_runs, run.id)
    redis.call('ZREM', ARGV[3], run.id)
    for _, stage_runs in ipairs(run.stage_runs) do redis.call('SREM', stage_runs, run.id) end
    redis.call('DEL', run.key, run.results)
    dropped[#dropped + 1] = run.id
  end
end
return #dropped
"""


def drop_runs(conn: redis.Redis, run_ids: list[str], *, user: str, force: bool) -> DropReport:
    """Cancel the live ones among `run_ids`, then remove them from their grid and from stl's indexes (their
    stages stay, and later runs reuse what they computed). Without `force`, only `user`'s own runs: other
    users' runs, finished or live, are kept and counted."""
    if not run_ids:
        return DropReport()
    mine, others = split_by_owner(conn, run_ids, user=user)
    to_drop = run_ids if force else mine
    report = DropReport(kept={} if force else {owner: len(ids) for owner, ids in others.items()})
    if not to_drop:
        return report
    cancel_runs(conn, to_drop, user=user, force=force)
    runs = [{"id": record["id"], "key": keys.run(record["id"]), "results": keys.run_results(record["id"]),
             "grid_runs": keys.grid_runs(record["grid"]),
             "stage_runs": [keys.stage_runs(sid) for sid in json.loads(record["stages"])]}
            for record in load_runs(conn, to_drop)]
    report.dropped = int(conn.eval(_DROP, 0, json.dumps(runs), "" if force else user, keys.RUNS))
    return report
