"""Who owns a run, told through the real CLI: what `--replace` may drop, and who you are on a Redis with ACL users.

Ownership guards against mistakes (a slip of `--replace` or `cancel --grid`), not against attackers: where Redis
has ACL users, the queue user is the Redis user, so it cannot be claimed by setting STL_USER.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest
import yaml

from stl.jobs import keys
from stl.jobs.codec import text
from stl.jobs.grid.parse import parse_grid
from tests.conftest import RedisServer, free_port
from tests.helpers import Workers, child_env, grid_done, run_statuses, small_grid, stl, wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    import redis



def owners(conn: redis.Redis, grid: str) -> dict[str, str]:
    """Each run of the grid, with its user."""
    return {run_id: text(conn.hget(keys.run(run_id), "user")) for run_id in run_statuses(conn, grid)}


# --- `stl enqueue --replace` and other users' runs ------------------------------------------------------


@pytest.mark.slow
def test_replace_without_force_keeps_other_users_finished_runs(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path, workers: Workers) -> None:
    # Alice owns the grid; Bob adds a seed to it with --force; a worker finishes both users' runs.
    alices_file = small_grid(tmp_path, demo_data, "shared", seeds=[0])
    bobs_file = small_grid(tmp_path, demo_data, "shared", filename="bobs.yaml", seeds=[0, 1])
    alice, bob = child_env(STL_USER="alice"), child_env(STL_USER="bob")
    assert stl("enqueue", str(alices_file), env=alice).returncode == 0
    result = stl("enqueue", str(bobs_file), "--force", env=bob)
    assert result.returncode == 0 and "queued 1 run(s)" in result.stdout, result.stderr
    (bobs_run,) = [r for r, user in owners(conn, "shared").items() if user == "bob"]
    workers.start(burst=True)
    wait_for(lambda: grid_done(conn, "shared"), timeout=180, what="both users' runs to end", diagnostics=workers.logs)
    assert set(run_statuses(conn, "shared").values()) == {"finished"}, workers.logs()
    bobs_log = stl("logs", bobs_run, env=bob)
    assert bobs_log.returncode == 0 and bobs_log.stdout.strip(), bobs_log.stderr

    # Alice edits her grid (more eval examples: every run's eval stage changes) and replaces it, without --force.
    grid = yaml.safe_load(alices_file.read_text())
    grid["eval"]["max_examples"] = 3
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(grid, sort_keys=False))
    result = stl("enqueue", str(edited), "--replace", env=alice)
    assert result.returncode == 0, result.stderr
    assert "dropped 1 run(s) of grid shared" in result.stdout, result.stdout
    assert any("kept 1 run " in line and "bob" in line for line in result.stdout.splitlines()), result.stdout
    assert "--force drops other users' runs too" in result.stdout, result.stdout
    # Bob's finished run is all there: its record, its place in the grid and the run index, its results, its log.
    assert text(conn.hget(keys.run(bobs_run), "status")) == "finished"
    assert conn.zscore(keys.grid_runs("shared"), bobs_run) is not None and conn.zscore(keys.RUNS, bobs_run) is not None
    assert conn.hlen(keys.run_results(bobs_run)) > 0
    assert stl("logs", bobs_run, env=bob).stdout == bobs_log.stdout
    runs = json.loads(stl("status", "--json", "--user", "bob", env=bob).stdout)["runs"]
    assert [(r["id"], r["status"]) for r in runs] == [(bobs_run, "finished")]
    # Alice's own old run went; her new one is queued.
    (new_run,) = [run.run_id for run in parse_grid(edited).runs]
    assert owners(conn, "shared") == {bobs_run: "bob", new_run: "alice"}

    # With --force, Alice's replace drops Bob's run too, as the README says.
    result = stl("enqueue", str(edited), "--replace", "--force", env=alice)
    assert result.returncode == 0 and "dropped 1 run(s) of grid shared" in result.stdout, result.stderr
    assert "kept" not in result.stdout
    assert not conn.exists(keys.run(bobs_run))
    assert owners(conn, "shared") == {new_run: "alice"}


def test_replace_without_force_keeps_other_users_queued_runs_and_says_so_first(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    alices_file = small_grid(tmp_path, demo_data, "shared", seeds=[0])
    bobs_file = small_grid(tmp_path, demo_data, "shared", filename="bobs.yaml", seeds=[0, 1, 2])
    alice, bob = child_env(STL_USER="alice"), child_env(STL_USER="bob")
    assert stl("enqueue", str(alices_file), env=alice).returncode == 0
    assert stl("enqueue", str(bobs_file), "--force", env=bob).returncode == 0
    bobs_runs = {r for r, user in owners(conn, "shared").items() if user == "bob"}
    assert len(bobs_runs) == 2
    grid = yaml.safe_load(alices_file.read_text())
    grid["eval"]["max_examples"] = 3
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(grid, sort_keys=False))

    # A plain enqueue is refused, and says what --replace would keep; so does a dry run.
    result = stl("enqueue", str(edited), env=alice)
    assert result.returncode == 2 and "already has 3 run(s) made with other settings" in result.stderr
    assert "(2 of them are other users': --replace keeps those, --replace --force drops them too)" in result.stderr
    written = conn.dbsize()
    result = stl("enqueue", str(edited), "--dry-run", "--replace", env=alice)
    assert result.returncode == 0, result.stderr
    assert any("--replace would" in line and "drop 1 run(s)" in line for line in result.stdout.splitlines())
    assert any("would keep 2 runs " in line and "bob" in line for line in result.stdout.splitlines())
    assert conn.dbsize() == written

    # Bob's queued runs stay queued, in the grid and in the queue; Alice's old run is canceled and gone.
    result = stl("enqueue", str(edited), "--replace", env=alice)
    assert result.returncode == 0, result.stderr
    assert "dropped 1 run(s) of grid shared" in result.stdout, result.stdout
    assert any("kept 2 runs " in line and "bob" in line for line in result.stdout.splitlines()), result.stdout
    assert {r: s for r, s in run_statuses(conn, "shared").items() if r in bobs_runs} == dict.fromkeys(bobs_runs,
                                                                                                         "queued")
    (alices_old,) = [run.run_id for run in parse_grid(alices_file).runs]
    assert not conn.exists(keys.run(alices_old))
    bobs_stages = {sid for r in bobs_runs for sid in json.loads(text(conn.hget(keys.run(r), "stages")))}
    assert {text(conn.hget(keys.stage(sid), "status")) for sid in bobs_stages} == {"queued"}


def test_an_enqueue_without_force_leaves_other_users_canceled_runs_theirs(
        stl_env: Path, conn: redis.Redis, tmp_path: Path, demo_data: Path) -> None:
    alice, bob = child_env(STL_USER="alice"), child_env(STL_USER="bob")
    assert stl("enqueue", str(small_grid(tmp_path, demo_data, "shared", seeds=[0])), env=alice).returncode == 0
    assert stl("enqueue", str(small_grid(tmp_path, demo_data, "shared", filename="bobs.yaml", seeds=[0, 1])),
               "--force", env=bob).returncode == 0
    (bobs_run,) = [r for r, user in owners(conn, "shared").items() if user == "bob"]
    assert stl("cancel", bobs_run, env=bob).returncode == 0
    # Alice adds seed 1 to her own file: its run is Bob's canceled one, which only --force takes over.
    both = small_grid(tmp_path, demo_data, "shared", filename="both.yaml", seeds=[0, 1])
    result = stl("enqueue", str(both), env=alice)
    assert result.returncode == 0, result.stderr
    assert "queued 0 run(s)" in result.stdout
    assert f"left 1 failed or canceled run(s) of other users as they are (e.g. {bobs_run})" in result.stdout
    record = {text(k): text(v) for k, v in conn.hgetall(keys.run(bobs_run)).items()}
    assert (record["user"], record["status"], record["error"]) == ("bob", "canceled", "canceled by bob")
    result = stl("enqueue", str(both), "--force", env=alice)
    assert result.returncode == 0 and "queued 1 run(s)" in result.stdout, result.stderr
    assert owners(conn, "shared")[bobs_run] == "alice"


# --- a Redis with ACL users: the Redis user is who you are ----------------------------------------------

PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw", "gpu": "gpu-pw", "carol": "carol-pw"}


def acl_url(server: RedisServer, user: str) -> str:
    return f"redis://{user}:{PASSWORDS[user]}@127.0.0.1:{server.port}/0"


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A lab's Redis: the default user is off, each person and the GPU worker has an ACL user of their own;
    carol's may not run ACL commands (so not ACL WHOAMI either)."""
    directory = tmp_path / "acl-redis"
    directory.mkdir()
    users: list[str] = ["--user", "default", "off"]
    for user, password in PASSWORDS.items():
        users += ["--user", user, "on", f">{password}", "~*", "&*", "+@all", *(["-acl"] if user == "carol" else [])]
    server = RedisServer(directory=directory, port=free_port(), username="alice", password=PASSWORDS["alice"],
                         extra_args=tuple(users))
    server.start()
    yield server
    server.kill()


