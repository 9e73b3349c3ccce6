"""Every install the project ships runs every stage kind.

A fresh virtual environment gets exactly the Dockerfile's install steps (read from the Dockerfile, so the
two cannot drift), and before that a plain `pip install .` with no extras, as users type it. In each, that
venv's own `stl` runs a grid of MTL -> few-shot -> eval on a local saved model, against a private
redis-server, with an environment holding nothing of the development venv's (no PYTHONPATH, no dev tools).
pip may reach PyPI, as CI can; stl itself runs offline (HF_HUB_OFFLINE=1). The two grid tests are slow
(the venv build takes a minute or two); CI runs them like every slow test.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import venv
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from stl.jobs.ml.demo_dataset import DEMO_FILE
from tests.conftest import REPO
from tests.helpers import TASKS, small_grid

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import redis

    from tests.conftest import RedisServer

PIP_TIMEOUT_S = 600
GRID_TIMEOUT_S = 300
SHOTS = [0, 4]


def pip_installs_in(dockerfile: Path) -> list[list[str]]:
    """The arguments of every `pip install` the Dockerfile's RUN lines run, in order."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())  # join continued lines
    installs = []
    for line in text.splitlines():
        if not re.match(r"\s*RUN\s", line, re.IGNORECASE):
            continue
        for command in re.split(r"&&|;|\|\|", line.strip()[3:]):
            words = shlex.split(command)
            for i, word in enumerate(words):
                if Path(word).name in ("pip", "pip3") and words[i + 1 : i + 2] == ["install"]:
                    installs.append(words[i + 2 :])
                    break
    return installs


def is_project_install(arguments: list[str]) -> bool:
    """Whether a `pip install` installs the project itself (`.`, `-e .`, `.[extra]`)."""
    return any(argument == "." or argument.startswith(".[") for argument in arguments)


def dockerfile_install_steps() -> tuple[list[list[str]], list[str]]:
    """(the pip installs before the project's, the project's own), as the Dockerfile runs them."""
    installs = pip_installs_in(REPO / "Dockerfile")
    project = [i for i, arguments in enumerate(installs) if is_project_install(arguments)]
    if len(project) != 1:
        pytest.fail(f"expected one `pip install` of the project (`.`) in the Dockerfile, found {len(project)} among "
                    f"{installs}; update tests/test_install.py to read the Dockerfile's install line")
    return installs[: project[0]], installs[project[0]]


def cpu_torch_requirement() -> str:
    """The Makefile's TORCH_CPU pin (torch==X+cpu lies on local disk here; see `FreshVenv.build`)."""
    found = re.search(r"^TORCH_CPU\s*\??=\s*(\S+)", (REPO / "Makefile").read_text(), re.MULTILINE)
    if found is None:
        pytest.fail("the Makefile defines no TORCH_CPU; update tests/test_install.py")
    return found.group(1)


def docker_context_filter() -> Callable[[str, list[str]], set[str]]:
    """A copytree `ignore` that leaves out what .dockerignore does (the subset of its syntax stl's uses)."""
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [line.strip("/") for line in lines if line and not line.startswith("#")]
    if any(pattern.startswith("!") for pattern in patterns):
        pytest.fail(".dockerignore has an exception (!pattern): teach tests/test_install.py to read it")

    def ignored(directory: str, names: list[str]) -> set[str]:
        relative = Path(directory).relative_to(REPO)
        return {name for name in names if any(
            fnmatch((relative / name).as_posix(), pattern)
            or (pattern.startswith("**/") and fnmatch(name, pattern[3:])) for pattern in patterns)}

    return ignored


def copy_project(target: Path) -> Path:
    """The project's files as `COPY . /opt/stl` puts them in the image: the build context."""
    shutil.copytree(REPO, target, ignore=docker_context_filter())
    return target


def without_python_settings(environment: dict[str, str]) -> dict[str, str]:
    """`environment` less whatever could put another environment's packages on sys.path."""
    hiding = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV", "CONDA_PREFIX")
    return {key: value for key, value in environment.items() if key not in hiding}


