"""gunicorn settings: bind and workers from the config (overridable on the command line), embedded Redis hooks.

With no Redis configured, the master starts the embedded redis-server before the workers fork, restarts it if it
dies, and stops it on exit.
"""
import atexit
import os
import sys

from buddy.access import exposure_warning
from buddy.embedded import EmbeddedRedis
from buddy.errors import ConfigError
from buddy.logs import configure_logging, gunicorn_logconfig
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
    """In the master, before it binds: warn about an exposed bind, tell the workers how many they are."""
    warning = exposure_warning(list(server.cfg.bind), _settings.security["require_secure_key"])
    if warning:
        server.log.warning(warning)
    # Workers inherit these: while Redis is down, each keeps 1/workers of every rate limit by itself, and
    # each lets at most threads/4 requests sleep for one mapping's slots (`--threads` included).
    os.environ["BUDDY_WORKERS"] = str(server.cfg.workers)
    os.environ["BUDDY_THREADS"] = str(server.cfg.threads)


def when_ready(server):
    """In the master, listening, before any worker forks: start (or join) the embedded Redis and supervise it.

    Not in on_starting: a start that fails to bind must leave nothing running. The master's thread restarts
    the server when it dies; workers never start one. It is kept on the arbiter, not in this module: a SIGHUP
    re-executes this file, and on_exit must still find the server that this master supervises.
    """
    if _settings.redis["url"]:
        return
    configure_logging(_settings.logging)  # the master's own `buddy.embedded` lines (restarts) look like the rest
    embedded = server.buddy_embedded_redis = EmbeddedRedis(_settings.data_dir, _settings.redis["maxmemory"])
    atexit.register(embedded.stop)  # a master that dies of an error in its main loop never calls on_exit
    try:
        started = embedded.supervise()
    except RuntimeError as exc:
        server.log.error("%s", exc)
        raise SystemExit(1) from exc
    if not started:  # when it did start one, buddy.embedded said so
        server.log.info("using the embedded Redis already running at %s", embedded.url)


def on_exit(server):
    """The master is leaving: save and stop the embedded Redis, unless other processes still use it."""
    embedded = getattr(server, "buddy_embedded_redis", None)
    if embedded is not None:
        embedded.stop()
