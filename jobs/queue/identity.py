"""Who you are on the queue: STL_USER (or your login name), unless Redis has ACL users, where it is the Redis user.

STL_USER is taken on trust: ownership guards against mistakes, not against attackers. Where a lab gives each
person their own Redis ACL user, the name Redis checked the password of is the one that counts, so no one can
cancel another's runs, or dodge fair share, by setting STL_USER. Only the commands that act as a user (enqueue,
cancel, retry, disk --prune) ask; a worker runs every user's stages, whatever user it logs in as.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import redis

from stl.jobs.codec import text
from stl.jobs.errors import UsageError
from stl.jobs.settings import check_user_name

if TYPE_CHECKING:
    from stl.jobs.settings import Settings

DEFAULT_ACL_USER = "default"  # the user of a connection that logs in with a password alone, or none


def redis_acl_user(conn: redis.Redis) -> str | None:
    """The Redis ACL user this connection is logged in as; None for Redis's `default` user (no ACL users set
    up, or a password alone) and for a Redis without ACL (before 6)."""
    try:
        name = text(conn.execute_command("ACL", "WHOAMI"))
    except redis.ResponseError as e:
        if "unknown command" in str(e).lower():  # Redis before 6, or ACL renamed away: no ACL users
            return None
        # Not allowed to ask (NOPERM): the connection logged in as the user its URL names, or as `default`.
        name = str(conn.connection_pool.connection_kwargs.get("username") or "")
    return None if name in ("", DEFAULT_ACL_USER) else name


def queue_user(conn: redis.Redis, settings: Settings, *, given: str | None = None) -> str:
    """The user to act as: `given` (--user), else STL_USER or the login name; where the connection logs in as
    a Redis ACL user, that user, and a different name asked for explicitly is refused."""
    claimed = given or settings.user
    acl_user = redis_acl_user(conn)
    if acl_user is None:
        return claimed
    try:
        check_user_name(acl_user, what="STL_REDIS_URL's Redis user")
    except UsageError as e:
        raise UsageError(f"{e}; where Redis has ACL users, the Redis user is who you are on the queue: log in as "
                         "a user whose name stl accepts") from None
    why = (f'STL_REDIS_URL logs in to Redis as ACL user "{acl_user}", and where Redis has ACL users the Redis '
           "user is who you are on the queue")
    login_as = f"or log in as {claimed} (STL_REDIS_URL=redis://{claimed}:PASSWORD@HOST:PORT/DB)"
    if given and given != acl_user:
        raise UsageError(f'--user is "{given}", but {why}; leave out --user, {login_as}')
    if settings.user_explicit and settings.user != acl_user:
        raise UsageError(f'STL_USER is "{settings.user}", but {why}; unset STL_USER (or set it to {acl_user}), '
                         f"{login_as}")
    return acl_user
