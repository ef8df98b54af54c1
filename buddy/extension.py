"""The proxy's Flask extension: `Buddy`, every part one app wires together, and where its Redis comes from."""
from __future__ import annotations

import atexit
import logging
import os
import weakref
from dataclasses import dataclass
from typing import Any, Mapping

import redis

from buddy.access import AccessControl
from buddy.embedded import EmbeddedRedis
from buddy.errors import StoreUnavailable
from buddy.hosts import HostCheck
from buddy.monitoring import MonitoringManager
from buddy.service import ProxyService
from buddy.settings import Settings
from buddy.store.connect import close_client, connect
from buddy.store.secure_key import GENERATED, KeySource, SecureKeyStore

log = logging.getLogger("buddy")


@dataclass(eq=False)
class Buddy:
    """Everything one app instance wires together; lives in `app.extensions["buddy"]`."""

    settings: Settings
    redis: redis.Redis
    service: ProxyService
    access: AccessControl
    secure_key: SecureKeyStore
    monitoring: MonitoringManager
    hosts: HostCheck
    embedded: EmbeddedRedis | None = None
    key_origin: str = GENERATED  # where a configured access key was set (see key_origin)

    closed: bool = False

    def serving(self) -> None:
        """This process serves requests (a gunicorn worker, a CachingProxy): generate the access key now if one is
        needed, so that the log filter knows it before the first request is logged (an operator command never
        generates one), and say in Redis where the key comes from, for `api-buddy key`."""
        required = self.settings.security.require_secure_key
        try:
            if required:
                self.secure_key.get()
            self.secure_key.announce(KeySource(required, self.key_origin))
        except StoreUnavailable:
            if required:
                log.warning("the access key is in Redis, which is unreachable; requests get 503 until it is back")

    def shutdown(self) -> None:
        """Stop this app's threads, flush its counters, and leave the embedded Redis (stopping it if last).
        Called again (at exit, say), it does nothing."""
        if self.closed:
            return
        self.closed = True
        _LIVE.discard(self)
        self.service.coalescer.hub.stop()
        self.service.coalescer.keeper.stop()
        self.service.metrics.stop()
        self.service.fetcher.upstream.watchdog.stop()
        self.service.cache.guard.stop()
        self.access.failures.stop()
        close_client(self.redis)
        if self.embedded is not None:
            self.embedded.stop()



_LIVE: "weakref.WeakSet[Buddy]" = weakref.WeakSet()


@atexit.register
def shutdown_live_apps() -> None:
    """One exit hook for every app still open in this process: flush its counters, leave the embedded Redis."""
    for buddy in list(_LIVE):
        buddy.shutdown()


def key_origin(settings: Settings, environ: Mapping[str, str], config: Mapping[str, Any] | None) -> str:
    """Where the configured access key was set (the later sources win, as in load_settings), or GENERATED."""
    if not settings.security.secure_key:
        return GENERATED
    if ((config or {}).get("security") or {}).get("secure_key"):
        return "the configuration the program passed to the proxy"
    if environ.get("BUDDY_SECURE_KEY"):
        return "BUDDY_SECURE_KEY in the proxy's environment"
    return f"security.secure_key in {os.path.abspath(environ.get('BUDDY_CONFIG') or 'its config file')}"


def connect_redis(settings: Settings) -> tuple[redis.Redis, str, EmbeddedRedis | None]:
    """The configured Redis (one server, a Redis Cluster or a Sentinel service), or the embedded one for this data
    folder (started here if nobody runs it yet)."""
    url, embedded = settings.redis.url, None
    if not url:
        embedded = EmbeddedRedis(settings.data_dir, settings.redis.maxmemory)
        embedded.ensure()  # the app's shutdown() leaves it again; the last process to leave stops it
        url = embedded.url
    # One server, a Redis Cluster (made on first use) or Sentinel's primary, as the URL's scheme says; its commands
    # give up after the short command timeout, a blocking read after socket_timeout (see store.connect).
    return connect(url, settings.redis.socket_timeout, settings.redis.command_timeout), url, embedded
