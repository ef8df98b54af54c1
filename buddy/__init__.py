"""reference-api-buddy: a caching, rate-limiting HTTP proxy for reference APIs, as a Flask app factory."""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import redis
from flask import Flask

from buddy.access import AccessControl
from buddy.coalesce import Coalescer
from buddy.counters import Counters
from buddy.extension import _LIVE, Buddy, connect_redis, key_origin, shutdown_live_apps
from buddy.fetcher import Fetcher
from buddy.hosts import HostCheck
from buddy.http_errors import register_error_handlers
from buddy.logs import configure_logging
from buddy.monitoring import MonitoringManager
from buddy.redis_keys import RedisKeys
from buddy.service import ProxyService
from buddy.settings import load_settings
from buddy.store import metrics as store_metrics
from buddy.store.connect import LazyCluster
from buddy.store.guard import BUG_TTL_SECONDS, StoreGuard
from buddy.store.key_failures import KeyFailures
from buddy.store.memory_cache import MemoryCache
from buddy.store.metrics import MetricsRecorder
from buddy.store.offline import OfflineSwitch
from buddy.store.rate_limiter import LocalLimiter, RateLimiter, WaitingRoom
from buddy.store.response_cache import ResponseCache
from buddy.store.secure_key import SecureKeyStore
from buddy.store.wakeup import WakeupHub
from buddy.upstream import UpstreamClient

__version__ = "0.4.0"
__all__ = ["create_app", "Buddy", "CachingProxy", "shutdown_live_apps", "__version__"]

log = logging.getLogger("buddy")


def create_app(
    config: Mapping[str, Any] | None = None,
    *,
    redis_client: redis.Redis | None = None,
    environ: Mapping[str, str] | None = None,
) -> Flask:
    """Build the proxy app: settings from defaults, BUDDY_CONFIG, environment, then `config`."""
    settings = load_settings(config, os.environ if environ is None else environ)
    configure_logging(settings.logging)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.server.max_request_body
    app.url_map.merge_slashes = False  # `/x//y` must reach the upstream as sent, not be redirected
    app.url_map.strict_slashes = False

    url, embedded = "(injected)", None
    if redis_client is None:
        redis_client, url, embedded = connect_redis(settings)
    keys = RedisKeys(settings.redis.prefix)
    guard = StoreGuard(
        probe=redis_client.ping,
        nodes=redis_client if isinstance(redis_client, LazyCluster) else None,  # a circuit per primary
        on_bug=lambda text: redis_client.set(keys.last_bug, text, ex=BUG_TTL_SECONDS),
    )
    metrics = MetricsRecorder(redis_client, guard, keys)
    hub = WakeupHub(redis_client, keys.fill_channel)
    memory = MemoryCache(settings.cache.l1_max_bytes, hub)  # used while the hub's subscription holds
    cache = ResponseCache(redis_client, guard, keys, {name: d.grace for name, d in settings.domains.items()}, memory)
    hub.listeners.append(cache.heard)  # a write or removal anywhere drops this worker's copy
    cache.on_memory_hit = lambda domain: metrics.count(domain, Counters.MEMORY_HITS)
    max_delay = settings.throttling.progressive_max_delay
    waiting = WaitingRoom(int(os.environ.get("BUDDY_THREADS", "64")))  # sleepers and followers alike
    offline = OfflineSwitch(redis_client, guard, keys, settings.cache.offline)
    limiter = RateLimiter(redis_client, guard, keys, max_delay)
    fetcher = Fetcher(
        settings, UpstreamClient(settings.cache.max_cache_response_size), limiter,
        LocalLimiter(max_delay, int(os.environ.get("BUDDY_WORKERS", "1"))), waiting, metrics, offline,
    )
    service = ProxyService(
        settings, keys, cache, fetcher,
        Coalescer(redis_client, guard, keys, hub, relay_limit=settings.cache.max_relay_size, waiting=waiting),
        limiter, metrics, offline,
    )
    secure_key = SecureKeyStore(redis_client, guard, keys, settings.security.secure_key)
    security = settings.security
    failures = KeyFailures(security.max_key_failures, security.key_lockout_max_seconds, client=redis_client,
                           guard=guard, keys=keys, log_events=security.log_security_events)
    access = AccessControl(security.require_secure_key, secure_key.get, security.log_security_events, failures)
    monitoring = MonitoringManager(redis_client, guard, keys, settings, cache, url, __version__, service.offline)
    if embedded is not None:
        monitoring.redis.embedded_problem = embedded.problem  # health says why it cannot run, in every worker
    hosts = HostCheck(settings, log_events=settings.security.log_security_events)
    buddy = Buddy(settings, redis_client, service, access, secure_key, monitoring, hosts, embedded,
                  key_origin=key_origin(settings, os.environ if environ is None else environ, config))
    app.extensions["buddy"] = buddy
    _LIVE.add(buddy)
    hub.start()  # subscribe now (this runs in each worker after the fork), not on the first wait
    metrics.start()
    if store_metrics.IN_WORKER:  # a gunicorn worker; a `flask buddy` command loads the same wsgi.py, and is none
        buddy.serving()

    from buddy import admin, cli, dashboard, views

    register_error_handlers(app)
    app.register_blueprint(admin.bp)
    app.register_blueprint(dashboard.bp)  # its page and login answer without a key; admin.bp's routes need one
    app.register_blueprint(views.bp)
    from buddy.fastpath import HitPath

    # The Host check, then fresh hits, skip Flask's request handling.
    app.wsgi_app = HitPath(app, app.wsgi_app)  # type: ignore[method-assign]
    app.cli.add_command(cli.group)
    return app


from buddy.caching_proxy import CachingProxy  # noqa: E402  (it builds on create_app)
