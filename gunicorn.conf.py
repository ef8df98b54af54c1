"""gunicorn settings: bind and workers from the config (overridable on the command line), embedded Redis hooks.

With no Redis configured, the master starts the embedded redis-server before the workers fork and stops it on exit.
"""
import os
import sys

from buddy.access import exposure_warning
from buddy.embedded import EmbeddedRedis
from buddy.errors import ConfigError
from buddy.logs import gunicorn_logconfig
from buddy.settings import load_settings

try:
    _settings = load_settings()
except ConfigError as _exc:
    print(f"reference-api-buddy: {_exc}", file=sys.stderr)
    raise SystemExit(2)

bind = [f"{_settings.server['host']}:{_settings.server['port']}"]
loglevel = _settings.logging["level"].lower()
logconfig_dict = gunicorn_logconfig(_settings.logging)  # the app's logging section, for gunicorn's error log too
workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
worker_class = "buddy.worker.DeadlineWorker"  # gthread whose main loop reads request heads (slow clients)
threads = int(os.environ.get("BUDDY_THREADS", "64"))
graceful_timeout = 10
timeout = 60


def on_starting(server):
    """In the master, before any worker exists: start (or join) the embedded Redis when none is configured.

    It is kept on the arbiter, not in this module: a SIGHUP re-executes this file, and on_exit must still
    find the server that this master started.
    """
    warning = exposure_warning(list(server.cfg.bind), _settings.security["require_secure_key"])
    if warning:
        server.log.warning(warning)
    # Workers inherit this: while Redis is down, each keeps 1/workers of every rate limit by itself.
    os.environ["BUDDY_WORKERS"] = str(server.cfg.workers)
    if _settings.redis["url"]:
        return
    embedded = server.buddy_embedded_redis = EmbeddedRedis(_settings.data_dir, _settings.redis["maxmemory"])
    if embedded.ensure():
        server.log.info("embedded Redis started: %s (data in %s)", embedded.url, embedded.data_dir)
    else:
        server.log.info("using the embedded Redis already running at %s", embedded.url)


def on_exit(server):
    """The master is leaving: save and stop the embedded Redis if this master started it."""
    embedded = getattr(server, "buddy_embedded_redis", None)
    if embedded is not None:
        embedded.stop()
