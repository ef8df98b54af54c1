"""The embedded redis-server under real gunicorn and CachingProxy processes: restarted when it dies, never
started by a worker or a CLI command behind the master's back, and never left running by a failed start or
a killed master. Every test has its own data folder and checks that nothing from it is left running.
(A start that fails on a taken port is tested once, through `api-buddy`, in test_running_anywhere.py: the
same gunicorn settings and hooks as `gunicorn wsgi:app`.)"""
from __future__ import annotations

import fcntl
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, Iterator

import psutil
import pytest
import redis
import requests

from buddy.embedded import EmbeddedRedis
from buddy.keeper import SUPERVISORS, USERS, held_by_others
from tests.support.ports import free_port
from tests.support.processes import ROOT, Gunicorn
from tests.support.upstream_stub import UpstreamStub

StartProxy = Callable[..., Gunicorn]


def config_for(upstream: UpstreamStub) -> dict:
    return {"domain_mappings": {"up": {"upstream": upstream.url}}}


def get(url: str) -> requests.Response:
    # A new connection per call, so that calls spread over the workers.
    return requests.get(url, timeout=10, headers={"Connection": "close"})


def embedded_processes(root: Path) -> list[psutil.Process]:
    """Every redis-server working in a folder under `root` (it changes into its --dir), and every keeper
    (`python .../buddy/keeper.py <data folder> ...`) watching one."""
    root_text = str(root.resolve())
    found = []
    for process in psutil.process_iter(["name", "cmdline", "cwd"]):
        info = process.info
        cmdline = " ".join(info["cmdline"] or ())
        if "redis-server" in (info["name"] or "") and (info["cwd"] or "").startswith(root_text):
            found.append(process)
        elif "buddy/keeper.py" in cmdline and root_text in cmdline:
            found.append(process)
    return [p for p in found if running(p)]


def running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def redis_servers(data_dir: Path) -> list[psutil.Process]:
    return [p for p in embedded_processes(data_dir) if "redis-server" in p.name()]


def wait_until(condition: Callable[[], object], timeout: float, step: float = 0.1) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    return condition()


@pytest.fixture
def nothing_left(tmp_path: Path) -> Iterator[Path]:
    """After the test: no redis-server or keeper of any data folder under tmp_path may still run (killed if so)."""
    yield tmp_path
    if not wait_until(lambda: not embedded_processes(tmp_path), timeout=10):
        left = embedded_processes(tmp_path)
        for process in left:
            process.kill()
        pytest.fail(f"left running: {[(p.pid, p.name()) for p in left]}")


@pytest.fixture
def start(nothing_left: Path, gunicorn) -> Iterator[StartProxy]:
    """gunicorn with the embedded default (no REDIS_URL) on the given data folder; stopped before the check."""
    started: list[Gunicorn] = []

    def run(upstream: UpstreamStub, data_dir: Path, workers: int = 2) -> Gunicorn:
        proxy = gunicorn(config_for(upstream), env={"BUDDY_DATA_DIR": str(data_dir)}, workers=workers)
        started.append(proxy)
        return proxy

    yield run
    for proxy in started:
        proxy.stop()


def hit_once(proxy: Gunicorn, path: str) -> None:
    """MISS, then HIT from every worker: the entry is in Redis (and so in its AOF)."""
    assert get(f"{proxy.url}{path}").headers["X-Cache"] == "MISS"
    assert [get(f"{proxy.url}{path}").headers["X-Cache"] for _ in range(4)] == ["HIT"] * 4


def answers_until_hits(proxy: Gunicorn, path: str, streak: int, timeout: float = 10.0) -> list[str]:
    """X-Cache of each request (a new connection each, so spread over the workers) until `streak` hits in a
    row, or `timeout` seconds."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and seen[-streak:] != ["HIT"] * streak:
        seen.append(get(f"{proxy.url}{path}").headers["X-Cache"])
        time.sleep(0 if seen[-1] == "HIT" else 0.1)
    return seen


def workers_of(master: psutil.Process) -> list[psutil.Process]:
    workers = []
    for child in master.children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "gunicorn" in " ".join(child.cmdline()):
                workers.append(child)
        except psutil.Error:  # gone meanwhile
            pass
    return workers


def ancestors(process: psutil.Process) -> set[int]:
    return {p.pid for p in process.parents()}


def all_joined(master: psutil.Process, data_dir: Path, workers: int = 2) -> bool:
    """Every worker has booted and joined the folder's users (a `redis.users` of its own beside the inherited one)."""
    joined = []
    for worker in workers_of(master):
        try:
            joined.append([f.path for f in worker.open_files()].count(str(data_dir / USERS)) > 1)
        except psutil.Error:
            return False
    return len(joined) == workers and all(joined)