@dataclass
class FreshVenv:
    root: Path
    source: Path  # the copy of the project pip installs from (the image's /opt/stl)

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    def build(self) -> None:
        venv.EnvBuilder(with_pip=True, system_site_packages=False).create(self.root)
        before, _ = dockerfile_install_steps()
        for arguments in before:  # upgrading pip, as the image does
            self.pip_install(arguments)
        # The CPU build of torch first, as the Makefile does on a machine without an NVIDIA driver: the
        # project's bare `torch>=2.1` would otherwise fetch pip's default, a multi-GB CUDA build with its
        # nvidia-* wheels. Here (and on CI) the pinned CPU wheel lies on local disk. --no-compile: byte-
        # compiling all of torch takes a minute on two cores; only what runs gets compiled, when it runs.
        self.pip_install(["--no-compile", cpu_torch_requirement()])

    def pip_install(self, arguments: list[str]) -> None:
        environment = without_python_settings(dict(os.environ))
        environment["PATH"] = f"{self.bin}{os.pathsep}{environment.get('PATH', '')}"
        result = subprocess.run([str(self.bin / "python"), "-m", "pip", "install", "-q", *arguments],
                                cwd=self.source, env=environment, capture_output=True, text=True,
                                timeout=PIP_TIMEOUT_S, check=False)
        assert result.returncode == 0, f"pip install {shlex.join(arguments)} failed:\n{result.stderr[-4000:]}"

    def environment(self, **settings: str) -> dict[str, str]:
        """Only what stl needs: nothing of the development venv (no PYTHONPATH, its bin/ off PATH)."""
        kept = {key: os.environ[key] for key in ("TMPDIR", "LANG") if key in os.environ}
        return {**kept, "PATH": f"{self.bin}{os.pathsep}/usr/bin{os.pathsep}/bin", "PYTHONUNBUFFERED": "1",
                "COLUMNS": "200", "OMP_NUM_THREADS": "1",  # two cores, shared: see tests/helpers.child_env
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **settings}

    def run(self, *args: str, environment: dict[str, str], cwd: Path,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(self.bin / args[0]), *args[1:]], cwd=cwd, env=environment, capture_output=True,
                                text=True, timeout=timeout, check=False)
        assert result.returncode == 0, f"{shlex.join(args)} failed ({result.returncode}):\n{result.stderr[-6000:]}"
        return result

    def importable(self, module: str, environment: dict[str, str], cwd: Path) -> bool:
        probe = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
        return subprocess.run([str(self.bin / "python"), "-c", probe], cwd=cwd, env=environment,
                              timeout=60, check=False).returncode == 0


@pytest.fixture(scope="module")
def plain_venv(tmp_path_factory: pytest.TempPathFactory) -> FreshVenv:
    """A fresh venv with torch and `pip install .`: no extras."""
    work = tmp_path_factory.mktemp("install")
    fresh = FreshVenv(root=work / "venv", source=copy_project(work / "stl"))
    fresh.build()
    fresh.pip_install(["--no-compile", "."])  # as users type it (--no-compile changes what runs, not what is there)
    return fresh


@pytest.fixture(scope="module")
def dockerfile_venv(plain_venv: FreshVenv) -> FreshVenv:
    """The same venv after the Dockerfile's own install line: what the image holds (the plain install's
    packages are a subset of it, so building on them saves a second torch install)."""
    _, project_install = dockerfile_install_steps()
    plain_venv.pip_install(project_install)
    return plain_venv


@dataclass
class Inputs:
    data: Path
    model: Path


