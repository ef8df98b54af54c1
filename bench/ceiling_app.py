"""The ceiling for this stack (used by bench/hits.py): a bare Flask app whose only route is one Redis GET.

The body stored under `ceiling:<request target>` is answered as it is; anything else is a 404.
Run: CEILING_REDIS_URL=redis://... gunicorn -k gthread -w 4 --threads 32 ceiling_app:app  (from bench/)
"""
from __future__ import annotations

import os

import redis
from flask import Flask, Response, request

app = Flask(__name__)
store = redis.Redis.from_url(os.environ["CEILING_REDIS_URL"], socket_timeout=5, socket_connect_timeout=5)


@app.route("/<path:_>")
def cached(_: str) -> Response:
    body = store.get("ceiling:" + request.environ["RAW_URI"])
    if body is None:
        return Response(status=404)
    return Response(body, content_type="application/json")
