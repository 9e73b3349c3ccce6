"""What every command shares: turning errors into one line and an exit code, printing, settings, Redis."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING

import typer

from stl.jobs.codec import printable
from stl.jobs.errors import GridError, StlError, UsageError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import redis

    from stl.jobs.settings import Settings


@contextmanager
def handled() -> Iterator[None]:
    """Domain errors become one clear line on stderr and an exit code; never a traceback. A record in Redis that
    is not what stl writes is said in one line too, and the command goes on without it."""
    import redis

    from stl.jobs.queue.records import damaged_records_reported

    try:
        with damaged_records_reported(lambda line: echo(f"stl: {line}", err=True)):
            yield
        sys.stdout.flush()  # here, so that a reader gone away is met inside this block
    except BrokenPipeError:
        # The reader stopped early (`stl results --rows | head`): stop quietly, as a pipe's writer does.
        _discard_stdout()
        raise typer.Exit(141) from None
    except GridError as e:
        for line in e.problems:
            echo(one_line(line), err=True)
        raise typer.Exit(e.exit_code) from None
    except StlError as e:
        echo(f"stl: {one_line(str(e))}", err=True)
        raise typer.Exit(e.exit_code) from None
    except (redis.ConnectionError, redis.TimeoutError) as e:
        echo(f"stl: lost the connection to Redis ({e}); check that it is running and try again", err=True)
        raise typer.Exit(1) from None
    except redis.ResponseError as e:  # a key of stl's holds another type than stl writes there
        echo(f"stl: Redis refused a read ({one_line(str(e))}): a key of stl's holds a value stl did not write",
              err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except OSError as e:  # a file or folder the command was pointed at; the sites that know which say so first
        where = f" {e.filename}" if e.filename else ""
        echo(f"stl: cannot use{where}: {e.strerror or e}; check the path and its permissions", err=True)
        raise typer.Exit(2) from None


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that Python's flush at exit does not meet the closed pipe again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file (under a test's capture): nothing to flush at exit
        pass


def echo(message: str, *, err: bool = False) -> None:
    """Print a line of stl's: the names, paths and errors it quotes were written by others (a grid file,
    Redis), so their control characters are shown as escapes, never sent to the terminal."""
    typer.echo(printable(message, keep="\n\t"), err=err)


def one_line(message: str) -> str:
    """A message quoting user input (a path, a user name) that holds a line break is still one line."""
    return " ".join(message.splitlines())


def cli_settings(*, own_redis: bool = False) -> Settings:
    from stl.jobs.settings import check_user_name, load_settings

    settings = load_settings(own_redis=own_redis)
    check_user_name(settings.user, what="STL_USER")
    return settings


def connect_redis(settings: Settings) -> redis.Redis:
    from stl.jobs.queue.connection import connect

    return connect(settings)


def checked_user(settings: Settings, given: str | None) -> str:
    from stl.jobs.settings import check_user_name

    if given is not None and not given.strip():
        raise UsageError("--user is blank; name the user, or leave out --user to queue as STL_USER")
    return check_user_name(given or settings.user, what="--user" if given else "STL_USER")


def acting_user(conn: redis.Redis, settings: Settings, given: str | None = None) -> str:
    """Who a command that acts as a user acts as: a Redis ACL user, where there is one, overrides STL_USER."""
    from stl.jobs.queue.identity import queue_user

    return queue_user(conn, settings, given=given)


def print_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
