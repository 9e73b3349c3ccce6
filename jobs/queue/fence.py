"""Fencing: a work horse writes for its stage only while no other horse has taken the stage since.

Each time a horse takes a stage's lease, the stage's generation (keys.stage_generation) goes up by one, and
the horse keeps the new value as its token. A horse frozen past its lease (SIGSTOP, a paused VM, a network
partition between hosts) may wake after another horse took the stage over and finished it: its token is then
stale, and every write it would make is refused. Redis writes go in a transaction that checks the token
first (WATCH, then MULTI); files are checked just before the rename that commits them (a checkpoint, the
model, the metrics), so a stale horse never replaces a newer horse's.

A generation below the token is not stale: Redis lost the last second of writes in a restart, the horse's
take among them (the lease heartbeat writes it back). Only a later take makes a horse stale.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import redis

from stl.jobs import keys
from stl.jobs.codec import text
from stl.jobs.errors import StageLeaseLost

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from redis.client import Pipeline


def generation_is_current(generation: bytes | str | None, token: int) -> bool:
    """Whether a horse holding `token` may still write, given the stage's generation as Redis returned it."""
    value = text(generation)
    return int(value) <= token if value.isdigit() else True


class StageFence:
    """One horse's claim on one stage: the generation it took the stage at."""

    def __init__(self, conn: redis.Redis, stage_id: str, token: int) -> None:
        self.conn = conn
        self.stage_id = stage_id
        self.token = token
        self.key = keys.stage_generation(stage_id)

    def stale(self) -> StageLeaseLost:
        return StageLeaseLost(f"stage {self.stage_id} was taken over by another work horse (its generation is past "
                              f"this horse's {self.token}: this one was frozen or cut off past its lease); this "
                              "copy stops without writing")

    def is_current(self) -> bool:
        return generation_is_current(self.conn.get(self.key), self.token)

    def check(self) -> None:
        """Raise StageLeaseLost if another horse took the stage since this one did; call it right before a
        write commits (a rename). Also if Redis stays unreachable (the connection retries for about a minute):
        a horse cut off from Redis may have been taken over, so it commits nothing and its stage resumes, once
        Redis is back, from the last checkpoint it did commit."""
        try:
            current = self.is_current()
        except redis.RedisError as e:
            raise StageLeaseLost(f"stage {self.stage_id}: Redis is unreachable ({e}), so this work horse cannot "
                                 "tell whether another took the stage over; it stops without committing, and the "
                                 "stage resumes from its last checkpoint once Redis is back") from e
        if not current:
            raise self.stale()

    def write(self, queue: Callable[[Pipeline], object]) -> list[Any]:
        """Run the commands `queue` puts on the pipeline as one transaction, only if this horse is still
        current when it commits. Returns their results; raises StageLeaseLost if it is not."""
        def attempt(pipe: Pipeline) -> None:
            if not generation_is_current(pipe.get(self.key), self.token):
                raise self.stale()
            pipe.multi()
            queue(pipe)

        # WATCH: a take between the check and EXEC aborts the transaction, and the check runs again.
        return cast("list[Any]", self.conn.transaction(attempt, self.key))


def eval_fenced(conn: redis.Redis, fence: StageFence | None, script: str, script_keys: Sequence[str],
                args: Sequence[Any]) -> Any:
    """A Lua script's answer; with a fence, run only while its horse is current (else StageLeaseLost)."""
    if fence is None:
        return conn.register_script(script)(keys=list(script_keys), args=list(args))
    # EVAL, not EVALSHA: a script not yet loaded would fail inside the transaction.
    return fence.write(lambda pipe: pipe.eval(script, len(script_keys), *script_keys, *args))[0]
