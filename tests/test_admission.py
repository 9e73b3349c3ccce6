"""Admission by device memory (issue 25): the estimate, the decision, the gate in Redis, MPS detection, and one
end-to-end run of two workers sharing a fake device on the CPU."""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from typing import TYPE_CHECKING

import pytest

from stl.jobs import keys
from stl.jobs.codec import text
from stl.jobs.faults import parse_faults
from stl.jobs.humanize import format_bytes
from stl.jobs.ml.memory_estimate import (
    UNKNOWN_MODEL_PARAMETERS,
    estimate_memory,
    memory_key,
    model_shape,
    shape_from_config,
)
from stl.jobs.queue.admission import MARGIN_BYTES, Reservation, decide_admission, with_margin
from stl.jobs.queue.admission_gate import (
    AdmissionGate,
    formula_correction,
    record_peak,
    recorded_peak,
    stage_estimate,
)
from stl.jobs.specs import EvalConfig, StageKind, StageSpec, TrainConfig
from stl.worker.device_memory import FixedDeviceMemory, device_memory_for, sharing_mode
from tests.helpers import Workers, child_env, enqueue, grid_done, small_grid, wait_for

if TYPE_CHECKING:
    from pathlib import Path

    import redis

GB = 10**9


def train_spec(model: str = "tiny:t5", *, batch: int = 8, source: int = 128, target: int = 32,
               kind: StageKind = StageKind.mtl) -> StageSpec:
    return StageSpec(kind=kind, model=model, data="/data.jsonl", tasks=("t",),
                     train=TrainConfig(batch_size=batch, max_source_length=source, max_target_length=target))


def eval_spec(model: str = "tiny:t5", *, batch: int = 8) -> StageSpec:
    return StageSpec(kind=StageKind.eval, model=model, data="/data.jsonl", tasks=("t",),
                     eval=EvalConfig(batch_size=batch, max_source_length=128, max_new_tokens=32))


# --- the estimate -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["bart", "t5", "gpt2"])
def test_tiny_models_parameter_count_is_read_from_stls_own_constants(arch: str) -> None:
    from stl.jobs.ml.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(f"tiny:{arch}", device="cpu", seed=0)
    real = sum(p.numel() for p in model.parameters())
    assert abs(model_shape(f"tiny:{arch}").parameters - real) / real < 0.05


def test_a_local_models_shape_comes_from_its_config_without_the_network(tmp_path: Path) -> None:
    from transformers import T5Config

    T5Config().save_pretrained(tmp_path)  # t5-small's shape: 60.5 M parameters
    shape = model_shape(str(tmp_path))
    assert shape.known and (shape.hidden, shape.layers) == (512, 12)
    assert 58e6 < shape.parameters < 62e6
    assert shape_from_config(object()).known is False


def test_the_formula_grows_with_batch_and_lengths_and_training_needs_more_than_eval() -> None:
    small = estimate_memory(train_spec(batch=8), recorded=None)
    assert small.source == "formula"
    assert estimate_memory(train_spec(batch=16), recorded=None).bytes > small.bytes
    assert estimate_memory(train_spec(source=256), recorded=None).bytes > small.bytes
    assert estimate_memory(eval_spec(batch=8), recorded=None).bytes < small.bytes
    # t5-small's shape at batch 64, 512 + 64 tokens: near the 7.4 GB the lab measured on an H200.
    from transformers import T5Config

    t5_small = shape_from_config(T5Config())
    guess = estimate_memory(train_spec("t5-small", batch=64, source=512, target=64), recorded=None, shape=t5_small)
    assert 6 * GB < guess.bytes < 10 * GB


def test_an_unknown_model_gets_the_conservative_default() -> None:
    guess = estimate_memory(train_spec("no-such-owner/not-downloaded"), recorded=None)
    assert guess.source == "default formula"
    assert guess.bytes >= UNKNOWN_MODEL_PARAMETERS * 16


