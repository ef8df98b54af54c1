"""The operator's view on fakeredis: health, JSON metrics, Prometheus text, clearing, the CLI."""
from __future__ import annotations

import json
from typing import Any

import fakeredis
import pytest
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from buddy import create_app
from tests.support.upstream_stub import UpstreamStub


@pytest.fixture
def buddy_config(upstream: UpstreamStub) -> dict[str, Any]:
    return {
        "domain_mappings": {"up": {"upstream": upstream.url, "max_requests_per_minute": 100},
                            "other": {"upstream": upstream.url + "/other"}},
        "logging": {"enable_console": False},
    }


def flushed(app: Flask) -> Flask:
    app.extensions["buddy"].service.metrics.flush()
    return app


def test_metrics_count_hits_misses_entries_and_savings(app: Flask, client) -> None:
    for path in ("/up/a", "/up/a", "/up/a", "/up/b", "/other/c", "/up/status/500"):
        client.get(path)
    report = flushed(app).test_client().get("/admin/metrics").json
    cache, upstream = report["cache"], report["upstream"]
    assert (cache["hit_count"], cache["miss_count"]) == (2, 4)
    assert cache["entries_per_domain"] == {"up": 2, "other": 1} and cache["total_entries"] == 3
    assert cache["cache_size_per_domain"]["up"] > 0 and cache["sets"] == 3 and cache["compressed"] == 3
    assert cache["hit_rate"] == round(2 / 6, 4)
    assert cache["upstream_calls_avoided"] == 2 and cache["bytes_saved"] > 0
    assert cache["ttl_distribution"]["1h_to_1d"] == 3
    assert upstream["overall"]["total_requests"] == 4
    assert upstream["by_domain"]["up"]["errors_by_status"] == {"500": 1}
    assert upstream["by_domain"]["up"]["error_rate"] == round(1 / 3, 4)
    assert upstream["by_domain"]["up"]["requests_per_hour"] == 3
    throttling = report["throttling"]["up"]
    assert throttling["limits"] == {"per_second": None, "per_minute": 100, "per_hour": 1000}
    assert throttling["window_use"]["last_minute"] == 3
    assert report["database"]["health"] == "ok"
    assert report["proxy_health"]["recent_errors"][0]["status"] == "500"
    assert report["proxy_health"]["active_workers"] == 1


def test_prometheus_text_parses_and_has_per_domain_labels(app: Flask, client) -> None:
    client.get("/up/a")
    client.get("/up/a")
    text = flushed(app).test_client().get("/metrics")
    assert text.content_type.startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text.get_data(as_text=True)) for s in family.samples}
    assert samples[("buddy_cache_hits_total", (("domain", "up"),))] == 1
    assert samples[("buddy_cache_misses_total", (("domain", "up"),))] == 1
    assert samples[("buddy_cache_entries", (("domain", "up"),))] == 1
    assert samples[("buddy_upstream_responses_total", (("domain", "up"), ("status", "200")))] == 1
    assert samples[("buddy_redis_up", ())] == 1


def test_clearing_a_domain_leaves_the_others(app: Flask, client, upstream) -> None:
    for path in ("/up/a", "/up/b", "/other/c"):
        client.get(path)
    response = client.delete("/admin/cache/up")
    assert response.json == {"cleared": 2, "by_domain": {"up": 2}}
    assert client.get("/up/a").headers["X-Cache"] == "MISS"
    assert client.get("/other/c").headers["X-Cache"] == "HIT"
    assert client.delete("/admin/cache").json["cleared"] == 2
    assert client.delete("/admin/cache/nowhere").status_code == 404


def test_health_is_503_when_redis_is_down(app: Flask, client, redis_server_fake) -> None:
    ok = client.get("/admin/health")
    assert ok.status_code == 200 and ok.json["status"] == "ok" and ok.json["redis"] == "ok"
    redis_server_fake.connected = False
    down = client.get("/admin/health")
    assert down.status_code == 503 and down.json["status"] == "degraded"
    assert "uptime_seconds" in down.json and down.json["version"]
    sections = client.get("/admin/metrics").json
    assert "error" in sections["cache"] and sections["database"]["health"] == "unavailable"


