"""Every Redis key stl writes, in one place. RQ's own keys (rq:*) are RQ's business."""

from __future__ import annotations

PREFIX = "stl"

RUNS = f"{PREFIX}:runs"  # zset run id -> created_at
GRIDS = f"{PREFIX}:grids"  # zset grid name -> first enqueued at
USERS = f"{PREFIX}:users"  # set of users who ever queued
USAGE = f"{PREFIX}:usage"  # hash user -> decayed GPU seconds as "value@timestamp"
WORKERS = f"{PREFIX}:workers"  # set of stl worker names
RUNNING_STAGES = f"{PREFIX}:stages:running"  # set of stage ids a work horse has started
STORE = f"{PREFIX}:store"  # json {id, home, host, created_at}: the STL_HOME the workers of this Redis share
JOB_ID_PREFIX = f"{PREFIX}-"  # an RQ job's id is this and its stage's id (rq:job:stl-<stage id>)
QUEUE_NAME_PREFIX = f"{PREFIX}."  # every stl queue's RQ name starts so (rq:queue:stl.<user>.<priority>)


def run(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}"


def run_results(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}:results"  # hash task -> json result


def grid(name: str) -> str:
    return f"{PREFIX}:grid:{name}"  # hash: meta (created_at, user, total, notified)


def grid_runs(name: str) -> str:
    return f"{PREFIX}:grid:{name}:runs"  # zset run id -> index in the grid


def stage(stage_id: str) -> str:
    return f"{PREFIX}:stage:{stage_id}"


def stage_lease(stage_id: str) -> str:
    return f"{PREFIX}:stage:{stage_id}:lease"  # holder of the stage; expires when its horse dies


def stage_generation(stage_id: str) -> str:
    return f"{PREFIX}:stage:{stage_id}:generation"  # +1 each time a horse takes the stage (jobs/queue/fence.py)


def stage_reap_lock(stage_id: str) -> str:
    return f"{PREFIX}:stage:{stage_id}:reap"


def stage_runs(stage_id: str) -> str:
    return f"{PREFIX}:stage:{stage_id}:runs"  # set of run ids that need this stage


def stage_log(stage_id: str) -> str:
    return f"{PREFIX}:stage:{stage_id}:log"  # list of log lines


def stage_steps(stage_id: str) -> str:
    return f"{PREFIX}:stage:{stage_id}:steps"  # list of json step records (loss curve)


def worker(name: str) -> str:
    return f"{PREFIX}:worker:{name}"


def queue_name(user: str, priority: str) -> str:
    """RQ queue name of one user's priority lane; RQ stores it under rq:queue:<name>."""
    return f"{QUEUE_NAME_PREFIX}{user}.{priority}"


def host_fault(host: str) -> str:
    return f"{PREFIX}:host:{host}:fault"  # string "<time>|<reason>": a worker of that host met a machine fault


# --- several stages on one device ----------------------------------------------------------------------------
# hash memory key (stl.jobs.ml.memory_estimate.memory_key: kind, model, batch, lengths) -> the largest peak of device
# memory (torch.cuda.max_memory_allocated, bytes) a finished stage of that key reached
MEMORY_PEAKS = f"{PREFIX}:memory:peaks"
# hash calibration key (stl.jobs.ml.memory_estimate.calibration_key: kind and model) -> the largest ratio of a
# recorded peak to the formula's estimate, which corrects the formula for that model's unseen batches and lengths
MEMORY_CALIBRATION = f"{PREFIX}:memory:calibration"


def device_stages(device: str) -> str:
    """Set of the stage ids running on one device ("<host>:gpu0", "<host>:cpu"); read it through
    stl.jobs.queue.devices.stages_on_device, which leaves out entries of workers that died."""
    return f"{PREFIX}:device:{device}:stages"


def device_reserved(device: str) -> str:
    # hash stage id -> json {bytes, at, worker}: the device memory an admitted stage may grow into
    # (stl.jobs.queue.admission_gate); removed when its stage ends
    return f"{PREFIX}:device:{device}:reserved"


def device_admission_lock(device: str) -> str:
    return f"{PREFIX}:device:{device}:admitting"  # short lock: one slot of a device admits at a time
