"""Test helpers that start real processes: redis-server, an upstream stub, gunicorn."""
