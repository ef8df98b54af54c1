"""Serving under gunicorn: one set of server defaults and hooks for `gunicorn wsgi:app` and for `api-buddy`.

`gunicorn.conf.py` (read by gunicorn from the project folder) and `ProxyApplication` (the console script's
gunicorn, from any folder) both take every setting from `gunicorn_options()`, so the two serve alike: the
same worker class, threads, timeouts, logging and embedded-Redis hooks.
"""
from __future__ import annotations

import atexit
import os
import sys
from importlib import metadata
from typing import Any, Mapping

from flask import Flask
from gunicorn.app.base import BaseApplication
from gunicorn.config import KNOWN_SETTINGS
from packaging.requirements import InvalidRequirement, Requirement

from buddy import __version__, malloc
from buddy.access import exposure_warning
from buddy.embedded import EmbeddedRedis
from buddy.errors import ConfigError
from buddy.hosts import BINDS_VARIABLE, describe
from buddy.logs import configure_logging, gunicorn_logconfig
from buddy.monitoring import redacted_url
from buddy.settings import Settings, load_settings
from buddy.store import metrics

WORKER_CLASS = "buddy.worker.DeadlineWorker"  # gthread whose main loop reads request heads (slow clients)
DEFAULT_WORKERS = 4  # WEB_CONCURRENCY overrides
DEFAULT_THREADS = 64  # BUDDY_THREADS overrides
CONFIG_EXIT = 2  # the master stops on a bad config; the systemd unit does not restart on it
BOOT_EXIT = 3  # gunicorn's "worker failed to boot": the master stops instead of respawning
# gunicorn 25.1+ opens a control socket at one path per user ($XDG_RUNTIME_DIR or ~/.gunicorn/gunicorn.ctl), so
# two proxies on one host (a team's shared box) would take each other's: `gunicornc` could act on the wrong one.
CONTROL_SOCKET = {"control_socket_disable": True} if any(
    setting.name == "control_socket_disable" for setting in KNOWN_SETTINGS) else {}


def settings_or_exit(overrides: Mapping[str, Any] | None = None) -> Settings:
    """The settings the proxy will run with; a bad config ends the process with one line per bad field."""
    try:
        return load_settings(overrides)
    except ConfigError as exc:
        print(f"reference-api-buddy: {exc}", file=sys.stderr)
        raise SystemExit(CONFIG_EXIT) from None


def gunicorn_problem(installed: str | None = None) -> str | None:
    """Why the installed gunicorn cannot run the proxy's worker, or None when it can.

    buddy.worker subclasses gunicorn's gthread worker and reaches into its connections and parser, which change
    between major releases; the range it was tested with is declared once, in pyproject.toml, and read here
    from the installed distribution's metadata (a source tree that was never installed is not checked)."""
    try:
        declared = metadata.requires("reference-api-buddy") or []
        installed = installed or metadata.version("gunicorn")
    except metadata.PackageNotFoundError:
        return None
    for line in declared:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if requirement.name == "gunicorn" and not requirement.specifier.contains(installed, prereleases=True):
            wanted = ",".join(str(s) for s in sorted(requirement.specifier, key=lambda s: s.operator[0] != ">"))
            return (f"gunicorn {installed} is installed, but the proxy's worker needs gunicorn{wanted} (it builds "
                    f"on gunicorn's threaded worker, whose internals change between releases): "
                    f"pip install 'gunicorn{wanted}'")
    return None


def gunicorn_options(settings: Settings) -> dict[str, Any]:
    """Every gunicorn setting the proxy sets, hooks included; command-line flags are applied after these.
    A gunicorn release the worker was not built for stops here, with one line naming the supported range."""
    problem = gunicorn_problem()
    if problem:
        print(f"reference-api-buddy: {problem}", file=sys.stderr)
        raise SystemExit(CONFIG_EXIT)
    hooks = ServerHooks(settings)
    return {
        "bind": [f"{settings.server.host}:{settings.server.port}"],
        "loglevel": settings.logging.level.lower(),
        "logconfig_dict": gunicorn_logconfig(settings.logging),  # the app's logging section, for gunicorn too
        "logger_class": "buddy.logs.GunicornLogger",  # no access records unless an access log is asked for
        "workers": int(os.environ.get("WEB_CONCURRENCY", str(DEFAULT_WORKERS))),
        "worker_class": WORKER_CLASS,
        "threads": int(os.environ.get("BUDDY_THREADS", str(DEFAULT_THREADS))),
        "graceful_timeout": 10,
        "timeout": 60,
        **CONTROL_SOCKET,
        "on_starting": hooks.on_starting,
        "when_ready": hooks.when_ready,
        "on_exit": hooks.on_exit,
        "post_fork": hooks.post_fork,
    }


