"""What STL_HOME holds on disk, clearing its caches, and pruning stage models no live run needs.

The caches (STL_HOME/cache) hold derived data only — compiled kernels, token ids, row indexes — that
stages rebuild when it is missing, so clearing them loses nothing but time. Stage directories hold the
trained models later runs reuse: pruning deletes the models of finished training stages that no queued
or running run needs, and marks their records so a later run that needs one trains it again. runs/
holds results and redis/ the embedded redis-server's data: those are listed, never deleted here.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from stl.jobs import keys
from stl.jobs.axes import AXES, EVERY_STAGE, stage_value
from stl.jobs.codec import text
from stl.jobs.errors import StagesRunning, StlError
from stl.jobs.layout import DONE_FILE, MODEL_DIR, PRUNED_FILE, SPEC_FILE
from stl.jobs.states import StageKind

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    import redis

    from stl.jobs.settings import Settings
    from stl.jobs.states import PruneTarget

# STL_HOME/cache/<name>: what each cache holds.
CACHES = {
    "inductor": "compiled kernels (train.compile, eval.compile)",
    "tokens": "token ids of few-shot and eval sets",
    "index": "row offsets of MTL data files",
}
PRUNE_LEASE_MS = 600_000  # held while deleting, so no work horse starts the stage meanwhile


@dataclass(frozen=True)
class DiskUsage:
    name: str  # "cache/<name>", "models/<kind>", "stages", "runs" or "redis"
    path: Path
    what: str
    files: int
    bytes: int
    freed_by: str = ""  # the `stl disk` option that deletes this part; "" if none does


@dataclass(frozen=True)
class StageModel:
    stage_id: str
    kind: str  # "mtl", "finetune", or "" where the stage directory has no readable spec
    about: str  # model, tasks, shots and seed, from the stage's spec, for people choosing what to prune
    path: Path  # the model directory
    files: int
    bytes: int


@dataclass
class PruneReport:
    pruned: list[StageModel] = field(default_factory=list)
    needed: list[StageModel] = field(default_factory=list)  # a queued or running run needs them, or one runs
    unknown: list[StageModel] = field(default_factory=list)  # no record in this Redis: left alone
    others: list[StageModel] = field(default_factory=list)  # other users' runs used them: left alone without force
    owners: list[str] = field(default_factory=list)  # those users

    @property
    def freed_bytes(self) -> int:
        return sum(model.bytes for model in self.pruned)


def tree_size(path: Path) -> tuple[int, int]:
    """(files, bytes) under `path`; (0, 0) if it does not exist. Files vanishing meanwhile are skipped."""
    files = size = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            try:
                size += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
            files += 1
    return files, size


def stage_models(settings: Settings, *, only: Iterable[str] | None = None) -> list[StageModel]:
    """The model directory of every stage under STL_HOME/stages (or of the stages `only` names) that has
    one, with its size and kind."""
    found: list[StageModel] = []
    try:
        stage_dirs = sorted(settings.stages_dir.iterdir() if only is None else
                            (settings.stages_dir / sid for sid in only))
    except OSError:
        return []
    for stage_dir in stage_dirs:
        model_dir = stage_dir / MODEL_DIR
        if not model_dir.is_dir():
            continue
        files, size = tree_size(model_dir)
        kind, about = _describe_stage(stage_dir)
        found.append(StageModel(stage_id=stage_dir.name, kind=kind, about=about, path=model_dir, files=files,
                                bytes=size))
    return found


def _describe_stage(stage_dir: Path) -> tuple[str, str]:
    """(kind, a short description) from the stage's spec.json; ("", "") where it cannot be read."""
    try:
        spec = json.loads((stage_dir / SPEC_FILE).read_text())
        kind = str(spec["kind"])
    except (OSError, ValueError, KeyError, TypeError):
        return "", ""
    tasks = spec.get("tasks") or []
    # Each axis's value in the words of jobs/axes.py ("" says nothing): the model and shots lead, the rest end.
    words = {axis.name: axis.described(stage_value(spec, axis.stage_field)) for axis in AXES
             if axis.stage_field and (axis.stage_kinds == EVERY_STAGE or kind in axis.stage_kinds)}
    about = [words.pop("model"), tasks[0] if len(tasks) == 1 else f"{len(tasks)} tasks"]
    details = [words.pop("shots")]
    train = spec.get("train")
    if isinstance(train, dict) and train.get("max_steps"):
        details.append(f"{train['max_steps']} steps")  # tells apart models that differ only in training
    if kind == "finetune":
        details.append(f"from MTL stage {spec['parent'][:8]}" if spec.get("parent") else "from the base model")
    details += words.values()
    return kind, " ".join([*about, *filter(None, details)])