def test_a_recorded_peak_replaces_the_formula_and_the_record_keeps_the_largest(conn: redis.Redis) -> None:
    spec = train_spec()
    assert recorded_peak(conn, spec) is None
    record_peak(conn, "a" * 20, spec, 3 * GB)
    record_peak(conn, "b" * 20, spec, 2 * GB)  # a smaller peak of the same key does not lower it
    assert recorded_peak(conn, spec) == 3 * GB
    assert text(conn.hget(keys.stage("b" * 20), "peak_memory_bytes")) == str(2 * GB)
    assert recorded_peak(conn, train_spec(batch=16)) is None  # another batch is another key
    assert memory_key(train_spec(kind=StageKind.finetune)) == memory_key(spec)  # both train the same way
    assert memory_key(eval_spec()) != memory_key(spec)
    guess = estimate_memory(spec, recorded=recorded_peak(conn, spec))
    assert (guess.bytes, guess.source) == (3 * GB, "recorded")


def test_a_recorded_peak_corrects_the_formula_for_the_models_other_batches(conn: redis.Redis) -> None:
    seen, unseen = train_spec(batch=8), train_spec(batch=32)
    formula_seen = estimate_memory(seen, recorded=None).bytes
    formula_unseen = estimate_memory(unseen, recorded=None).bytes
    assert stage_estimate(conn, unseen) == formula_unseen  # nothing recorded yet: the formula as it is
    record_peak(conn, "a" * 20, seen, formula_seen * 3)  # the model needed three times the formula's guess
    assert formula_correction(conn, unseen) == pytest.approx(3.0)
    assert stage_estimate(conn, unseen) == pytest.approx(formula_unseen * 3, rel=1e-6)
    assert stage_estimate(conn, seen) == formula_seen * 3  # its own key: the recorded peak itself
    corrected = estimate_memory(unseen, recorded=None, correction=3.0)
    assert corrected.source == "formula corrected x3.00"
    # Only the same model, trained: its evaluation and other models keep their own formula.
    assert formula_correction(conn, eval_spec()) is None
    assert formula_correction(conn, train_spec("tiny:bart")) is None
    # A smaller ratio later does not lower the correction: a guess too low ends in an out-of-memory back-off.
    record_peak(conn, "b" * 20, train_spec(batch=16), estimate_memory(train_spec(batch=16), recorded=None).bytes)
    assert formula_correction(conn, unseen) == pytest.approx(3.0)


def test_an_unknown_models_default_is_not_corrected_and_is_read_again_once_downloaded(tmp_path: Path) -> None:
    model = tmp_path / "model"
    guess = estimate_memory(train_spec(str(model)), recorded=None, correction=0.5)
    assert guess.source == "default formula"  # the ratio was measured against a real shape, not the default's
    from transformers import T5Config

    T5Config().save_pretrained(model)  # what its first stage's download does
    assert model_shape(str(model)).known


# --- the decision -------------------------------------------------------------------------------------


def test_a_stage_that_fits_is_admitted() -> None:
    decision = decide_admission(2 * GB, free_bytes=10 * GB, others=[Reservation("a", 3 * GB)])
    assert decision.admitted and not decision.alone
    assert decision.need_bytes == with_margin(2 * GB) == int(2.2 * GB) + MARGIN_BYTES


def test_a_stage_that_does_not_fit_waits_and_says_why() -> None:
    memory = FixedDeviceMemory(16 * GB)
    _, free = memory.total_and_free()
    decision = decide_admission(8 * GB, free_bytes=free, others=[Reservation("a", 7 * GB)])
    assert not decision.admitted
    assert decision.reason.startswith(f"needs {format_bytes(decision.need_bytes)}, {format_bytes(9 * GB)} free")
    assert decision.reason.startswith("needs 8.7 GiB, 8.4 GiB free")


def test_a_stage_alone_on_the_device_is_always_admitted() -> None:
    decision = decide_admission(80 * GB, free_bytes=10 * GB, others=[])
    assert decision.admitted and decision.alone


def test_memory_used_outside_stl_counts() -> None:
    others = [Reservation("a", 2 * GB)]
    assert decide_admission(4 * GB, free_bytes=FixedDeviceMemory(16 * GB).total_and_free()[1], others=others).admitted
    crowded = FixedDeviceMemory(16 * GB, used_outside=10 * GB).total_and_free()[1]
    assert not decide_admission(4 * GB, free_bytes=crowded, others=others).admitted


def test_what_a_running_stage_already_uses_is_not_counted_twice() -> None:
    # free now already lacks the 5 GB it holds: only the 1 GB it may still grow into is promised.
    grown = [Reservation("a", 6 * GB, used_bytes=5 * GB)]
    assert decide_admission(4 * GB, free_bytes=7 * GB, others=grown).admitted
    assert not decide_admission(4 * GB, free_bytes=7 * GB, others=[Reservation("a", 6 * GB)]).admitted


