"""When a service K2 depends on cannot be reached, say which, where, and what to change.

Every connection failure a user can fix by configuration surfaces as `Unreachable`, naming the
service, the URL tried and the `K2_*` setting that chose it; the CLIs print it without a traceback.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

LOCAL_STACK_HINT = 'for the local stack: eval "$(k2 stack env)"'


class Unreachable(RuntimeError):
    def __init__(self, service: str, url: str, setting: str, detail: str, hint: str = LOCAL_STACK_HINT) -> None:
        super().__init__(f"{service} could not be reached at {url}: {detail}. Set {setting} to where it runs"
                         + (f" ({hint})" if hint else "") + ".")
        self.service = service
        self.url = url
        self.setting = setting


def redacted(url: str) -> str:
    """`url` without its password, fit for an error message or a log line."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def is_transport_error(exc: BaseException) -> bool:
    """A connection-level failure of whichever HTTP stack a client uses (httpx, a vendored httpx2,
    requests): no answer at all, as opposed to an answer that says no."""
    if isinstance(exc, OSError | TimeoutError):
        return True
    return type(exc).__module__.split(".")[0].rstrip("0123456789") in ("requests", "httpx", "httpcore", "urllib3")