def waits_to_start(process: psutil.Process, data_dir: Path, inherited: int) -> bool:
    """The process has joined the folder's users (a `redis.users` of its own beside the `inherited` ones) and
    opened the start lock: it is in EmbeddedRedis.ensure(), which takes that lock before it may start a server."""
    try:
        paths = [f.path for f in process.open_files()]
    except psutil.Error:
        return False
    return paths.count(str(data_dir / "redis.users")) > inherited and str(data_dir / "redis.lock") in paths


def test_a_killed_redis_is_back_within_seconds_with_its_entries(start, upstream, tmp_path) -> None:
    data_dir = tmp_path / "data"
    proxy = start(upstream, data_dir)
    master = psutil.Process(proxy.process.pid)
    hit_once(proxy, "/up/kept")
    assert wait_until(lambda: len(workers_of(master)) == 2, timeout=30), "the second worker never booted"
    workers = {p.pid for p in workers_of(master)}
    [server] = redis_servers(data_dir)

    server.kill()
    killed_at = time.monotonic()
    # The master starts another; until a worker notices, it may still answer from its memory (a HIT that
    # proves nothing here), so the answers that count are those once the new server runs.
    restarted = wait_until(lambda: [p for p in redis_servers(data_dir) if p.pid != server.pid], timeout=10)
    assert restarted, "no redis-server was started again within 10 s"
    seen = answers_until_hits(proxy, "/up/kept", streak=8)  # 8 in a row: every worker is back
    back_after = time.monotonic() - killed_at
    assert seen[-8:] == ["HIT"] * 8, f"10 s after the kill: {seen[-10:]}"
    assert set(seen) <= {"BYPASS", "HIT"}, seen  # never a MISS: the entry came back from the AOF
    # Fetched once before the kill, and once per BYPASS while Redis was down: never fetched to be stored again.
    assert upstream.paths().count("/kept") == 1 + seen.count("BYPASS")

    [again] = restarted
    assert again.pid != server.pid
    assert master.pid in ancestors(again) and not workers & ancestors(again)
    assert proxy.process.poll() is None and {p.pid for p in workers_of(master)} == workers  # no restart at all
    print(f"every worker hits again {back_after:.1f} s after the kill ({seen.count('BYPASS')} BYPASS answers)")


def test_a_killed_keeper_takes_its_server_along_and_both_come_back(start, upstream, tmp_path) -> None:
    """No redis-server is ever left without its keeper (which is what stops an orphan): on Linux the server
    gets SIGTERM when its keeper dies, saves, and the master starts a new pair."""
    data_dir = tmp_path / "data"
    proxy = start(upstream, data_dir)
    hit_once(proxy, "/up/kept")
    [server] = redis_servers(data_dir)
    [keeper] = [p for p in embedded_processes(data_dir) if p.pid == server.ppid()]
    keeper.kill()
    assert wait_until(lambda: not running(server), timeout=10), "the server outlived its keeper"
    seen = answers_until_hits(proxy, "/up/kept", streak=4)
    assert seen[-4:] == ["HIT"] * 4 and set(seen) <= {"BYPASS", "HIT"}, seen
    assert upstream.paths().count("/kept") == 1 + seen.count("BYPASS")  # it was saved on the way out
    [again] = redis_servers(data_dir)
    assert again.pid != server.pid and again.parent().parent().pid == proxy.process.pid