def test_the_fake_device_is_chosen_by_the_fault_setting() -> None:
    faults = parse_faults("device_memory=1000,device_memory_used=300")
    memory = device_memory_for(faults, has_gpu=False, gpu_index=None, slots=1)
    assert memory is not None and memory.total_and_free() == (1000, 700)
    assert device_memory_for(parse_faults(""), has_gpu=False, gpu_index=None, slots=4) is None
    assert device_memory_for(parse_faults(""), has_gpu=True, gpu_index=0, slots=1) is None  # one slot: as before


# --- the gate, in Redis -------------------------------------------------------------------------------


def queue_stage(conn: redis.Redis, queue_key: str, spec: StageSpec) -> str:
    conn.hset(keys.stage(spec.stage_id), mapping={"spec": spec.model_dump_json(), "status": "queued"})
    conn.rpush(queue_key, f"stl-{spec.stage_id}")
    return spec.stage_id


def test_two_slots_of_one_device_never_admit_against_the_same_free_memory(conn: redis.Redis) -> None:
    from rq import Queue

    queue = Queue("stl.alice.normal", connection=conn)
    first = queue_stage(conn, queue.key, train_spec(batch=8))
    second = queue_stage(conn, queue.key, train_spec(batch=16))
    for stage_id, peak in ((first, 3 * GB), (second, 5 * GB)):
        record_peak(conn, stage_id, StageSpec.model_validate_json(conn.hget(keys.stage(stage_id), "spec")), peak)
    lines: list[str] = []
    gates = [AdmissionGate(conn, device="host:gpu0", memory=FixedDeviceMemory(8 * GB), worker_name=f"w{i}",
                           log=lines.append) for i in range(2)]
    for gate in gates:
        conn.hset(keys.worker(gate.worker_name), "state", "idle")  # alive: its reservations stand

    def taken(queue_key: str, job_id: str) -> tuple[str, str]:
        return job_id, queue_key

    assert gates[0].take([queue], taken) == (f"stl-{first}", queue.key)  # type: ignore[arg-type]
    assert gates[1].take([queue], taken) is None  # 5 GB and its margin do not fit in 8 GB less the first's 3
    assert gates[1].waiting == (f"stage {second} needs 5.6 GiB, 4.7 GiB free (7.5 GiB free now, 2.8 GiB of it "
                                "promised to 1 running stage)")
    assert text(conn.hget(keys.stage(second), "waiting_reason")) == gates[1].waiting
    assert conn.lrange(queue.key, 0, -1) == [f"stl-{second}".encode()]  # peeked, not taken

    gates[0].release(first)  # the first stage ended
    assert gates[1].take([queue], taken) == (f"stl-{second}", queue.key)  # type: ignore[arg-type]
    assert gates[1].waiting == "" and text(conn.hget(keys.stage(second), "waiting_reason")) == ""
    assert json.loads(conn.hget(keys.device_reserved("host:gpu0"), second) or b"{}")["bytes"] == 5 * GB
    # Alone on the device: no cap; the budget is written only for a stage that shares it.
    assert text(conn.hget(keys.stage(second), "memory_budget_bytes")) == ""


def test_a_reservation_of_a_dead_worker_is_dropped(conn: redis.Redis) -> None:
    from rq import Queue

    queue = Queue("stl.alice.normal", connection=conn)
    stage_id = queue_stage(conn, queue.key, train_spec())
    conn.hset(keys.device_reserved("host:gpu0"), "f" * 20, json.dumps({"bytes": 100 * GB, "at": time.time(),
                                                                        "worker": "gone"}))
    gate = AdmissionGate(conn, device="host:gpu0", memory=FixedDeviceMemory(GB), worker_name="w0",
                         log=lambda _: None)
    assert gate.take([queue], lambda key, job: (job, key)) == (f"stl-{stage_id}", queue.key)  # type: ignore[arg-type]
    assert conn.hkeys(keys.device_reserved("host:gpu0")) == [stage_id.encode()]


# --- how the GPU is shared ------------------------------------------------------------------------------


