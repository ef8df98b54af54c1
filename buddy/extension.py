"""The proxy's Flask extension: `Buddy`, every part one app wires together, built from the settings (`build`), started
and stopped as one (buddy.lifecycle); and every kind of background thread it runs, listed in one place."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import redis
from flask import Flask

from buddy.access import AccessControl
from buddy.background import Watched
from buddy.coalesce import Coalescer
from buddy.counters import Counters
from buddy.embedded import EmbeddedRedis
from buddy.errors import StoreUnavailable
from buddy.fetcher import Fetcher
from buddy.hosts import HostCheck
from buddy.lifecycle import Lifecycle
from buddy.malloc import TrimWatch
from buddy.monitoring import MonitoringManager
from buddy.redis_keys import RedisKeys
from buddy.service import ProxyService
from buddy.settings import Settings
from buddy.store import metrics as store_metrics
from buddy.store.connect import LazyCluster, close_client, connect
from buddy.store.guard import BUG_TTL_SECONDS, StoreGuard
from buddy.store.key_failures import KeyFailures
from buddy.store.memory_cache import MemoryCache
from buddy.store.metrics import MetricsRecorder
from buddy.store.offline import OfflineSwitch
from buddy.store.rate_limiter import LocalLimiter, RateLimiter, WaitingRoom
from buddy.store.response_cache import ResponseCache
from buddy.store.secure_key import GENERATED, KeySource, SecureKeyStore
from buddy.store.wakeup import WakeupHub
from buddy.upstream import UpstreamClient

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
    lifecycle: Lifecycle = field(default_factory=Lifecycle)

    def init_app(self, app: Flask) -> None:
        """Flask's extension habit: the app finds this in `app.extensions["buddy"]`; its parts start now and stop
        with shutdown(), or when the process leaves. A gunicorn worker serves from the start (see serving())."""
        app.extensions["buddy"] = self
        self.lifecycle.start()
        if store_metrics.IN_WORKER:  # a gunicorn worker; a `flask buddy` command loads the same wsgi.py, and is none
            self.serving()

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
        self.lifecycle.close()

    @property
    def closed(self) -> bool:
        return self.lifecycle.closed


def background_threads(service: ProxyService, access: AccessControl) -> dict[str, Watched]:
    """Every kind of background thread a worker runs, by the name /admin/health gives it. Each starts when first
    needed (the wake-ups and metrics as the app starts) and stops when the app is shut down; the memory trimmer
    starts as the worker does (before the app), and ends with it."""
    return {
        "wakeup": service.coalescer.hub.thread,  # the pub/sub subscriber: wakes waiters, drops copies in memory
        "redis_probe": service.cache.guard.prober,  # probes a Redis (or cluster primary) that stopped answering
        "metrics": service.metrics.thread,  # flushes this process's counters to Redis once a second
        "lock_keeper": service.coalescer.keeper.thread,  # extends the fill locks this process holds
        "upstream_watchdog": service.fetcher.upstream.watchdog.thread,  # ends upstream calls at their deadline
        "refreshers": service.refreshers,  # stale-while-revalidate: one short-lived thread per refresh
        "key_failures": access.failures.flusher,  # logs the refusals counted per client address, once a minute
        "malloc_trim": TrimWatch(),  # gives back the memory large answers used (buddy.malloc; the process's own)
    }


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


def build(
    settings: Settings, redis_client: redis.Redis | None = None, key_source: str = GENERATED, version: str = "",
) -> Buddy:
    """Every part of one app, each added to the app's lifecycle as it is built: they stop in reverse, so the
    threads first, then the counters' flush, the Redis connections, and the embedded Redis last."""
    lifecycle = Lifecycle()
    url, embedded = "(injected)", None
    if redis_client is None:
        redis_client, url, embedded = connect_redis(settings)
        if embedded is not None:
            lifecycle.add("the embedded Redis", stop=embedded.stop)  # left; stopped by the last process to leave
    client, keys = redis_client, RedisKeys(settings.redis.prefix)
    lifecycle.add("the Redis connections", stop=lambda: close_client(client))
    guard = StoreGuard(
        probe=client.ping,
        nodes=client if isinstance(client, LazyCluster) else None,  # a circuit per primary
        on_bug=lambda text: client.set(keys.last_bug, text, ex=BUG_TTL_SECONDS),
    )
    lifecycle.add("the Redis probe", stop=guard.stop)
    metrics = MetricsRecorder(client, guard, keys)
    lifecycle.add("the metrics flusher", start=metrics.start, stop=metrics.stop)  # its stop flushes what is left
    hub = WakeupHub(client, keys.fill_channel)
    # Subscribe as the app starts (in each worker, after the fork), not on the first wait.
    lifecycle.add("the wake-up subscriber", start=hub.start, stop=hub.stop)
    service = proxy_service(settings, client, guard, keys, metrics, hub)
    lifecycle.add("the lock keeper", stop=service.coalescer.keeper.stop)
    lifecycle.add("the upstream watchdog", stop=service.fetcher.upstream.watchdog.stop)
    lifecycle.add("the background refreshes", stop=service.refreshers.stop)
    secure_key = SecureKeyStore(client, guard, keys, settings.security.secure_key)
    access = access_control(settings, client, guard, keys, secure_key)
    lifecycle.add("the wrong-key log", stop=access.failures.stop)
    monitoring = MonitoringManager(client, guard, keys, settings, service.cache, url, version, service.offline,
                                   threads=background_threads(service, access))
    if embedded is not None:
        monitoring.redis.embedded_problem = embedded.problem  # health says why it cannot run, in every worker
    hosts = HostCheck(settings, log_events=settings.security.log_security_events)
    return Buddy(settings, client, service, access, secure_key, monitoring, hosts, embedded, key_source, lifecycle)