def test_while_redis_is_down_a_new_worker_or_a_cli_command_never_starts_its_own(start, upstream, tmp_path) -> None:
    data_dir = tmp_path / "data"
    proxy = start(upstream, data_dir)
    master = psutil.Process(proxy.process.pid)
    hit_once(proxy, "/up/kept")
    # Both workers booted first: a late second one would count as the killed worker's replacement.
    assert wait_until(lambda: len(workers_of(master)) == 2, timeout=30), "the second worker never booted"
    [server] = redis_servers(data_dir)
    with open(data_dir / "redis.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # while the test holds this, nobody can start a server on the folder
        server.kill()
        before = workers_of(master)
        before[0].kill()
        newcomer = wait_until(lambda: [p for p in workers_of(master) if p not in before], timeout=30)
        assert newcomer, "gunicorn did not replace the killed worker"
        [newcomer] = newcomer
        cli = subprocess.Popen([sys.executable, "-m", "flask", "buddy", "stats"], cwd=ROOT, env=proxy.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # Both are now waiting for the start lock, where today's code would start a server of its own.
            assert wait_until(lambda: waits_to_start(newcomer, data_dir, inherited=1), 30), "the new worker never asked"
            assert wait_until(lambda: waits_to_start(psutil.Process(cli.pid), data_dir, 0), 30), "the CLI never asked"
        except BaseException:
            cli.kill()
            cli.wait()
            raise
    out, err = cli.communicate(timeout=60)
    assert cli.returncode == 0, err
    assert out.split()[:2] == ["domain", "entries"]

    assert wait_until(lambda: get(f"{proxy.url}/up/kept").headers["X-Cache"] == "HIT", timeout=10, step=0.2)
    [again] = redis_servers(data_dir)
    assert master.pid in ancestors(again)
    assert not {newcomer.pid, cli.pid} & ancestors(again), "a worker or the CLI started its own redis-server"


def test_an_orphan_of_a_killed_master_is_adopted_by_the_next_proxy_and_stopped_with_it(start, upstream,
                                                                                         tmp_path) -> None:
    """A master killed outright leaves its server running: its workers notice and leave by themselves, and the
    next proxy on the folder takes the server over, entries and all, and stops it when it stops. (An orphan that
    nobody takes over is stopped by its keeper: test_a_server_nobody_uses_is_saved_and_stopped_by_its_keeper.)"""
    data_dir = tmp_path / "data"
    doomed = start(upstream, data_dir)
    hit_once(doomed, "/up/kept")
    master = psutil.Process(doomed.process.pid)
    assert wait_until(lambda: len(workers_of(master)) == 2, timeout=30), "the second worker never booted"
    workers = workers_of(master)
    [orphan] = redis_servers(data_dir)
    doomed.process.send_signal(signal.SIGKILL)  # the master only: its workers notice and leave by themselves
    doomed.process.wait()
    assert wait_until(lambda: not any(running(p) for p in workers), timeout=30), "the workers stayed"
    assert wait_until(lambda: not held_by_others(data_dir / USERS), timeout=10), "someone still uses the orphan"
    with open(data_dir / USERS, "a") as stand_in:
        # Nobody uses it now, so its keeper would stop it after IDLE_GRACE: the test stands in for a user while the
        # heir boots, so that a loaded machine cannot turn this adoption into a start from the saved files.
        fcntl.flock(stand_in, fcntl.LOCK_SH)
        heir = start(upstream, data_dir)
        assert get(f"{heir.url}/up/kept").headers["X-Cache"] == "HIT"
    assert redis_servers(data_dir) == [orphan], "the heir started a server of its own"
    assert upstream.paths().count("/kept") == 1
    heir.stop()
    assert wait_until(lambda: not embedded_processes(data_dir), timeout=10), "the heir left the orphan running"


ORPHAN_MAKER = textwrap.dedent("""
    import os, sys

    import redis

    from buddy.embedded import EmbeddedRedis

    embedded = EmbeddedRedis(sys.argv[1], idle_grace=float(sys.argv[2]))
    embedded.ensure()
    redis.Redis.from_url(embedded.url).set("left", "behind")
    os._exit(0)  # gone without leaving: the server it started is nobody's now
""")


def test_a_server_nobody_uses_is_saved_and_stopped_by_its_keeper(nothing_left, tmp_path) -> None:
    data_dir = tmp_path / "data"
    subprocess.run([sys.executable, "-c", ORPHAN_MAKER, str(data_dir), "0.5"], cwd=ROOT, check=True, timeout=60)
    assert wait_until(lambda: not embedded_processes(data_dir), timeout=30), "the orphan still runs"
    assert "nobody has used" in (data_dir / "redis.log").read_text()
    embedded = EmbeddedRedis(data_dir)
    assert embedded.ensure()
    try:
        assert redis.Redis.from_url(embedded.url).get("left") == b"behind"
    finally:
        embedded.stop()


EMBEDDED_API = textwrap.dedent("""
    import json, sys, time

    import psutil, requests

    from buddy import CachingProxy

    upstream, port, data_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    proxy = CachingProxy({"domain_mappings": {"up": {"upstream": upstream}},
                          "server": {"port": port}, "redis": {"data_dir": data_dir}})
    proxy.start(blocking=False)
    url = f"http://127.0.0.1:{port}/up/kept"
    print(requests.get(url, timeout=10).headers["X-Cache"], requests.get(url, timeout=10).headers["X-Cache"])
    [server] = [p for p in psutil.Process().children(recursive=True) if "redis-server" in p.name()]
    server.kill()
    killed_at, seen = time.monotonic(), []
    while time.monotonic() - killed_at < 10 and "HIT" not in seen:
        seen.append(requests.get(url, timeout=10).headers["X-Cache"])
        time.sleep(0.1)
    print(json.dumps(seen))
    proxy.stop()
""")


def test_the_embedded_api_restarts_its_redis_too(nothing_left, upstream, tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", EMBEDDED_API, upstream.url, str(free_port()), str(tmp_path / "data")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    first, after_kill = result.stdout.splitlines()
    assert first == "MISS HIT"
    seen = json.loads(after_kill)
    assert seen[-1] == "HIT" and set(seen[:-1]) <= {"BYPASS"}, (seen, result.stderr)
    assert upstream.paths().count("/kept") == 1 + seen.count("BYPASS")


def test_a_deleted_data_folder_is_made_again_and_the_cache_comes_back(start, upstream, tmp_path) -> None:
    """Its server still runs on the deleted files, reachable only through connections open already: its keeper
    stops it, and the master makes the folder again and starts an empty server there."""
    data_dir = tmp_path / "data"
    proxy = start(upstream, data_dir)
    master = psutil.Process(proxy.process.pid)
    hit_once(proxy, "/up/old")
    assert wait_until(lambda: all_joined(master, data_dir), timeout=30), "the workers never joined"
    [server] = redis_servers(data_dir)
    shutil.rmtree(data_dir)
    deleted_at = time.monotonic()
    # Until it stops, workers may still hit through the connections they hold: the answers that count come after.
    assert wait_until(lambda: not running(server), timeout=30), "the server of the deleted folder still runs"
    seen = answers_until_hits(proxy, "/up/new", streak=8, timeout=30)  # 8 in a row: every worker is back
    assert seen[-8:] == ["HIT"] * 8, seen[-10:]
    print(f"every worker hits again {time.monotonic() - deleted_at:.1f} s after the deletion: {seen}")
    [again] = redis_servers(data_dir)
    assert master.pid in ancestors(again)
    # The master holds its locks in the new folder: its keeper sees a user, a command sees a supervisor.
    assert held_by_others(data_dir / USERS) and held_by_others(data_dir / SUPERVISORS)
    assert get(f"{proxy.url}/admin/health").json()["status"] == "ok"
    assert "was deleted; made it again" in proxy.log()


def test_a_data_folder_that_cannot_be_made_again_is_reported_until_it_can_be(start, upstream, tmp_path) -> None:
    parent = tmp_path / "parent"
    data_dir = parent / "data"
    proxy = start(upstream, data_dir)
    master = psutil.Process(proxy.process.pid)
    hit_once(proxy, "/up/old")
    assert wait_until(lambda: all_joined(master, data_dir), timeout=30), "the workers never joined"
    why = f"data folder {data_dir} was deleted and cannot be made again ({parent} is gone)"

    def reported(times: int) -> Callable[[], bool]:
        def check() -> bool:  # by the workers' health, and by the master's log
            health = [get(f"{proxy.url}/admin/health") for _ in range(4)]
            said = all(r.status_code == 503 and why in r.json()["reason"] for r in health)
            return said and proxy.log().count(why) >= times
        return check

    shutil.rmtree(parent)
    assert wait_until(reported(times=1), timeout=30), proxy.log()
    assert [get(f"{proxy.url}/up/new").headers["X-Cache"] for _ in range(4)] == ["BYPASS"] * 4
    parent.mkdir()  # back by itself at the supervisor's next try
    seen = answers_until_hits(proxy, "/up/new", streak=8, timeout=60)
    assert seen[-8:] == ["HIT"] * 8, seen[-10:]
    assert get(f"{proxy.url}/admin/health").json()["status"] == "ok"

    shutil.rmtree(parent)  # again, and for good
    assert wait_until(reported(times=2), timeout=30), proxy.log()
    before = workers_of(master)
    before[0].kill()  # its replacement boots meanwhile: it makes no folder and starts no server, it serves
    assert wait_until(lambda: len([p for p in workers_of(master) if p not in before]) == 1, timeout=30)
    assert wait_until(lambda: "going on without Redis for now" in proxy.log(), timeout=30), proxy.log()
    assert [get(f"{proxy.url}/up/new").headers["X-Cache"] for _ in range(4)] == ["BYPASS"] * 4
    assert not parent.exists() and not redis_servers(tmp_path)
    proxy.stop()  # nothing left running (see nothing_left), and no word of a server left running
    assert proxy.process.returncode == 0 and "left running" not in proxy.log(), proxy.log()
