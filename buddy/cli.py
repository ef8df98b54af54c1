"""The operator's commands: `flask buddy ...` in the project folder, and `api-buddy`, which serves and runs the
same commands from any folder.

A command acts on the cache of a running proxy or on nothing: with no REDIS_URL, it joins the embedded Redis
of its data folder only while a proxy uses it, and otherwise says so and exits 1 without creating anything.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup, ScriptInfo

from buddy.counters import COLUMNS, Tally, Unit
from buddy.embedded import NotRunning, join_only
from buddy.errors import ConfigError, StoreUnavailable
from buddy.monitoring import redacted_url
from buddy.settings import SECTIONS, load_settings, read_config_file
from buddy.settings.reference import reference as settings_reference
from buddy.store.secure_key import GENERATED
from buddy.views import NAMESPACE


class _ActsOnARunningProxy(click.Group):
    """Turns the refusals of a command that found no proxy to act on into one message and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NotRunning as exc:
            raise click.ClickException(
                f"no proxy is running with the data folder {exc.data_dir}; nothing was changed. "
                "Run this command with the proxy's environment: BUDDY_DATA_DIR (or XDG_DATA_HOME) naming its data "
                "folder, REDIS_URL if it uses a Redis server, or its config file (--config or BUDDY_CONFIG)."
            ) from None
        except PermissionError as exc:
            raise click.ClickException(
                f"{exc.strerror}: {exc.filename}; run this command as the user the proxy runs as"
            ) from None


class OperatorGroup(_ActsOnARunningProxy, AppGroup):
    """`flask buddy`: its commands load the app (wsgi.py) joining the proxy's embedded Redis, never starting one."""


@click.group("buddy", cls=OperatorGroup,
             help="Operate reference-api-buddy: key, stats, clear-cache, offline, check-config, export, import.")
@click.pass_context
def group(ctx: click.Context) -> None:
    ctx.with_resource(join_only())


def _redis_down(exc: StoreUnavailable) -> click.ClickException:
    return click.ClickException(f"Redis is unavailable: {exc}")


@group.command("key")
def key_command() -> None:
    """Print the access key the running proxy accepts and nothing else; or say where to find it."""
    buddy = current_app.extensions["buddy"]
    store, configured = buddy.secure_key, buddy.settings.security.secure_key
    try:  # read, never generate: a key made up here would not be the one the proxy accepts
        source, stored = store.announced(), store.stored()
    except StoreUnavailable as exc:
        raise _redis_down(exc) from exc
    if source is not None and not source.required:
        raise click.ClickException("the running proxy requires no access key (security.require_secure_key is off)")
    if source is not None and source.origin != GENERATED:
        if configured:
            click.echo(configured)
            return
        raise click.ClickException(
            f"the running proxy takes its access key from {source.origin}, which this command does not have: run it "
            "with the proxy's environment (deploy/api-buddy-as-service key for the systemd service), or read it there"
        )
    if source is None and configured:  # no proxy has said where its key comes from: this config's is the best guess
        click.echo(configured)
        return
    if stored is None:
        url = buddy.monitoring.redis_url
        where = url if url.startswith("unix:") else redacted_url(url)
        raise click.ClickException(
            f"no access key to print: none is configured here and the proxy's Redis ({where}) holds no generated "
            "one. The proxy either does not require a key (security.require_secure_key), has not finished starting, "
            "or takes its key from BUDDY_SECURE_KEY: run this with its environment."
        )
    click.echo(stored)


