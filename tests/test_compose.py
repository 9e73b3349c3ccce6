"""docker-compose.yml: validated without a Docker engine (Debian's docker-compose config, else YAML)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def resolved_compose(tmp_path: Path) -> dict:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose); validated by YAML below")
    (tmp_path / ".env").write_text("REDIS_PASSWORD=s3cret-test\n")
    env = {k: v for k, v in os.environ.items() if k not in ("STL_DATA_ROOT", "REDIS_PASSWORD")}  # the defaults
    result = subprocess.run([tool, "--project-directory", str(REPO), "--env-file", str(tmp_path / ".env"),
                             "-f", str(REPO / "docker-compose.yml"), "config"],
                            capture_output=True, text=True, timeout=60, check=False, env=env)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def mounts(service: dict) -> set[tuple[str, str]]:
    """(source, target) of each volume, in either of compose's two spellings."""
    found = set()
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            found.add((volume.get("source", ""), volume["target"]))
        else:
            source, target = str(volume).split(":")[:2]
            found.add((source, target))
    return found


def loopback_only(ports: list) -> bool:
    """Whether every published port listens on 127.0.0.1 alone, in either of compose's two spellings."""
    return bool(ports) and all(
        port.get("host_ip") == "127.0.0.1" if isinstance(port, dict) else str(port).startswith("127.0.0.1:")
        for port in ports)


def test_compose_config_is_valid_and_complete(tmp_path: Path) -> None:
    config = resolved_compose(tmp_path)
    services = config["services"]
    assert set(services) == {"redis", "worker", "dashboard"}
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and "s3cret-test" in redis["command"]
    assert loopback_only(redis["ports"])
    assert ("redis-data", "/data") in mounts(redis)
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert worker["environment"]["STL_REDIS_URL"].startswith("redis://:s3cret-test@redis:6379")
    assert worker["environment"]["STL_HOME"] == "/stl"
    assert worker["environment"]["STL_PREEMPT_AFTER"] == "1800"  # set where the worker starts
    assert ("stl-home", "/stl") in mounts(worker)
    # grids name data and local models by host paths: the worker sees them at the same path, read-only
    assert ("/home", "/home") in mounts(worker)
    assert any(v == "/home:/home:ro" or (isinstance(v, dict) and v.get("source") == "/home" and v.get("read_only"))
               for v in worker["volumes"])
    grace = worker["stop_grace_period"]
    assert grace in ("5m", "5m0s", 300) or str(grace).startswith("5m")
    assert "rq-dashboard" in services["dashboard"]["command"]
    assert loopback_only(services["dashboard"]["ports"])  # rq-dashboard has no login


def test_compose_refuses_to_start_without_a_password(tmp_path: Path) -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed")
    (tmp_path / ".env").write_text("")
    result = subprocess.run([tool, "--project-directory", str(tmp_path), "-f", str(REPO / "docker-compose.yml"),
                             "config"], capture_output=True, text=True, timeout=60, check=False,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode != 0
    assert "REDIS_PASSWORD" in result.stderr


def test_compose_file_structure_without_the_tool() -> None:
    raw = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert raw["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert "stop_grace_period" in raw["services"]["worker"]
    assert "${STL_DATA_ROOT:-/home}:${STL_DATA_ROOT:-/home}:ro" in raw["services"]["worker"]["volumes"]


def test_redis_and_the_dashboard_listen_on_loopback_only() -> None:
    # Redis has a password, but rq-dashboard has no login at all: anyone who reaches it can delete jobs.
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    assert loopback_only(services["redis"]["ports"]) and loopback_only(services["dashboard"]["ports"])
    assert "ports" not in services["worker"]