def disk_usage(settings: Settings) -> list[DiskUsage]:
    """Every part of STL_HOME stl writes, with its size: caches first, then stage models by kind."""
    parts = [
        DiskUsage(f"cache/{name}", settings.cache_dir / name, what, *tree_size(settings.cache_dir / name),
                  freed_by="--clear-caches")
        for name, what in CACHES.items()
    ]
    models = stage_models(settings)
    for kind, what in (("mtl", "MTL"), ("finetune", "few-shot")):
        mine = [model for model in models if model.kind == kind]
        parts.append(DiskUsage(f"models/{kind}", settings.stages_dir,
                               f"{len(mine)} {what} model(s), reused by later runs",
                               sum(m.files for m in mine), sum(m.bytes for m in mine), freed_by=f"--prune {kind}"))
    stage_files, stage_bytes = tree_size(settings.stages_dir)
    known = [model for model in models if model.kind in ("mtl", "finetune")]
    parts.append(DiskUsage("stages", settings.stages_dir, "logs, metrics; checkpoints of unfinished stages",
                           stage_files - sum(m.files for m in known), stage_bytes - sum(m.bytes for m in known)))
    parts += [
        DiskUsage("runs", settings.runs_dir, "per-run results and sample predictions", *tree_size(settings.runs_dir)),
        DiskUsage("redis", settings.home / "redis", "data of the redis-server stl started itself",
                  *tree_size(settings.home / "redis")),
    ]
    return parts


def clear_caches(settings: Settings, *, running_stages: int, force: bool = False) -> list[DiskUsage]:
    """Delete STL_HOME/cache/*; return what was there. Refused while stages run (a work horse may be
    reading or compiling into them) unless `force`."""
    if running_stages and not force:
        raise StagesRunning(
            f"{running_stages} stage(s) are running and may be using the caches; clear them when the "
            "workers are idle, or pass --force"
        )
    removed = [usage for usage in disk_usage(settings) if usage.freed_by == "--clear-caches"]
    for usage in removed:
        shutil.rmtree(usage.path, ignore_errors=True)
    left = [str(usage.path) for usage in removed if usage.path.exists()]
    if left:
        raise StlError(f"could not delete all of {', '.join(left)}; check its permissions and try again")
    return removed


# Decides, inside Redis and so atomically with any enqueue, which stage models may go: the stage
# finished, no work horse holds it, and none of the runs that use it is queued or running. Marks
# those `pruned` (so an enqueue that needs one again trains it again) and takes their lease while
# the files are deleted. ARGV[1]: {stages: [{id, stage, runs, lease}], run, now, holder, ttl, dry}.
_PRUNE = """
local p = cjson.decode(ARGV[1])
local live = {queued = true, running = true}
local pruned, needed, unknown = {}, {}, {}
for _, s in ipairs(p.stages) do
  local status = redis.call('HGET', s.stage, 'status')
  if not status then
    unknown[#unknown + 1] = s.id
  else
    local free = status == 'finished' and redis.call('EXISTS', s.lease) == 0
    if free then
      for _, run in ipairs(redis.call('SMEMBERS', s.runs)) do
        if live[redis.call('HGET', p.run .. run, 'status') or ''] then free = false; break end
      end
    end
    if free then
      pruned[#pruned + 1] = s.id
      if not p.dry then
        redis.call('HSET', s.stage, 'pruned', p.now)
        redis.call('SET', s.lease, p.holder, 'PX', p.ttl)
      end
    else
      needed[#needed + 1] = s.id
    end
  end
end
return cjson.encode({pruned = pruned, needed = needed, unknown = unknown})
"""
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def prune_stage_models(conn: redis.Redis, settings: Settings, target: PruneTarget, *, user: str,
                       dry_run: bool = False, force: bool = False) -> PruneReport:
    """Delete the models of finished `target` stages that no queued or running run needs. Their records
    are marked pruned: an enqueue that needs one trains it again. With `dry_run`, only report. Models that
    other users' runs used are theirs to prune (retraining an MTL model costs GPU hours), unless `force`."""
    candidates = {model.stage_id: model for model in stage_models(settings) if model.kind in target.kinds}
    others: dict[str, StageModel] = {}
    owners: set[str] = set()
    if not force and candidates:
        for stage_id, users in _run_users(conn, list(candidates)).items():
            foreign = users - {user}
            if foreign:
                others[stage_id] = candidates.pop(stage_id)
                owners |= foreign
    report = _prune(conn, candidates, user=user, dry_run=dry_run)
    report.others, report.owners = list(others.values()), sorted(owners)
    return report


