"""Keep the access key out of every log line: a filter on the usual loggers and on every handler they have."""
from __future__ import annotations

import logging
from functools import lru_cache
from urllib.parse import quote, quote_plus

LOGGERS = ("", "buddy", "gunicorn.error", "gunicorn.access", "werkzeug")
MASK = "[redacted]"


class SecretFilter(logging.Filter):
    """Replaces each known secret (and its URL-encoded forms) in a record's final message."""

    def __init__(self) -> None:
        super().__init__("buddy-secrets")
        self.secrets: set[str] = set()

    def add(self, secret: str) -> None:
        self.secrets |= spellings(secret)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            if any(secret in message for secret in self.secrets):
                for secret in sorted(self.secrets, key=len, reverse=True):
                    message = message.replace(secret, MASK)
                record.msg, record.args = message, None
        return True


_filter = SecretFilter()


@lru_cache(maxsize=16)
def spellings(secret: str) -> frozenset[str]:
    """The forms in which a secret may appear in a request line: as is, and percent-encoded (either hex case)."""
    encoded = {quote(secret, safe=""), quote_plus(secret)}
    return frozenset({secret} | encoded | {_lower_hex(e) for e in encoded})


def _lower_hex(text: str) -> str:
    return "".join(part if i == 0 else part[:2].lower() + part[2:] for i, part in enumerate(text.split("%")))


def redact_in_logs(secret: str) -> None:
    """From now on no record of the usual loggers, nor any of their handlers, shows `secret`.

    The filter goes on each logger (records created there, e.g. werkzeug's or gunicorn's request lines)
    and on each of its handlers (records that propagate to them from child loggers).
    """
    _filter.add(secret)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            if _filter not in target.filters:
                target.addFilter(_filter)