def as_user(server: RedisServer, login: str, **extra: str) -> dict[str, str]:
    """An stl subprocess's environment, logged in to Redis as `login`, with STL_USER unset unless in `extra`."""
    env = child_env(STL_REDIS_URL=acl_url(server, login), **extra)
    if "STL_USER" not in extra:
        env.pop("STL_USER", None)
    return env


@pytest.mark.slow
def test_on_a_redis_with_acl_users_the_redis_user_is_who_you_are(
        acl_redis: RedisServer, tmp_path: Path, demo_data: Path, workers: Workers,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STL_HOME", str(tmp_path / "stl-home"))
    monkeypatch.delenv("STL_FAULT_INJECT", raising=False)
    conn = acl_redis.client()
    grid = small_grid(tmp_path, demo_data, "acl", seeds=[0, 1])
    (first, second) = [run.run_id for run in parse_grid(grid).runs]

    # Logged in as alice, claiming to be bob: every command that acts as a user refuses, writing nothing.
    claims_bob = as_user(acl_redis, "alice", STL_USER="bob")
    for args in (["enqueue", str(grid)], ["enqueue", str(grid), "--dry-run"], ["cancel", first], ["retry", first],
                 ["cancel", "--grid", "acl", "--force"], ["disk", "--prune", "all"]):
        result = stl(*args, env=claims_bob)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
        assert result.stderr.startswith('stl: STL_USER is "bob", but STL_REDIS_URL logs in to Redis as ACL user '
                                        '"alice"'), (args, result.stderr)
        assert "unset STL_USER (or set it to alice)" in result.stderr and "Traceback" not in result.stderr
        assert "alice-pw" not in result.stderr
        assert conn.dbsize() == 0, args
    result = stl("enqueue", str(grid), "--user", "bob", env=as_user(acl_redis, "alice"))
    assert result.returncode == 2 and result.stderr.startswith('stl: --user is "bob", but'), result.stderr
    assert conn.dbsize() == 0

    # STL_USER unset: alice is who the Redis user is, not the login name; STL_USER=alice is fine too.
    result = stl("enqueue", str(grid), env=as_user(acl_redis, "alice"))
    assert result.returncode == 0 and "queued 2 run(s) of grid acl for alice" in result.stdout, result.stderr
    assert owners(conn, "acl") == {first: "alice", second: "alice"}
    assert stl("cancel", second, env=as_user(acl_redis, "alice", STL_USER="alice")).returncode == 0
    # Bob, logged in as himself, cannot cancel her runs without --force, however his STL_USER is set.
    result = stl("cancel", first, env=as_user(acl_redis, "bob"))
    assert result.returncode == 1 and "owned by alice" in result.stderr, result.stderr
    assert text(conn.hget(keys.run(first), "status")) == "queued"
    # Carol may not ask Redis who she is: the user her URL logs in as is who she is.
    result = stl("retry", second, env=as_user(acl_redis, "carol", STL_USER="bob"))
    assert result.returncode == 2 and 'logs in to Redis as ACL user "carol"' in result.stderr, result.stderr
    result = stl("retry", second, env=as_user(acl_redis, "carol"))
    assert result.returncode == 1 and "refusing to retry 1 run(s) owned by alice" in result.stderr, result.stderr
    assert stl("retry", second, env=as_user(acl_redis, "alice")).returncode == 0

    # The GPU worker logs in as its own user, whatever STL_USER says, and runs alice's stages.
    worker = workers.start(burst=True, env=as_user(acl_redis, "gpu", STL_USER="someone-else"))
    wait_for(lambda: grid_done(conn, "acl"), timeout=180, what="alice's runs to end", diagnostics=workers.logs)
    wait_for(lambda: not worker.alive(), timeout=120, what="the burst worker to exit", diagnostics=workers.logs)
    assert worker.wait(timeout=1) == 0, workers.logs()
    assert set(run_statuses(conn, "acl").values()) == {"finished"}, workers.logs()
    status = stl("status", "--json", env=as_user(acl_redis, "bob"))
    assert {(r["user"], r["status"]) for r in json.loads(status.stdout)["runs"]} == {("alice", "finished")}


def test_a_redis_without_acl_takes_stl_user_on_trust(tmp_path: Path, demo_data: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Redis before 6 has no ACL command: one with ACL renamed away answers the same "unknown command".
    directory = tmp_path / "old-redis"
    directory.mkdir()
    server = RedisServer(directory=directory, port=free_port(), extra_args=("--rename-command", "ACL", ""))
    server.start()
    try:
        monkeypatch.setenv("STL_HOME", str(tmp_path / "stl-home"))
        env = child_env(STL_REDIS_URL=server.url, STL_USER="bob")
        result = stl("enqueue", str(small_grid(tmp_path, demo_data, "old")), env=env)
        assert result.returncode == 0 and "for bob" in result.stdout, result.stderr
        assert set(owners(server.client(), "old").values()) == {"bob"}
    finally:
        server.kill()
