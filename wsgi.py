"""The WSGI entry point for gunicorn (`gunicorn wsgi:app`) and for `flask buddy ...`: the same app `api-buddy`
serves (a bad config stops gunicorn instead of respawning workers)."""
from buddy.serve import load_app

app = load_app()
