"""The proxy's short family of errors; register_error_handlers turns them into JSON responses."""
from __future__ import annotations

import errno


class BuddyError(Exception):
    """Base class for every error the proxy raises on purpose."""


class ConfigError(BuddyError):
    """The configuration is invalid; `problems` holds one line per bad field, named by its path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  " + "\n  ".join(self.problems))


class StoreUnavailable(BuddyError):
    """Redis could not be reached or answered with an error; callers serve without it."""


class UpstreamError(BuddyError):
    """The upstream could not answer; `status` is the HTTP status the client gets, `kind` names the failure."""

    status = 502

    def __init__(self, domain: str, message: str, kind: str = "unreachable") -> None:
        self.domain = domain
        self.kind = kind
        super().__init__(message)


class UpstreamUnavailable(UpstreamError):
    """Connection refused, reset, DNS or TLS failure, a malformed answer, a body that broke off: 502."""

    status = 502


class UpstreamTimeout(UpstreamError):
    """Connect or read timeout: 504."""

    status = 504


class BrokenBody(BrokenPipeError):
    """A body already on its way to the client cannot be finished: the upstream or the relay broke off.

    Raised from the body's iterator, so that the server closes the connection without the final chunk
    (or short of Content-Length): the only way left to tell the client the body is not whole. It is a
    BrokenPipeError (EPIPE) so that gunicorn and werkzeug close quietly rather than log a traceback;
    the proxy logs the cause itself.
    """

    def __init__(self, message: str) -> None:
        super().__init__(errno.EPIPE, message)


class CoalesceTimeout(BuddyError):
    """A request waited longer than `cache.coalesce_timeout_seconds` for an identical one to finish: 504."""

    def __init__(self, domain: str, waited: float) -> None:
        self.domain = domain
        super().__init__(f"waited {waited:.0f}s for an identical request to '{domain}' to finish")


class ClientGone(BuddyError):
    """The client hung up while its request waited for a rate-limit slot: the slot went back, nothing was sent."""

    def __init__(self, domain: str) -> None:
        self.domain = domain
        super().__init__(f"the client left while waiting for a slot of '{domain}'")


class BadProxyRequest(BuddyError):
    """A request the proxy refuses to forward (traversal, absolute-form target, bad encoding): 400."""
