"""reference-api-buddy: a caching, rate-limiting HTTP proxy for reference APIs, as a Flask app factory."""
from __future__ import annotations

import os
from typing import Any, Mapping

import redis
from flask import Flask

from buddy import extension
from buddy.extension import Buddy, key_origin
from buddy.http_errors import register_error_handlers
from buddy.lifecycle import close_all as shutdown_live_apps
from buddy.logs import configure_logging
from buddy.settings import load_settings

__version__ = "0.4.0"
__all__ = ["create_app", "Buddy", "CachingProxy", "shutdown_live_apps", "__version__"]


def create_app(
    config: Mapping[str, Any] | None = None,
    *,
    redis_client: redis.Redis | None = None,
    environ: Mapping[str, str] | None = None,
) -> Flask:
    """Build the proxy app: settings from defaults, BUDDY_CONFIG, environment, then `config`."""
    environ = os.environ if environ is None else environ
    settings = load_settings(config, environ)
    configure_logging(settings.logging)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.server.max_request_body
    app.url_map.merge_slashes = False  # `/x//y` must reach the upstream as sent, not be redirected
    app.url_map.strict_slashes = False
    extension.build(settings, redis_client, key_origin(settings, environ, config), __version__).init_app(app)

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
