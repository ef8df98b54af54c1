"""The operator's view against real gunicorn workers, the flask CLI, and the embedded Python API."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support.ports import free_port
from tests.support.processes import ROOT
from tests.support.threads import kill, started_since
from tests.support.upstream_stub import UpstreamStub


def two_domains(upstream: UpstreamStub) -> dict:
    return {"domain_mappings": {"up": {"upstream": upstream.url}, "other": {"upstream": upstream.url + "/o"}}}


def settled_metrics(url: str, hits: int, misses: int, timeout: float = 5.0) -> dict:
    """Workers flush their counters once a second: poll until every worker's share has landed."""
    deadline = time.monotonic() + timeout
    while True:
        report = requests.get(f"{url}/admin/metrics", timeout=10).json()
        cache = report["cache"]
        if (cache["hit_count"] >= hits and cache["miss_count"] >= misses) or time.monotonic() > deadline:
            return report
        time.sleep(0.2)


def test_counts_describe_the_whole_proxy_not_one_worker(gunicorn, redis_url, upstream) -> None:
    proxy = gunicorn(two_domains(upstream), env={"REDIS_URL": redis_url}, workers=4)
    for _ in range(3):
        for i in range(10):
            requests.get(f"{proxy.url}/up/item/{i}", timeout=10, headers={"Connection": "close"})
    report = settled_metrics(proxy.url, hits=20, misses=10)
    cache = report["cache"]
    assert (cache["hit_count"], cache["miss_count"]) == (20, 10)
    assert cache["entries_per_domain"] == {"up": 10, "other": 0}
    assert cache["upstream_calls_avoided"] == 20 and cache["bytes_saved"] > 0
    assert report["upstream"]["by_domain"]["up"]["total_requests"] == upstream.count() == 10
    deadline = time.monotonic() + 5  # every worker reports itself within a flush interval, busy or idle
    while (workers := requests.get(f"{proxy.url}/admin/metrics", timeout=10).json()["proxy_health"]
           ["active_workers"]) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert workers == 4

    text = requests.get(f"{proxy.url}/metrics", timeout=10).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("buddy_cache_hits_total", (("domain", "up"),))] == 20
    assert samples[("buddy_cache_entries", (("domain", "up"),))] == 10