def _namespace(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not NAMESPACE.fullmatch(value):
        raise click.BadParameter("1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


@group.command("clear-cache")
@click.argument("domain", required=False)
@click.option("--namespace", callback=_namespace, help="Only the entries stored under this X-Buddy-Namespace.")
def clear_cache_command(domain: str | None, namespace: str | None) -> None:
    """Remove the cached responses of DOMAIN, or of every domain (only those of one namespace with
    --namespace); shows progress."""
    buddy = current_app.extensions["buddy"]
    if domain is not None and domain not in buddy.settings.domains:
        raise click.BadParameter(f"not a configured domain; choose from {', '.join(sorted(buddy.settings.domains))}",
                                 param_hint="DOMAIN")
    try:
        cache = buddy.service.cache
        census = cache.census(max_age=0)  # how many there are, to size the progress bar
        for name in [domain] if domain else sorted(buddy.settings.domains):
            total = census.describe(name).entries
            with click.progressbar(length=total, label=f"clearing {name}", file=sys.stderr) as bar:
                removed = buddy.service.cache.clear(name, progress=bar.update, namespace=namespace)
            click.echo(f"{name}: {removed} entries removed" + (f" from namespace {namespace}" if namespace else ""))
    except StoreUnavailable as exc:
        raise _redis_down(exc) from exc


@group.command("offline")
@click.argument("state", type=click.Choice(["on", "off", "status", "reset"]), default="status")
def offline_command(state: str) -> None:
    """Switch offline mode for every worker and host on this Redis (within a second): `on` sends nothing to any
    upstream (hits and expired entries are served, a miss is a 504), `off` goes upstream again, `reset` goes back
    to the configured value (cache.offline, BUDDY_OFFLINE); `status` (the default) says which applies."""
    switch = current_app.extensions["buddy"].service.offline
    try:
        if state in ("on", "off"):
            switch.set(state == "on")
        elif state == "reset":
            switch.reset()
        on, source = switch.state()
    except StoreUnavailable as exc:
        raise _redis_down(exc) from exc
    click.echo(f"offline mode is {'on' if on else 'off'} ({source})")


@group.command("stats")
def stats_command() -> None:
    """A table per domain: entries, size, hit rate, upstream calls, calls avoided; then the counters the
    dashboard's table shows, for the whole proxy."""
    monitoring = current_app.extensions["buddy"].monitoring
    try:
        cache, upstream = monitoring.get_cache_stats(), monitoring.get_upstream_stats()
        total = Tally.sum(monitoring.tallies().values())
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
        cells = (cell.ljust(w) if i == 0 else cell.rjust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        click.echo("  ".join(cells))
    for i, column in enumerate(COLUMNS):
        figures = " · ".join(f"{_figure(total.shown(c), c.unit)} {c.label}" for c in column.counters)
        click.echo(("\nin all: " if i == 0 else "        ") + figures)


def _figure(value: float, unit: Unit) -> str:
    if unit is Unit.BYTES:
        return _size(value)
    return f"{value:.1f} s" if unit is Unit.MS else str(value)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@group.command("check-config", with_appcontext=False)
@click.argument("path", required=False, type=click.Path(dir_okay=False))
@click.option("--reference", is_flag=True,
              help="Print every setting instead (key, default, meaning) and the environment variables that set "
                   "one, in Markdown, as docs/configuration.md lists them; read no config.")
def check_config_command(path: str | None, reference: bool) -> None:
    """Validate PATH (or $BUDDY_CONFIG with the environment) and print the effective config, secrets redacted."""
    if reference:
        click.echo(settings_reference(), nl=False)
        return
    try:
        # The same order as the proxy's: the file, then the environment variables that set a setting.
        settings = load_settings(environ={**os.environ, "BUDDY_CONFIG": path} if path else os.environ)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    effective = {
        "domain_mappings": {name: {k: v for k, v in asdict(d).items() if k not in ("name", "scheme", "netloc",
                                                                              "base_path")}
                            for name, d in settings.domains.items()},
        **{name: asdict(getattr(settings, name)) for name in SECTIONS},
    }
    effective["security"]["secure_key"] = "***" if settings.security.secure_key else None
    effective["redis"].update(url=redacted_url(settings.redis.url) if settings.redis.url else None,
                              data_dir=str(settings.data_dir))
    click.echo(json.dumps(effective, indent=2, default=sorted))  # sets in one order, run after run
    click.echo("configuration is valid", err=True)


# -- api-buddy: the console script ------------------------------------------------------------------------------

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class ApiBuddy(_ActsOnARunningProxy):
    """`api-buddy`'s commands are `flask buddy`'s, looked up in `group` (so a command added there is here too)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return group.list_commands(ctx)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return group.get_command(ctx, name)


def _load_app_for_a_command() -> Any:
    from buddy import create_app

    try:
        return create_app()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(cls=ApiBuddy, invoke_without_command=True, subcommand_metavar="[COMMAND [ARGS]...]")
@click.option("--config", type=click.Path(exists=True, dir_okay=False),
              help="The config file, JSON or TOML (default: $BUDDY_CONFIG).")
@click.option("--host", help="Serve on this address (default: server.host, 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), help="Serve on this port (default: server.port, 8080).")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False),
              help="The proxy's and gunicorn's log level (default: logging.level, INFO).")
@click.option("--workers", type=click.IntRange(min=1), help="Worker processes (default: $WEB_CONCURRENCY, 4).")
@click.option("--threads", type=click.IntRange(min=1), help="Threads per worker (default: $BUDDY_THREADS, 64).")
@click.version_option(package_name="reference-api-buddy", message="%(prog)s %(version)s")
@click.pass_context
def main(ctx: click.Context, config: str | None, **flags: Any) -> None:
    """Serve reference-api-buddy under gunicorn, as `gunicorn wsgi:app` does in the project folder; or, with a
    COMMAND, operate the proxy that runs with the same config and environment.

    \b
      api-buddy --config cfg.json --port 8080      serve (Ctrl-C stops it, and the embedded Redis with it)
      api-buddy --config cfg.json stats            the proxy's numbers, per mapping
      api-buddy --config cfg.json clear-cache NAME
    """
    if config:
        try:  # read here first, so that a file it cannot read is blamed on --config, not on BUDDY_CONFIG
            read_config_file(config, source="--config")
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        os.environ["BUDDY_CONFIG"] = os.path.abspath(config)  # for the workers and the commands alike
    given = {name: value for name, value in flags.items() if value is not None}
    if ctx.invoked_subcommand is not None:
        if given:
            options = ", ".join(f"--{name.replace('_', '-')}" for name in given)
            raise click.UsageError(f"{options}: only for serving (api-buddy without a COMMAND)")
        ctx.obj = ScriptInfo(create_app=_load_app_for_a_command, set_debug_flag=False)
        ctx.with_resource(join_only())
        return
    overrides: dict[str, Any] = {}
    if "host" in given:
        overrides.setdefault("server", {})["host"] = given["host"]
    if "port" in given:
        overrides.setdefault("server", {})["port"] = given["port"]
    if "log_level" in given:
        overrides["logging"] = {"level": given["log_level"].upper()}
    from buddy.serve import serve  # gunicorn only when serving

    serve(overrides, {name: given[name] for name in ("workers", "threads") if name in given})


from buddy.archive import export_command, import_command  # noqa: E402  (the WARC commands, in their own module)

group.add_command(export_command)
group.add_command(import_command)
