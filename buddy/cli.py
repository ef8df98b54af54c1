"""`flask buddy ...`: the operator's commands (Flask finds the app through wsgi.py in the working folder)."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

import click
from flask import current_app
from flask.cli import AppGroup

from buddy.errors import ConfigError, StoreUnavailable
from buddy.monitoring import redacted_url
from buddy.settings import load_settings

group = AppGroup("buddy", help="Operate reference-api-buddy: key, stats, clear-cache, check-config.")


def _redis_down(exc: StoreUnavailable) -> click.ClickException:
    return click.ClickException(f"Redis is unavailable: {exc}")


@group.command("key")
def key_command() -> None:
    """Print the proxy's access key (configured, or generated once and kept in Redis) and nothing else."""
    try:
        click.echo(current_app.extensions["buddy"].secure_key.get())
    except StoreUnavailable as exc:
        raise _redis_down(exc) from exc


@group.command("clear-cache")
@click.argument("domain", required=False)
def clear_cache_command(domain: str | None) -> None:
    """Remove the cached responses of DOMAIN, or of every domain; shows progress."""
    buddy = current_app.extensions["buddy"]
    if domain is not None and domain not in buddy.settings.domains:
        raise click.BadParameter(f"not a configured domain; choose from {', '.join(sorted(buddy.settings.domains))}",
                                 param_hint="DOMAIN")
    try:
        cache = buddy.service.cache
        for name in [domain] if domain else sorted(buddy.settings.domains):
            total = cache.guard.run(lambda: buddy.redis.zcard(buddy.service.keys.index(name)))
            with click.progressbar(length=total, label=f"clearing {name}", file=sys.stderr) as bar:
                removed = buddy.service.cache.clear(name, progress=bar.update)
            click.echo(f"{name}: {removed} entries removed")
    except StoreUnavailable as exc:
        raise _redis_down(exc) from exc


@group.command("stats")
def stats_command() -> None:
    """A table per domain: entries, size, hit rate, upstream calls, calls avoided."""
    monitoring = current_app.extensions["buddy"].monitoring
    try:
        cache, upstream = monitoring.get_cache_stats(), monitoring.get_upstream_stats()
    except StoreUnavailable as exc:
        raise _redis_down(exc) from exc
    rows = [("domain", "entries", "size", "hit rate", "upstream calls", "avoided", "saved")]
    for name, c in cache["by_domain"].items():
        rows.append((
            name, str(cache["entries_per_domain"][name]), _size(cache["cache_size_per_domain"][name]),
            f"{c['hit_rate']:.0%}", str(upstream["by_domain"][name]["total_requests"]),
            str(c["upstream_calls_avoided"]), f"{c['seconds_saved']:.1f} s",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    click.echo(f"\n{cache['hit_count']} hits, {cache['miss_count']} misses, {cache['coalesced_count']} coalesced; "
               f"{_size(cache['bytes_saved'])} and {cache['seconds_saved']:.1f} s of upstream time saved")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@group.command("check-config", with_appcontext=False)
@click.argument("path", required=False, type=click.Path(dir_okay=False))
def check_config_command(path: str | None) -> None:
    """Validate PATH (or $BUDDY_CONFIG with the environment) and print the effective config, secrets redacted."""
    try:
        # The same order as the proxy's: the file, then REDIS_URL, BUDDY_DATA_DIR and BUDDY_SECURE_KEY.
        settings = load_settings(environ={**os.environ, "BUDDY_CONFIG": path} if path else os.environ)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    effective = {
        "domain_mappings": {name: {k: v for k, v in asdict(d).items() if k not in ("name", "scheme", "netloc",
                                                                              "base_path")}
                            for name, d in settings.domains.items()},
        "server": dict(settings.server),
        "security": {**settings.security, "secure_key": "***" if settings.security["secure_key"] else None},
        "cache": dict(settings.cache),
        "throttling": dict(settings.throttling),
        "logging": dict(settings.logging),
        "redis": {**settings.redis, "url": redacted_url(settings.redis["url"]) if settings.redis["url"] else None,
                  "data_dir": str(settings.data_dir)},
    }
    click.echo(json.dumps(effective, indent=2, default=list))
    click.echo("configuration is valid", err=True)
