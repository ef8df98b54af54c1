"""The seed's logging section: a rotating file, a host application's parent logger, no stacked handlers."""
from __future__ import annotations

import logging

from buddy.logs import configure_logging
from buddy.settings import LoggingSettings, validate_config


def section(**values) -> LoggingSettings:
    return validate_config({"logging": values}).logging


def test_file_logging_uses_the_format_and_is_not_stacked(tmp_path) -> None:
    path = tmp_path / "buddy.log"
    for _ in range(2):
        configure_logging(section(enable_console=False, enable_file=True, file_path=str(path),
                                  format="%(levelname)s|%(name)s|%(message)s", level="DEBUG"))
    logging.getLogger("buddy.cache").debug("stored %s", "entry")
    for handler in logging.getLogger("buddy").handlers:
        handler.flush()
    assert path.read_text() == "DEBUG|buddy.cache|stored entry\n"


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_parent_logger_receives_the_records() -> None:
    host, collect = logging.getLogger("hostapp"), Collect()
    host.addHandler(collect)
    host.setLevel(logging.INFO)
    configure_logging(section(parent_logger="hostapp", level="INFO"))
    try:
        logging.getLogger("buddy.upstream").info("fetched")
        logging.getLogger("buddy.upstream").debug("below the level")
        assert [(r.name, r.getMessage()) for r in collect.records] == [("buddy.upstream", "fetched")]
        assert logging.getLogger("buddy").parent is host
    finally:
        host.removeHandler(collect)
        logging.getLogger("buddy").parent = logging.getLogger()
        configure_logging(section(enable_console=False))


def test_gunicorn_builds_access_records_only_when_an_access_log_is_asked_for() -> None:
    from gunicorn.config import Config

    from buddy.serve import gunicorn_options
    from buddy.settings import load_settings

    cfg = Config()
    for name, value in gunicorn_options(load_settings(environ={})).items():
        cfg.set(name, value)
    logger = cfg.logger_class(cfg)
    assert logger.access_log_enabled is False  # our logconfig_dict alone does not turn it on
    cfg.set("accesslog", "-")  # `gunicorn wsgi:app --access-logfile -`
    logger.setup(cfg)
    assert logger.access_log_enabled is True