def proxy_service(
    settings: Settings, client: redis.Redis, guard: StoreGuard, keys: RedisKeys, metrics: MetricsRecorder,
    hub: WakeupHub,
) -> ProxyService:
    """The request flow and the stores it uses: caches (Redis, and this worker's memory), rate limits, the offline
    switch, the upstream client, the fill locks."""
    memory = MemoryCache(settings.cache.l1_max_bytes, hub)  # used while the hub's subscription holds
    cache = ResponseCache(client, guard, keys, {name: d.grace for name, d in settings.domains.items()}, memory)
    hub.listeners.append(cache.heard)  # a write or removal anywhere drops this worker's copy
    cache.on_memory_hit = lambda domain: metrics.count(domain, Counters.MEMORY_HITS)
    max_delay = settings.throttling.progressive_max_delay
    waiting = WaitingRoom(int(os.environ.get("BUDDY_THREADS", "64")))  # sleepers and followers alike
    offline = OfflineSwitch(client, guard, keys, settings.cache.offline)
    limiter = RateLimiter(client, guard, keys, max_delay)
    fetcher = Fetcher(
        settings, UpstreamClient(settings.cache.max_cache_response_size), limiter,
        LocalLimiter(max_delay, int(os.environ.get("BUDDY_WORKERS", "1"))), waiting, metrics, offline,
    )
    coalescer = Coalescer(client, guard, keys, hub, relay_limit=settings.cache.max_relay_size, waiting=waiting)
    return ProxyService(settings, keys, cache, fetcher, coalescer, limiter, metrics, offline)


def access_control(
    settings: Settings, client: redis.Redis, guard: StoreGuard, keys: RedisKeys, secure_key: SecureKeyStore,
) -> AccessControl:
    """Who may use the proxy: the access key (when required), and wrong keys slowed down per client address."""
    security = settings.security
    failures = KeyFailures(security.max_key_failures, security.key_lockout_max_seconds, client=client,
                           guard=guard, keys=keys, log_events=security.log_security_events)
    return AccessControl(security.require_secure_key, secure_key.get, security.log_security_events, failures)
