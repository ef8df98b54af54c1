"""Apply the seed's `logging` section to the `buddy` loggers: level, format, console, rotating file, parent logger."""
from __future__ import annotations

import logging
import logging.handlers
import sys
from typing import Any

from gunicorn import glogging

from buddy.settings import LoggingSettings

_MARK = "_buddy_handler"


def configure_logging(section: LoggingSettings) -> logging.Logger:
    """Configure `buddy` once per call; handlers from an earlier call are replaced, not stacked."""
    logger = logging.getLogger("buddy")
    logger.setLevel(section.level)
    for handler in [h for h in logger.handlers if getattr(h, _MARK, False)]:
        logger.removeHandler(handler)
        handler.close()
    if section.parent_logger:
        # Hand records to the host application's logger and let its handlers decide where they go.
        logger.parent = logging.getLogger(section.parent_logger)
        logger.propagate = True
        return logger
    formatter = logging.Formatter(section.format, section.date_format)
    handlers: list[logging.Handler] = []
    if section.enable_console:
        handlers.append(logging.StreamHandler(sys.stderr))
    if section.enable_file and section.file_path:
        handlers.append(logging.handlers.RotatingFileHandler(
            section.file_path, maxBytes=section.max_file_size, backupCount=section.backup_count
        ))
    for handler in handlers:
        setattr(handler, _MARK, True)
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    logger.propagate = not handlers
    return logger


def gunicorn_logconfig(section: LoggingSettings) -> dict[str, Any]:
    """gunicorn's `logconfig_dict`: its error log gets the same level, format, console and file as the app."""
    handlers: dict[str, dict[str, Any]] = {}
    if section.enable_console:
        handlers["buddy_console"] = {"class": "logging.StreamHandler", "formatter": "buddy", "stream": "ext://sys.stderr"}
    if section.enable_file and section.file_path:
        handlers["buddy_file"] = {
            "class": "logging.handlers.RotatingFileHandler", "formatter": "buddy", "filename": section.file_path,
            "maxBytes": section.max_file_size, "backupCount": section.backup_count,
        }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"buddy": {"format": section.format, "datefmt": section.date_format}},
        "handlers": handlers,
        "root": {"level": "WARNING", "handlers": []},
        "loggers": {"gunicorn.error": {"level": section.level, "handlers": list(handlers), "propagate": False}},
    }


class GunicornLogger(glogging.Logger):
    """gunicorn's logger, told what our `logconfig_dict` configures: its error log only. gunicorn takes any
    logging config to mean an access log may be wanted, and builds an access record for every request (about
    a fifth of a cache hit's time) only to drop it; here access logging is on only when asked for
    (`--access-logfile`, or syslog)."""

    def _compute_access_log_enabled(self) -> bool:
        cfg = self.cfg
        return bool(cfg.accesslog or (cfg.syslog and not cfg.disable_redirect_access_to_syslog))