def test_sharing_mode_finds_the_mps_daemon_by_its_binary_and_control_socket(tmp_path: Path) -> None:
    binaries, pipes = tmp_path / "bin", tmp_path / "mps"
    binaries.mkdir()
    pipes.mkdir()
    env = {"PATH": str(binaries), "CUDA_MPS_PIPE_DIRECTORY": str(pipes)}
    assert sharing_mode(has_gpu=False, environ=env) == "cpu"
    assert sharing_mode(has_gpu=True, environ=env) == "time-slicing"  # no daemon binary
    control_binary = binaries / "nvidia-cuda-mps-control"
    control_binary.write_text("#!/bin/sh\n")
    control_binary.chmod(control_binary.stat().st_mode | stat.S_IXUSR)
    assert sharing_mode(has_gpu=True, environ=env) == "time-slicing"  # the daemon is not running
    (pipes / "control").write_text("")  # a plain file is no daemon's socket
    assert sharing_mode(has_gpu=True, environ=env) == "time-slicing"
    (pipes / "control").unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(pipes / "control"))
        assert sharing_mode(has_gpu=True, environ=env) == "MPS"
        assert sharing_mode(has_gpu=True, environ={"PATH": str(binaries),
                                                   "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}) == "time-slicing"
    finally:
        listener.close()


# --- end to end, on the CPU --------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_stage_that_does_not_fit_waits_with_its_reason_and_starts_once_the_other_ends(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path, workers: Workers) -> None:
    # Two workers of one host stand for two slots of one device; 512 MiB is less than any stage's margin alone,
    # so the second stage can never start beside the first.
    # Each training step takes at least 0.1 s, so the wait lasts seconds on a fast machine too.
    env = child_env(STL_FAULT_INJECT=f"device_memory={512 * 2**20},min_step_s=0.1")
    enqueue(small_grid(tmp_path, demo_data, "first", train={"max_steps": 30}))
    enqueue(small_grid(tmp_path, demo_data, "second", seeds=[1], train={"max_steps": 30}))
    for _ in range(2):
        workers.start(env=env)

    def waiting_stage() -> tuple[str, str, str, int] | None:
        """(stage, the worker's reason, the stage's reason and status, stages running), read in one
        transaction: a worker's record lags its gate by up to a heartbeat."""
        for name in conn.smembers(keys.WORKERS):
            reason = text(conn.hget(keys.worker(text(name)), "waiting"))
            if not reason:
                continue
            stage_id = reason.split()[1]
            pipe = conn.pipeline(transaction=True)
            pipe.hget(keys.worker(text(name)), "waiting")
            pipe.hmget(keys.stage(stage_id), "waiting_reason", "status")
            pipe.scard(keys.RUNNING_STAGES)
            again, (stage_reason, status), running = pipe.execute()
            # A stage waits while the other runs alone on the device (between two stages none may run).
            if text(again) == reason == text(stage_reason) and text(status) == "queued" and running == 1:
                return stage_id, reason, text(status), int(running)
        return None

    stage_id, reason, status, running = wait_for(waiting_stage, timeout=120, interval=0.05,
                                                 what="a worker and its stage to say it waits for device memory",
                                                 diagnostics=workers.logs)
    assert "needs" in reason and "free" in reason
    assert status == "queued" and running == 1

    wait_for(lambda: grid_done(conn, "first") and grid_done(conn, "second"), timeout=240,
             what="both grids to finish", diagnostics=workers.logs)
    waited = {text(k): text(v) for k, v in conn.hgetall(keys.stage(stage_id)).items()}
    assert waited["status"] == "finished" and waited["waiting_reason"] == ""
    # It started only once no other stage ran: every other stage either ended before it started or began after.
    stages = [text(s) for s in conn.keys(keys.stage("*")) if text(s).count(":") == 2]
    for key in stages:
        other = {text(k): text(v) for k, v in conn.hgetall(key).items()}
        if key == keys.stage(stage_id) or "started_at" not in other:
            continue
        started, ended = float(other["started_at"]), float(other["ended_at"])
        assert ended <= float(waited["started_at"]) or started >= float(waited["ended_at"]), (key, other)
    # Each worker gives its stage's reservation back once the horse has exited, just after the stage's end.
    wait_for(lambda: conn.hlen(keys.device_reserved(f"{socket.gethostname()}:cpu")) == 0, timeout=30,
             what="the reservations to be given back", diagnostics=workers.logs)
    assert "admitted to" in workers.logs() and os.environ.get("STL_FAULT_INJECT") is None
