"""The WSGI entry point for gunicorn (`gunicorn wsgi:app`) and for `flask buddy ...`."""
import sys

from buddy import create_app
from buddy.errors import ConfigError

try:
    app = create_app()
except ConfigError as exc:
    print(f"reference-api-buddy: {exc}", file=sys.stderr)
    raise SystemExit(3)  # gunicorn's "worker failed to boot": the master stops instead of respawning