@pytest.fixture(scope="module")
def grid_inputs(plain_venv: FreshVenv, tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    """stl's demo data and a local model folder written by stl's own save path, both made by that venv."""
    work = tmp_path_factory.mktemp("inputs")
    environment = plain_venv.environment(HOME=str(work))
    plain_venv.run("stl", "data", "demo", str(work / "data"), environment=environment, cwd=work)
    save = ("import sys; from pathlib import Path; "
            "from stl.jobs.ml.models import load_model_and_tokenizer, save_model; "
            "model, tokenizer = load_model_and_tokenizer('tiny:bart', device='cpu', seed=0); "
            "save_model(model, tokenizer, Path(sys.argv[1]))")
    plain_venv.run("python", "-c", save, str(work / "saved-bart"), environment=environment, cwd=work)
    return Inputs(data=work / "data" / DEMO_FILE, model=work / "saved-bart")


def run_grid_in(fresh: FreshVenv, inputs: Inputs, server: RedisServer, work: Path, name: str) -> None:
    """Enqueue, work off and read back an MTL -> few-shot -> eval grid with that venv's `stl` only."""
    work.mkdir()
    environment = fresh.environment(STL_REDIS_URL=server.url, STL_HOME=str(work / "stl-home"), STL_USER="alice",
                                    HOME=str(work), HF_HOME=str(work / "hf"))
    for tool in ("pytest", "ruff", "mypy"):  # the dev extra must not be what makes this run
        assert not fresh.importable(tool, environment, work), f"{tool} is installed: this venv is not a user's"
    grid = small_grid(work, inputs.data, name, models=[str(inputs.model)], mtl=["in-domain"], shots=SHOTS)
    fresh.run("stl", "enqueue", str(grid), environment=environment, cwd=work)
    worker = fresh.run("stl", "worker", "--burst", environment=environment, cwd=work, timeout=GRID_TIMEOUT_S)

    runs = json.loads(fresh.run("stl", "status", "--json", "--grid", name, environment=environment,
                                cwd=work).stdout)["runs"]
    assert sorted(run["cell"]["shots"] for run in runs) == SHOTS
    assert all(run["cell"]["mtl"] == "in-domain" for run in runs)
    failed = {run["id"]: run.get("error") for run in runs if run["status"] != "finished"}
    assert not failed, f"runs did not finish: {failed}\nworker:\n{worker.stderr[-6000:]}"

    results = json.loads(fresh.run("stl", "results", name, "--json", environment=environment, cwd=work).stdout)
    rows: dict[str, list[dict[str, Any]]] = {}
    for row in results["rows"]:
        rows.setdefault(row["run"], []).append(row)
    assert set(rows) == {run["id"] for run in runs}
    for run_rows in rows.values():
        assert sorted(row["task"] for row in run_rows) == sorted(TASKS["eval"])
        assert all(0.0 <= row["value"] <= 1.0 for row in run_rows)
    table = fresh.run("stl", "results", name, "--rows", environment=environment, cwd=work).stdout
    assert table.count(TASKS["eval"][0]) >= len(runs), table
    fresh.run("stl", "plot", *rows, "--out", str(work / "curves.png"), environment=environment, cwd=work)
    assert (work / "curves.png").stat().st_size > 0


@pytest.fixture
def private_redis(redis_server: RedisServer, conn: redis.Redis) -> Iterator[RedisServer]:
    yield redis_server  # `conn` flushed it: each install's runs start from an empty queue


@pytest.mark.slow
def test_plain_pip_install_runs_mtl_fewshot_eval(plain_venv: FreshVenv, grid_inputs: Inputs,
                                                  private_redis: RedisServer, tmp_path: Path) -> None:
    environment = plain_venv.environment(HOME=str(tmp_path))
    assert not plain_venv.importable("rq_dashboard", environment, tmp_path), (
        "the venv already holds the dashboard extra: this test must run before the Dockerfile's install")
    run_grid_in(plain_venv, grid_inputs, private_redis, tmp_path / "plain", "plain-install")


@pytest.mark.slow
def test_plain_install_puts_nothing_generic_at_the_top_of_site_packages(plain_venv: FreshVenv,
                                                                       tmp_path: Path) -> None:
    """stl's code installs as stl.cli, stl.jobs and stl.worker: another package's `jobs` or `cli` is safe.
    (RECORD's `..` entries are the `stl` script in the venv's bin/.)"""
    environment = plain_venv.environment(HOME=str(tmp_path))
    listing = ("import importlib.metadata as m; "
               "print('\\n'.join(sorted({f.parts[0] for f in m.files('stl') if f.parts[0] != '..'})))")
    top = plain_venv.run("python", "-c", listing, environment=environment, cwd=tmp_path).stdout.split()
    assert top == ["stl", "stl-0.1.0.dist-info"], top
    for generic in ("cli", "jobs", "worker"):
        assert not plain_venv.importable(generic, environment, tmp_path), f"`import {generic}` finds stl's code"
    assert plain_venv.importable("stl.jobs.queue.entry", environment, tmp_path)


@pytest.mark.slow
def test_dockerfile_install_runs_mtl_fewshot_eval(dockerfile_venv: FreshVenv, grid_inputs: Inputs,
                                                  private_redis: RedisServer, tmp_path: Path) -> None:
    environment = dockerfile_venv.environment(HOME=str(tmp_path))
    assert dockerfile_venv.importable("rq_dashboard", environment, tmp_path)  # the line did install its extra
    run_grid_in(dockerfile_venv, grid_inputs, private_redis, tmp_path / "dockerfile", "dockerfile-install")


def test_dockerfile_install_line_is_found() -> None:
    """The parser reads the image's real steps (and fails loudly, above, where it cannot)."""
    before, project = dockerfile_install_steps()
    assert is_project_install(project)
    assert all(not is_project_install(arguments) for arguments in before)


def test_image_leaves_out_the_host_venv_and_secrets() -> None:
    """A developer's .venv copied into the image would sit inside its venv, hiding a missing dependency."""
    left_out = docker_context_filter()(str(REPO), [".venv", ".env", ".git", "jobs", "pyproject.toml"])
    assert left_out == {".venv", ".env", ".git"}
    assert docker_context_filter()(str(REPO / "jobs"), ["__pycache__", "models.py"]) == {"__pycache__"}


# The python3 each Ubuntu release installs from its own archive (the Dockerfile's apt-get line).
UBUNTU_PYTHON = {"20.04": (3, 8), "22.04": (3, 10), "24.04": (3, 12), "26.04": (3, 14)}


def test_the_images_python_meets_requires_python() -> None:
    """The base image's apt python3 must satisfy pyproject's requires-python, or the image cannot install stl
    (no Docker daemon here builds it, so this reads the two files)."""
    import re
    import tomllib

    base = re.search(r"^FROM\s+\S+?ubuntu(\d+\.\d+)\s*$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert base, "the Dockerfile's FROM line names no ubuntu<version> image; update this test"
    assert base.group(1) in UBUNTU_PYTHON, f"add Ubuntu {base.group(1)}'s python3 version to UBUNTU_PYTHON"
    required = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(part) for part in re.fullmatch(r">=\s*(\d+)\.(\d+)", required).groups())  # type: ignore[union-attr]
    assert UBUNTU_PYTHON[base.group(1)] >= minimum, (base.group(1), required)