def test_admin_routes_need_the_key_when_security_is_on(buddy_config, fake_redis) -> None:
    config = {**buddy_config, "security": {"require_secure_key": True, "secure_key": "k" * 20}}
    client = create_app(config, redis_client=fake_redis, environ={}).test_client()
    for method, path in (("GET", "/admin/health"), ("GET", "/admin/metrics"), ("GET", "/metrics"),
                         ("DELETE", "/admin/cache")):
        assert client.open(path, method=method).status_code == 401
        assert client.open(path, method=method, headers={"X-API-Buddy-Key": "k" * 20}).status_code == 200
    assert client.get(f"/admin/health?key={'k' * 20}").status_code == 200


def test_cli_stats_and_clear_cache(app: Flask, client) -> None:
    for path in ("/up/a", "/up/a", "/other/c"):
        client.get(path)
    flushed(app)
    runner = app.test_cli_runner()
    stats = runner.invoke(args=["buddy", "stats"])
    assert stats.exit_code == 0
    lines = stats.output.splitlines()
    assert lines[0].split()[:3] == ["domain", "entries", "size"]
    up = next(line.split() for line in lines if line.startswith("up "))
    assert up[1] == "1" and "50%" in up
    cleared = runner.invoke(args=["buddy", "clear-cache", "up"])
    assert cleared.exit_code == 0 and "up: 1 entries removed" in cleared.output
    assert client.get("/other/c").headers["X-Cache"] == "HIT"
    assert runner.invoke(args=["buddy", "clear-cache", "nowhere"]).exit_code != 0


def test_cli_check_config_redacts_secrets_and_names_bad_fields(tmp_path, app: Flask) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"domain_mappings": {"w": {"upstream": "https://w.example"}},
                                "security": {"secure_key": "super-secret-value-123"},
                                "redis": {"url": "redis://:hunter2@db.example:6379/0"}}))
    runner = app.test_cli_runner()
    result = runner.invoke(args=["buddy", "check-config", str(good)])
    assert result.exit_code == 0
    assert "super-secret-value-123" not in result.output and "hunter2" not in result.output
    effective = json.loads(result.stdout)
    assert effective["domain_mappings"]["w"]["ttl_seconds"] == 86400
    assert effective["security"]["secure_key"] == "***"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"domain_mappings": {"w": {"upstream": "https://w.example", "ttl_seconds": 0}}}))
    failed = runner.invoke(args=["buddy", "check-config", str(bad)])
    assert failed.exit_code == 1
    assert "domain_mappings.w.ttl_seconds: must be a positive integer" in failed.output


def test_clearing_also_finds_entries_the_index_does_not_know(app: Flask, client, fake_redis) -> None:
    client.get("/up/a")
    fake_redis.set("buddy:cache:{up}:stored-by-an-older-version", b"RB\x01...")
    fake_redis.set("buddy:cache:{other}:not-this-domain", b"RB\x01...")
    assert client.delete("/admin/cache/up").json["cleared"] == 2
    assert fake_redis.keys("buddy:cache:*") == [b"buddy:cache:{other}:not-this-domain"]


def test_apps_come_and_go_without_leaving_exit_hooks_or_threads(buddy_config) -> None:
    import atexit
    import threading

    from buddy import create_app

    def ours() -> list[str]:
        return sorted(t.name for t in threading.enumerate() if t.name.startswith("buddy-"))

    first = create_app(buddy_config, redis_client=fakeredis.FakeRedis(), environ={})
    first.test_client().get("/up/x")  # the libraries' own one-time exit hooks (weakref.finalize's) are in
    first.extensions["buddy"].shutdown()
    before_hooks, before_threads = atexit._ncallbacks(), ours()
    apps = [create_app(buddy_config, redis_client=fakeredis.FakeRedis(server=fakeredis.FakeServer()), environ={})
            for _ in range(20)]
    for app in apps:
        app.test_client().get("/up/x")  # counts, so each app's metrics flusher runs
    assert atexit._ncallbacks() == before_hooks  # one hook for all apps, registered at import
    assert len(ours()) > len(before_threads)
    for app in apps:
        app.extensions["buddy"].shutdown()
        app.extensions["buddy"].shutdown()  # twice is harmless
    assert ours() == before_threads
