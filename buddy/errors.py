"""The proxy's short family of errors; register_error_handlers turns them into JSON responses."""
from __future__ import annotations


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
    """The upstream could not answer; `status` is the HTTP status the client gets."""

    status = 502

    def __init__(self, domain: str, message: str) -> None:
        self.domain = domain
        super().__init__(message)


class UpstreamUnavailable(UpstreamError):
    """Connection refused, reset, DNS or TLS failure: 502."""

    status = 502


class UpstreamTimeout(UpstreamError):
    """Connect or read timeout: 504."""

    status = 504


class CoalesceTimeout(BuddyError):
    """A request waited longer than `cache.coalesce_timeout_seconds` for an identical one to finish: 504."""

    def __init__(self, domain: str, waited: float) -> None:
        self.domain = domain
        super().__init__(f"waited {waited:.0f}s for an identical request to '{domain}' to finish")


class BadProxyRequest(BuddyError):
    """A request the proxy refuses to forward (traversal, absolute-form target, bad encoding): 400."""
