"""`stl disk`: what STL_HOME holds, and clearing its caches (never stage models or results)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from typer.testing import CliRunner

from cli.main import app
from cli.render import disk_rows, format_bytes
from jobs import keys
from jobs.disk import clear_caches, disk_usage
from jobs.settings import load_settings

if TYPE_CHECKING:
    from pathlib import Path

    import redis

runner = CliRunner()


def populate(home: Path) -> None:
    for relative, size in [("cache/tokens/a.safetensors", 1000), ("cache/index/b.safetensors", 24),
                           ("cache/inductor/fx/c.py", 3000), ("stages/s1/model/model.safetensors", 5000),
                           ("runs/r1/results.json", 10)]:
        path = home / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)


def test_usage_lists_caches_first_with_their_sizes(stl_env: Path) -> None:
    populate(stl_env)
    usage = {u.name: (u.files, u.bytes, u.clearable) for u in disk_usage(load_settings())}
    assert list(usage) == ["cache/inductor", "cache/tokens", "cache/index", "stages", "runs", "redis"]
    assert usage["cache/inductor"] == (1, 3000, True)
    assert usage["stages"] == (1, 5000, False) and usage["redis"] == (0, 0, False)
    rows = disk_rows(disk_usage(load_settings()))
    assert rows[-1][:3] == ["total", format_bytes(9034), "5"]
    assert [format_bytes(n) for n in (0, 1023, 1536, 5 * 2**30)] == ["0 B", "1023 B", "1.5 KiB", "5.0 GiB"]


def test_clearing_removes_only_the_caches_and_waits_for_idle_workers(stl_env: Path, conn: redis.Redis) -> None:
    populate(stl_env)
    conn.sadd(keys.RUNNING_STAGES, "some-stage")
    refused = runner.invoke(app, ["disk", "--clear-caches"])
    assert refused.exit_code == 1 and "1 stage(s) are running" in refused.stderr
    assert (stl_env / "cache" / "tokens" / "a.safetensors").is_file()

    conn.srem(keys.RUNNING_STAGES, "some-stage")
    result = runner.invoke(app, ["disk", "--clear-caches"])
    assert result.exit_code == 0, result.stderr
    assert "3.9 KiB in 3 file(s)" in result.stdout
    assert list((stl_env / "cache").iterdir()) == []
    assert (stl_env / "stages" / "s1" / "model" / "model.safetensors").is_file()
    assert (stl_env / "runs" / "r1" / "results.json").is_file()


def test_force_clears_under_running_stages(stl_env: Path) -> None:
    populate(stl_env)
    removed = clear_caches(load_settings(), running_stages=2, force=True)
    assert sum(u.files for u in removed) == 3
    assert not (stl_env / "cache" / "inductor").exists()
    populate(stl_env)  # --force needs no Redis: it does not ask which stages run
    result = runner.invoke(app, ["disk", "--clear-caches", "--force"], env={"STL_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.exit_code == 0, result.stderr
    assert not (stl_env / "cache" / "tokens").exists()


def test_the_table_needs_no_redis(stl_env: Path) -> None:
    populate(stl_env)
    result = runner.invoke(app, ["disk"], env={"STL_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.exit_code == 0, result.stderr
    assert "cache/tokens" in result.stdout and "stages" in result.stdout