def _run_users(conn: redis.Redis, stage_ids: list[str]) -> dict[str, set[str]]:
    """Who queued the runs each stage served (a stage with no runs left, or no record: nobody)."""
    pipe = conn.pipeline(transaction=False)
    for stage_id in stage_ids:
        pipe.smembers(keys.stage_runs(stage_id))
        pipe.hget(keys.stage(stage_id), "user")
    answers = pipe.execute()
    runs = {sid: [text(r) for r in answers[2 * i]] for i, sid in enumerate(stage_ids)}
    pipe = conn.pipeline(transaction=False)
    for run_ids in runs.values():
        for run_id in run_ids:
            pipe.hget(keys.run(run_id), "user")
    users = iter(pipe.execute())
    owners = {sid: {text(next(users)) for _ in run_ids} for sid, run_ids in runs.items()}
    for i, sid in enumerate(stage_ids):  # the user whose enqueue created the stage
        if answers[2 * i + 1]:
            owners[sid].add(text(answers[2 * i + 1]))
    return {sid: {u for u in found if u} for sid, found in owners.items()}


def prune_finished_runs_finetune_models(conn: redis.Redis, settings: Settings, run_ids: list[str], *,
                                        user: str) -> PruneReport:
    """STL_PRUNE_FINETUNE: once runs finish, delete their few-shot models that no live run needs."""
    pipe = conn.pipeline(transaction=False)
    for run_id in run_ids:
        pipe.hget(keys.run(run_id), "stages")
    stage_ids = {sid for raw in pipe.execute() for sid in json.loads(text(raw) or "[]")}
    candidates = {model.stage_id: model for model in stage_models(settings, only=stage_ids)
                  if model.kind == StageKind.finetune.value}
    return _prune(conn, candidates, user=user, dry_run=False)


def _prune(conn: redis.Redis, candidates: dict[str, StageModel], *, user: str, dry_run: bool) -> PruneReport:
    report = PruneReport()
    if not candidates:
        return report
    import socket

    holder = f"prune:{socket.gethostname()}:{os.getpid()}"
    payload = {
        "stages": [{"id": sid, "stage": keys.stage(sid), "runs": keys.stage_runs(sid), "lease": keys.stage_lease(sid)}
                   for sid in candidates],
        "run": keys.run(""), "now": f"{time.time():.6f}", "holder": holder, "ttl": PRUNE_LEASE_MS, "dry": dry_run,
    }
    answer = json.loads(text(conn.eval(_PRUNE, 0, json.dumps(payload))))
    report.pruned = [candidates[sid] for sid in answer["pruned"] or []]
    report.needed = [candidates[sid] for sid in answer["needed"] or []]
    report.unknown = [candidates[sid] for sid in answer["unknown"] or []]
    if dry_run:
        return report
    failed: list[str] = []
    for model in report.pruned:
        try:
            _delete_model(model, user=user)
        except OSError as e:
            failed.append(f"{model.path} ({e.strerror or e})")
        finally:
            conn.eval(_RELEASE, 1, keys.stage_lease(model.stage_id), holder)
    if failed:
        raise StlError(f"could not delete {', '.join(failed)}; its stage will train again when a run needs it; "
                       "check the permissions and run `stl disk --prune` again")
    return report


def _delete_model(model: StageModel, *, user: str) -> None:
    stage_dir = model.path.parent
    marker = {"pruned_at": time.time(), "by": user, "bytes": model.bytes}
    (stage_dir / PRUNED_FILE).write_text(json.dumps(marker) + "\n")
    (stage_dir / DONE_FILE).unlink(missing_ok=True)  # the stage is no longer done: its model is gone
    doomed = stage_dir / f".{MODEL_DIR}.pruning"
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(model.path, doomed)  # one rename: no reader ever sees half a model
    shutil.rmtree(doomed)
