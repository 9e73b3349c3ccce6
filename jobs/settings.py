"""Settings, read from the environment in this one place."""

from __future__ import annotations

import getpass
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from stl.jobs.errors import UsageError

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
# A grid expanding to more runs than this is refused unless `stl enqueue --max-runs` raises it.
DEFAULT_MAX_RUNS = 10_000
# A training stage yields to a lighter user's waiting stage once it has run this long (stl.jobs.queue.preemption).
DEFAULT_PREEMPT_AFTER_S = 1800.0
MAX_USER_LENGTH = 32
USER_PATTERN = re.compile(rf"^[a-z0-9][a-z0-9_.-]{{0,{MAX_USER_LENGTH - 1}}}$")


def check_user_name(name: str, *, what: str) -> str:
    """`name` if it can name a user on the queue (it goes into queue and key names); else a UsageError."""
    if USER_PATTERN.match(name):
        return name
    if not name.strip():
        raise UsageError(f"{what} is blank; " + ("name the user" if what.startswith("--") else
                                                  "unset it to use your login name, or set it to a user name"))
    if len(name) > MAX_USER_LENGTH:
        reason = f"is {len(name)} characters long; at most {MAX_USER_LENGTH}"
    else:
        reason = ("is not a valid user name (lower-case letters, digits, '_', '.' and '-', starting with a "
                  "letter or digit)")
    raise UsageError(f'{what} "{name}" {reason}')


@dataclass(frozen=True)
class Settings:
    redis_url: str
    redis_url_explicit: bool
    home: Path
    user: str
    notify_cmd: str | None
    notify_url: str | None
    # Test-only fault injection, e.g. "oom_at_step=3" (see jobs/faults.py). Empty in normal use.
    fault_inject: str
    # Work horses delete a run's few-shot models once it finishes and no live run needs them.
    prune_finetune: bool = False
    # STL_USER was set (not the login name): where Redis has ACL users, it must name the Redis user.
    user_explicit: bool = False
    # STL_PREEMPT_AFTER: seconds a training stage runs before a lighter user's waiting stage may preempt it; 0: never.
    preempt_after_s: float = DEFAULT_PREEMPT_AFTER_S

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def stages_dir(self) -> Path:
        return self.home / "stages"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"


def _default_user() -> str:
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = "user"
    name = re.sub(r"[^a-z0-9_.-]", "-", name.lower()) or "user"
    return name[:MAX_USER_LENGTH]


def load_settings(*, own_redis: bool = False) -> Settings:
    """The settings. `own_redis`: the command runs on a Redis of its own (`stl demo`), so a blank STL_REDIS_URL,
    which it ignores anyway, is no error."""
    env = os.environ
    url = env.get("STL_REDIS_URL", "").strip()
    # Blank, not unset: never fall back to whatever runs on 6379.
    if "STL_REDIS_URL" in env and not url and not own_redis:
        raise UsageError("STL_REDIS_URL is set but blank; give it a Redis URL (redis://HOST:PORT/DB), "
                         "or unset it to use localhost:6379")
    try:
        # Stripped like the other settings: "/data/stl " from a copied line is not a folder named with a space.
        home = Path(env.get("STL_HOME", "").strip() or Path.home() / ".local" / "share" / "stl").expanduser().resolve()
    except (RuntimeError, OSError) as e:  # ~nosuchuser, a symlink loop
        raise UsageError(f"STL_HOME {env.get('STL_HOME', '')!r} cannot be used ({e}); set it to a folder's path") from e
    return Settings(
        redis_url=url or DEFAULT_REDIS_URL,
        redis_url_explicit=bool(url),
        home=home,
        user=(env.get("STL_USER") or _default_user()).strip(),
        notify_cmd=env.get("STL_NOTIFY_CMD") or None,
        notify_url=env.get("STL_NOTIFY_URL") or None,
        fault_inject=env.get("STL_FAULT_INJECT", ""),
        prune_finetune=_flag("STL_PRUNE_FINETUNE", env.get("STL_PRUNE_FINETUNE", "")),
        user_explicit=bool(env.get("STL_USER")),
        preempt_after_s=_seconds("STL_PREEMPT_AFTER", env.get("STL_PREEMPT_AFTER", ""), DEFAULT_PREEMPT_AFTER_S),
    )


def _seconds(name: str, value: str, default: float) -> float:
    """A duration setting: a number of seconds, 0 or more; unset or blank: `default`."""
    word = value.strip()
    if not word:
        return default
    try:
        seconds = float(word)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise UsageError(f"{name}={word!r} is not a number of seconds; set it to 0 or more (e.g. "
                         f"{default:.0f}), or unset it for the default ({default:.0f})")
    return seconds


def _flag(name: str, value: str) -> bool:
    """An on/off setting: 1, true, yes or on (any case) turn it on; 0, false, no, off or nothing leave it off."""
    word = value.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("", "0", "false", "no", "off"):
        return False
    raise UsageError(f"{name}={value.strip()!r} is neither on nor off; set it to 1 (on) or 0 (off)")
