"""Keep the access key out of every log line: a filter on the handlers of the app's, gunicorn's and the root logger."""
from __future__ import annotations

import logging
from urllib.parse import quote, quote_plus

LOGGERS = ("", "buddy", "gunicorn.error", "gunicorn.access")
MASK = "[redacted]"


class SecretFilter(logging.Filter):
    """Replaces each known secret (and its URL-encoded forms) in a record's final message."""

    def __init__(self) -> None:
        super().__init__("buddy-secrets")
        self.secrets: set[str] = set()

    def add(self, secret: str) -> None:
        self.secrets |= {secret, quote(secret, safe=""), quote_plus(secret)}

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            if any(secret in message for secret in self.secrets):
                for secret in sorted(self.secrets, key=len, reverse=True):
                    message = message.replace(secret, MASK)
                record.msg, record.args = message, None
        return True


_filter = SecretFilter()


def redact_in_logs(secret: str) -> None:
    """From now on, no handler of the usual loggers writes `secret`; call again after handlers change."""
    _filter.add(secret)
    for name in LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if _filter not in handler.filters:
                handler.addFilter(_filter)