class ServerHooks:
    """gunicorn's master hooks: warn about an exposed bind, start and supervise the embedded Redis, stop it.

    With no Redis configured, the master starts the embedded redis-server before the workers fork, restarts
    it if it dies, and stops it on exit.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def on_starting(self, server: Any) -> None:
        """In the master, before it binds: warn about an exposed bind, tell the workers how many they are."""
        warning = exposure_warning(list(server.cfg.bind), self.settings.security.require_secure_key)
        if warning:
            server.log.warning(warning)
        chosen = server.cfg.settings["worker_class"].get()
        if isinstance(chosen, str) and (chosen == "sync" or chosen.endswith("SyncWorker")) and server.cfg.threads > 1:
            # gunicorn turns `sync` with threads into gthread; `-k sync` asked for one request per worker at a time.
            server.cfg.set("threads", 1)
            server.worker_class = server.cfg.worker_class
            server.log.info("-k sync: one thread per worker (use the default worker for threads)")
        # Workers inherit these: while Redis is down, each keeps 1/workers of every rate limit by itself, and
        # each lets at most threads/2 requests wait on one mapping (`--threads` included).
        os.environ["BUDDY_WORKERS"] = str(server.cfg.workers)
        os.environ["BUDDY_THREADS"] = str(server.cfg.threads)
        os.environ[BINDS_VARIABLE] = ",".join(server.cfg.bind)  # its names are the proxy's own (buddy.hosts)

    def post_fork(self, server: Any, worker: Any) -> None:
        """In each worker, before it loads the app: it serves, so it reports itself as a worker from the start
        (an idle worker is still one of the proxy's; a `flask buddy` command never is); and its allocator gives
        back what large answers used (buddy.malloc)."""
        metrics.IN_WORKER = True
        malloc.tune()  # a large answer's memory goes back to the system once it is freed

    def when_ready(self, server: Any) -> None:
        """In the master, listening, before any worker forks: start (or join) the embedded Redis and supervise it.

        Not in on_starting: a start that fails to bind must leave nothing running. The master's thread restarts
        the server when it dies; workers never start one. It is kept on the arbiter, not here: a SIGHUP
        reloads the settings (and these hooks), and on_exit must still find the server this master supervises.
        """
        settings = self.settings
        self._introduce(server)
        if settings.redis.url:
            return
        configure_logging(settings.logging)  # the master's own `buddy.embedded` lines (restarts) look like the rest
        embedded = server.buddy_embedded_redis = EmbeddedRedis(settings.data_dir, settings.redis.maxmemory)
        atexit.register(embedded.stop)  # a master that dies of an error in its main loop never calls on_exit
        try:
            started = embedded.supervise()
        except RuntimeError as exc:
            server.log.error("%s", exc)
            raise SystemExit(1) from exc
        except OSError as exc:  # the data folder cannot be created or used: one line, not a traceback
            print(f"reference-api-buddy: {data_folder_problem(embedded, exc)}", file=sys.stderr, flush=True)
            raise SystemExit(CONFIG_EXIT) from None
        if not started:  # when it did start one, buddy.embedded said so
            server.log.info("using the embedded Redis already running at %s", embedded.url)

    def on_exit(self, server: Any) -> None:
        """The master is leaving: save and stop the embedded Redis, unless other processes still use it (or none
        runs: its data folder was deleted, and could not be made again)."""
        embedded = getattr(server, "buddy_embedded_redis", None)
        if embedded is not None:
            if embedded.stop():
                server.log.info("embedded Redis saved and stopped (data in %s)", embedded.data_dir)
            elif embedded.in_use():
                server.log.info("embedded Redis left running: another process still uses %s", embedded.data_dir)

    def _introduce(self, server: Any) -> None:
        """A few lines an operator needs at start-up: where it listens, with what, for which upstreams."""
        settings, cfg = self.settings, server.cfg
        server.log.info(
            "reference-api-buddy %s on %s: %d workers x %d threads (%s)",
            __version__, ", ".join(cfg.bind), cfg.workers, cfg.threads, cfg.worker_class_str.rsplit(".", 1)[-1],
        )
        config = os.environ.get("BUDDY_CONFIG")
        server.log.info(
            "config: %s; access key %s", os.path.abspath(config) if config else "built-in defaults",
            "required" if settings.security.require_secure_key else "NOT required",
        )
        url = settings.redis.url
        where = f"external {redacted_url(url)}" if url else f"embedded, data in {settings.data_dir}"
        server.log.info("redis: %s", where)
        server.log.info("%s", describe(settings, cfg.bind))
        for domain in settings.domains.values():
            server.log.info("mapping /%s/ -> %s", domain.name, domain.upstream)


def data_folder_problem(embedded: EmbeddedRedis, exc: OSError) -> str:
    """One line for an embedded-Redis data folder that cannot be created or written."""
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(embedded.data_dir) else ""
    return (f"cannot use the data folder {embedded.data_dir}: {exc.strerror or exc}{where}; set BUDDY_DATA_DIR "
            "to a folder this user can write (or REDIS_URL to use a Redis server instead)")


def load_app(overrides: Mapping[str, Any] | None = None) -> Flask:
    """The proxy app, as wsgi.py builds it; in a worker, a bad config stops gunicorn instead of respawning."""
    from buddy import create_app  # not at import time: gunicorn.conf.py imports this module in the master

    try:
        return create_app(overrides)
    except ConfigError as exc:
        print(f"reference-api-buddy: {exc}", file=sys.stderr)
        raise SystemExit(BOOT_EXIT) from None


class ProxyApplication(BaseApplication):
    """`api-buddy`'s gunicorn: `gunicorn_options()`, then the command's flags; no gunicorn.conf.py is read.

    `overrides` are config overrides (server.host, server.port, logging.level), applied in the master and in
    every worker; `flags` are gunicorn settings (workers, threads). A SIGHUP re-reads the config, as
    `gunicorn wsgi:app` does.
    """

    def __init__(self, overrides: Mapping[str, Any], flags: Mapping[str, Any]) -> None:
        self.overrides = dict(overrides)
        self.flags = dict(flags)
        super().__init__(prog="api-buddy")

    def load_config(self) -> None:
        self.cfg.set("default_proc_name", "api-buddy")
        self.cfg.set("config", None)  # no gunicorn.conf.py is read: the start-up log must not name one
        for name, value in {**gunicorn_options(settings_or_exit(self.overrides)), **self.flags}.items():
            self.cfg.set(name, value)

    def load(self) -> Flask:
        return load_app(self.overrides)


def serve(overrides: Mapping[str, Any], flags: Mapping[str, Any]) -> None:
    """Serve until stopped (SIGINT or SIGTERM), like `gunicorn wsgi:app` from the project folder."""
    ProxyApplication(overrides, flags).run()
