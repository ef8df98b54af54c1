"""`flask buddy ...`: the operator's commands (Flask finds the app through wsgi.py)."""
from __future__ import annotations

import click
from flask import current_app
from flask.cli import AppGroup

from buddy.errors import StoreUnavailable

group = AppGroup("buddy", help="Operate reference-api-buddy.")


@group.command("key")
def key_command() -> None:
    """Print the proxy's access key (configured, or generated once and kept in Redis) and nothing else."""
    try:
        click.echo(current_app.extensions["buddy"].secure_key.get())
    except StoreUnavailable as exc:
        raise click.ClickException(f"Redis is unavailable, so the generated key cannot be read: {exc}") from exc
