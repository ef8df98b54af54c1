"""The WSGI entry point for gunicorn (`gunicorn wsgi:app`) and for `flask buddy ...`."""
from buddy import create_app

app = create_app()
