"""A worker's view of its machine: after a stage stopped for a machine fault (a full disk, a broken GPU), or
another worker of the host announced one, it takes no work until the machine passes its health check."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import redis

from stl.jobs import keys
from stl.jobs.codec import text
from stl.jobs.faults import parse_faults
from stl.jobs.health import HEALTH_CHECK_EVERY_S, HOST_FAULT_TTL_S, machine_problem

if TYPE_CHECKING:
    import logging
    from collections.abc import Callable

    from stl.jobs.settings import Settings


class MachineHealth:
    """`paused` is why the machine cannot run stages now ("" when it can); `write_record(state)` updates the
    worker's record (None: keep its state) for `stl status`."""

    def __init__(self, connection: redis.Redis, settings: Settings, *, host: str, worker_name: str, has_gpu: bool,
                 log: logging.Logger, write_record: Callable[[str | None], None]) -> None:
        self.connection, self.settings, self.host, self.worker_name = connection, settings, host, worker_name
        self.has_gpu, self.log, self.write_record = has_gpu, log, write_record
        self.paused = ""
        self._disk_need = 0  # while paused for a full disk: what the stage's failed save needed (bytes)
        self._host_fault_seen = ""  # the last machine fault announced on this host that this worker checked
        self._next_check = 0.0

    def pause_if_the_stage_met_a_fault(self, stage_id: str) -> None:
        """A stage its horse stopped for a fault of the machine (stl.jobs.health): take no work until it is fixed."""
        try:
            fault, need = (text(v) for v in self.connection.hmget(keys.stage(stage_id), "machine_fault",
                                                                  "disk_needed_bytes"))
            self._host_fault_seen = text(self.connection.get(keys.host_fault(self.host)))  # our own: checked below
        except redis.RedisError:
            return  # the next stage meets the fault again, if there is one
        if not fault:
            return
        self.log.error("Worker %s: stage %s was stopped by a fault of this machine (%s); checking the machine",
                       self.worker_name, stage_id, fault)
        # A full disk: the stage needs room for what it failed to save, or it would only fill the disk again.
        self._disk_need = int(need) if need.isdigit() else 0
        # The pause gives the health check's reason from the start, as every later check words it (not the
        # stage's error first): `stl status` shows one reason for the whole pause.
        problem = self._problem()
        if problem is None:
            self.log.info("Worker %s: the machine passed its health check; taking work again", self.worker_name)
            self._disk_need = 0
            return
        self.log.error("Worker %s: taking no work until the machine is healthy again: %s; trying again every %.0f s",
                       self.worker_name, problem, HEALTH_CHECK_EVERY_S)
        self._pause(problem)

    def host_fault_stops_work(self) -> bool:
        """Whether a fault another worker of this host met (and announced) is this machine's too: checked once
        per announcement, before the next stage, so that stage does not meet it again."""
        try:
            announced = text(self.connection.get(keys.host_fault(self.host)))
        except redis.RedisError:
            return False
        if not announced or announced == self._host_fault_seen:
            return False
        self._host_fault_seen = announced
        problem = self._problem()
        if problem is None:
            self.log.info("Worker %s: another worker of this host met a machine fault (%s); this worker's health "
                          "check passed, so it goes on", self.worker_name, announced.partition("|")[2])
            return False
        self.log.error("Worker %s: another worker of this host met a machine fault, and this one finds it too (%s); "
                       "taking no work until the machine is healthy again", self.worker_name, problem)
        self._pause(problem)
        return True

    def healthy_again(self) -> bool:
        """While paused: try the machine now and then; True once nothing is wrong with it."""
        if time.monotonic() < self._next_check:
            return False
        problem = self._problem()
        if problem:
            if problem != self.paused:
                self.log.error("Worker %s: still taking no work: %s; trying again every %.0f s", self.worker_name,
                               problem, HEALTH_CHECK_EVERY_S)
            with contextlib.suppress(redis.RedisError):  # the host's other workers keep checking before work
                self.connection.expire(keys.host_fault(self.host), HOST_FAULT_TTL_S)
            self._pause(problem)
            return False
        self.log.info("Worker %s: the machine passed its health check; taking work again", self.worker_name)
        self.paused, self._disk_need = "", 0
        self.write_record("idle")
        return True

    def _pause(self, reason: str) -> None:
        self.paused, self._next_check = reason, time.monotonic() + HEALTH_CHECK_EVERY_S
        self.write_record("paused")

    def _problem(self) -> str | None:
        return machine_problem(self.settings, gpu=self.has_gpu, faults=parse_faults(self.settings.fault_inject),
                               keep_alive=lambda: self.write_record(None), need_bytes=self._disk_need)
