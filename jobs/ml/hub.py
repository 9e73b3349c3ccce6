"""What a failure to load a Hugging Face hub model means: a short reason, and the whole story for the log.

The short reason is the run's error in `stl status`, so it says what to do in a few words: a mistyped id
(the hub answers 404, or the id cannot be one), a gated model, a machine that cannot reach the hub. The
hub's own words, every exception of the chain, go to the stage's log (`stl logs`).
Errors are told apart by class name, so no hub library is imported here and its versions may differ.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from stl.jobs.errors import ModelError

DETAIL_PART_MAX = 600  # of each exception's message in the log: the hub's answers are a few lines each
# Exceptions that mean the request never reached the hub (DNS, refused, timed out, a proxy in the way).
_NETWORK = {"ConnectError", "ConnectTimeout", "ConnectionError", "gaierror", "TimeoutException", "Timeout",
            "ProxyError", "NetworkError", "ReadTimeout"}
_SERVER_TROUBLE = {408, 429, 500, 502, 503, 504}


def _chain(error: BaseException) -> list[BaseException]:
    """The error and what it was raised from (or while handling), outermost first."""
    found: list[BaseException] = []
    seen: BaseException | None = error
    while seen is not None and seen not in found and len(found) < 12:
        found.append(seen)
        seen = seen.__cause__ or seen.__context__
    return found


def _kinds(error: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(error).__mro__}


def _one_line(error: BaseException) -> str:
    detail = " ".join(str(error).split())
    if len(detail) > DETAIL_PART_MAX:
        detail = detail[:DETAIL_PART_MAX - 1] + "…"
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


def _status_code(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def hub_endpoint() -> str:
    """The hub this machine asks (HF_ENDPOINT: a mirror), as host[:port]."""
    url = os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co"
    return urlsplit(url).netloc or url


def hub_offline_mode() -> bool:
    return any(os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _reason(name: str, chain: list[BaseException]) -> tuple[str, str]:
    """(the short reason, a hint for the log) for a hub id that failed to load; ("", "") if not the hub's doing."""
    kinds = set().union(*(_kinds(e) for e in chain))
    text = " ".join(str(e) for e in chain)
    if "GatedRepoError" in kinds:
        return (f"model {name} is gated on the Hugging Face hub: accept its terms, then `hf auth login`",
                "log in on the worker's machine, as the user the worker runs as")
    if "RepositoryNotFoundError" in kinds or "is not a valid model identifier" in text:
        return (f"model {name} is not on the Hugging Face hub; check the id",
                "a private model needs `hf auth login` on the worker's machine")
    if "HFValidationError" in kinds:
        return f"model {name} is not a valid Hugging Face hub id; check the id", ""
    codes = {code for code in map(_status_code, chain) if code is not None}
    if codes & _SERVER_TROUBLE:
        return (f"the Hugging Face hub answered HTTP {min(codes & _SERVER_TROUBLE)} for model {name}; "
                "`stl retry` it later", "the hub library already retried for about half a minute")
    unreachable = bool(kinds & _NETWORK) or "LocalEntryNotFoundError" in kinds or "couldn't connect" in text
    if "OfflineModeIsEnabled" in kinds or unreachable and hub_offline_mode():  # not asked, rather than unreachable
        return (f"model {name} is not in the Hugging Face cache and HF_HUB_OFFLINE is set",
                "download it where there is network into this HF_HOME, or unset HF_HUB_OFFLINE")
    if unreachable:
        return (f"the worker looks offline: cannot reach the Hugging Face hub for model {name}",
                f"it tried {hub_endpoint()} for about half a minute; `stl retry` the run once the machine is online")
    return "", ""


def model_load_error(name: str, error: BaseException, *, hub_id: bool) -> ModelError:
    """The ModelError for a model that could not be loaded: a short reason for a hub id the hub refused or could
    not be asked about, with everything the loaders said in `detail`; otherwise their words, in one line."""
    chain = _chain(error)
    detail = " <- ".join(_one_line(e) for e in chain)
    reason, hint = _reason(name, chain) if hub_id else ("", "")
    if not reason:
        return ModelError(f"model {name} could not be loaded: {_one_line(error)}; check the id or path", detail=detail)
    return ModelError(reason, detail=f"{detail}{f' ({hint})' if hint else ''}")