def test_flask_cli_clear_cache_empties_one_domain_only(gunicorn, redis_url, upstream) -> None:
    proxy = gunicorn(two_domains(upstream), env={"REDIS_URL": redis_url})
    for path in ("/up/a", "/up/b", "/other/c"):
        requests.get(proxy.url + path, timeout=10)
    result = subprocess.run([sys.executable, "-m", "flask", "buddy", "clear-cache", "up"], cwd=ROOT, env=proxy.env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "up: 2 entries removed" in result.stdout and "clearing up" in result.stderr
    assert requests.get(f"{proxy.url}/up/a", timeout=10).headers["X-Cache"] == "MISS"
    assert requests.get(f"{proxy.url}/other/c", timeout=10).headers["X-Cache"] == "HIT"
    stats = subprocess.run([sys.executable, "-m", "flask", "buddy", "stats"], cwd=ROOT, env=proxy.env,
                           capture_output=True, text=True, timeout=60)
    assert stats.returncode == 0 and stats.stdout.splitlines()[0].split()[0] == "domain"


def test_check_config_works_even_when_the_app_cannot_load(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[domain_mappings.wikidata]\nupstream = "ftp://nope"\n')
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "BUDDY_CONFIG": str(bad)}
    result = subprocess.run([sys.executable, "-m", "flask", "buddy", "check-config"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "domain_mappings.wikidata.upstream: must be an http:// or https:// URL with a host" in result.stderr


EMBEDDED = textwrap.dedent("""
    import sys, threading, psutil, requests
    from buddy import CachingProxy
    upstream, port, data_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    proxy = CachingProxy({"domain_mappings": {"up": {"upstream": upstream}},
                          "server": {"port": port}, "redis": {"data_dir": data_dir}})
    proxy.start(blocking=False)
    base = f"http://127.0.0.1:{port}"
    print(requests.get(base + "/up/x", timeout=10).headers["X-Cache"])
    print(requests.get(base + "/up/x", timeout=10).headers["X-Cache"])
    metrics = proxy.get_metrics()
    print(metrics["cache"]["hit_count"], metrics["cache"]["miss_count"])
    print(proxy.get_monitoring_manager().get_cache_stats()["entries_per_domain"]["up"])
    print(proxy.get_secure_key())  # None: no key is required, and none is made up
    print(proxy.clear_cache("up"))
    redis_servers = [p for p in psutil.Process().children(recursive=True) if "redis-server" in p.name()]
    print(len(redis_servers))
    proxy.stop()
    print([t.name for t in threading.enumerate() if t is not threading.main_thread()])
    print(sum(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in redis_servers))
""")


def test_the_embedded_api_serves_and_stop_leaves_nothing_running(tmp_path, upstream) -> None:
    result = subprocess.run(
        [sys.executable, "-c", EMBEDDED, upstream.url, str(free_port()), str(tmp_path / "data")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines == ["MISS", "HIT", "1 1", "1", "None", "1", "1", "[]", "0"], result.stderr
    assert upstream.count() == 1


def test_the_logging_section_applies_to_gunicorn_and_the_app_alike(gunicorn, redis_url, upstream, tmp_path) -> None:
    log_file = tmp_path / "buddy.log"
    config = {"domain_mappings": {"up": {"upstream": f"http://127.0.0.1:{free_port()}"}},
              "logging": {"enable_file": True, "file_path": str(log_file), "format": "BUDDY|%(name)s|%(message)s"}}
    proxy = gunicorn(config, env={"REDIS_URL": redis_url})
    assert requests.get(f"{proxy.url}/up/x", timeout=10).status_code == 502
    proxy.stop()
    lines = log_file.read_text().splitlines()
    assert any(line.startswith("BUDDY|gunicorn.error|Booting worker") for line in lines)
    assert any(line.startswith("BUDDY|buddy.service|could not reach upstream 'up'") for line in lines)


def test_caching_proxy_lifecycle_errors_are_clear(redis_url, upstream, capfd) -> None:
    import threading

    from buddy import CachingProxy

    port = free_port()
    config = {"domain_mappings": {"up": {"upstream": upstream.url}}, "server": {"port": port},
              "redis": {"url": redis_url}, "logging": {"enable_console": False}}
    first = CachingProxy(config)
    first.start()
    try:
        with pytest.raises(RuntimeError, match="already serving"):
            first.start()
        second = CachingProxy(config)
        with pytest.raises(OSError, match="in use"):
            second.start()
        second.stop()
        assert requests.get(f"http://127.0.0.1:{port}/up/a", timeout=10).status_code == 200
    finally:
        first.stop()
    printed = capfd.readouterr().err  # the host program's stderr: no server lines, no access line per request
    assert "in use" not in printed and "GET /up/a" not in printed, printed
    with pytest.raises(RuntimeError, match="stopped"):
        first.start()

    blocking = CachingProxy(config)
    runner = threading.Thread(target=blocking.start, kwargs={"blocking": True})
    runner.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/up/b", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            time.sleep(0.05)
    blocking.stop()  # from another thread: ends the blocking start()
    runner.join(10)
    assert not runner.is_alive()


def test_start_up_and_shutdown_say_what_an_operator_needs_and_nothing_secret(gunicorn, upstream, tmp_path) -> None:
    config = {"domain_mappings": {"up": {"upstream": upstream.url}},
              "security": {"require_secure_key": True, "secure_key": "k" * 32}}
    proxy = gunicorn(config, env={"BUDDY_DATA_DIR": str(tmp_path / "data")}, workers=2)
    proxy.wait_until_serving("/admin/health")  # a normal shutdown, not one of workers still booting
    proxy.stop()
    log = proxy.log()
    assert "2 workers x 64 threads (DeadlineWorker)" in log
    assert "access key required" in log and "k" * 32 not in log
    assert f"redis: embedded, data in {tmp_path / 'data'}" in log
    assert f"mapping /up/ -> {upstream.url}" in log
    assert "embedded Redis saved and stopped" in log


def test_ctrl_c_stops_at_once_and_sigterm_lets_requests_in_flight_finish(gunicorn, redis_url, upstream) -> None:
    """Ctrl-C (SIGINT to gunicorn's process group) cuts a request in flight; SIGTERM (systemctl stop) answers it
    first; an idle connection that carries no request holds neither up. No worker is ever SIGKILLed for being
    slow to leave (a thread still busy with a request used to keep it alive until the master lost patience)."""
    config = {"domain_mappings": {"up": {"upstream": upstream.url, "read_timeout": 60}}}
    for stop_with in (signal.SIGINT, signal.SIGTERM):
        proxy = gunicorn(config, env={"REDIS_URL": redis_url}, workers=1)
        proxy.wait_until_serving("/admin/health")
        idle = socket.create_connection(("127.0.0.1", proxy.port))  # a browser's preconnect: sends nothing
        slow = 1000 if stop_with == signal.SIGTERM else 30000
        with ThreadPoolExecutor(1) as pool:
            path = f"/slow-{stop_with.name}"
            in_flight = pool.submit(requests.get, f"{proxy.url}/up{path}?sleep={slow}", timeout=60)
            deadline = time.monotonic() + 10
            while not upstream.count(path) and time.monotonic() < deadline:
                time.sleep(0.02)
            os.killpg(proxy.process.pid, stop_with)
            assert proxy.process.wait(timeout=30) == 0
            if stop_with == signal.SIGTERM:
                assert in_flight.result().status_code == 200  # answered before the worker left
            else:
                with pytest.raises(requests.ConnectionError):
                    in_flight.result()  # cut: Ctrl-C means now
        idle.close()
        log = proxy.log()
        assert "SIGKILL" not in log and "Worker exiting" in log, log


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the SystemExit it died of
def test_a_serving_proxy_whose_metrics_thread_dies_says_so_in_health_and_counts_on(redis_url, upstream) -> None:
    import threading

    from buddy import CachingProxy

    port = free_port()
    before = set(threading.enumerate())
    proxy = CachingProxy({"domain_mappings": {"up": {"upstream": upstream.url}}, "server": {"port": port},
                          "redis": {"url": redis_url, "prefix": f"dies-{port}:"},
                          "logging": {"enable_console": False}})
    proxy.start()
    base = f"http://127.0.0.1:{port}"
    try:
        health = requests.get(f"{base}/admin/health", timeout=10)
        assert health.status_code == 200 and health.json()["threads"]["metrics"]["state"] == "alive"
        (flusher,) = started_since(before, "buddy-metrics")
        kill(flusher)
        health = requests.get(f"{base}/admin/health", timeout=10)
        assert health.status_code == 503
        assert health.json()["threads"]["metrics"] == {"name": "buddy-metrics", "state": "dead", "restarts": 0,
                                                       "error": "SystemExit"}
        assert "metrics (buddy-metrics) is dead" in health.json()["reason"]
        assert requests.get(f"{base}/up/a", timeout=10).headers["X-Cache"] == "MISS"  # counting starts it again
        health = requests.get(f"{base}/admin/health", timeout=10)
        assert health.status_code == 200
        assert health.json()["threads"]["metrics"] == {"name": "buddy-metrics", "state": "alive", "restarts": 1}
        assert settled_metrics(base, hits=0, misses=1)["cache"]["miss_count"] == 1
    finally:
        proxy.stop()
