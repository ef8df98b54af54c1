"""Beyond one Redis, for real: a Redis Cluster of 3 primaries and 3 replicas (the bundled binaries, formed by the
fixture, shared by the module) under two gunicorn instances; a primary SIGKILLed under load; and a Sentinel-watched
primary that is switched.

The mappings' names are chosen so that their hash tags fall in the three primaries' slot ranges: coalescing, rate
limits, clearing and the census all run across nodes.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from redis.crc import key_slot

from buddy import create_app
from buddy.redis_keys import EntryId
from buddy.store.connect import connect
from buddy.store.wakeup import WakeupHub
from tests.support.cluster import LocalCluster, LocalSentinel, wait_until
from tests.support.processes import ROOT, Gunicorn
from tests.support.upstream_stub import UpstreamStub

pytestmark = pytest.mark.xdist_group("cluster")

MAPPINGS = ("up", "one", "other")  # slots 2363, 9084, 11361: one on each primary of a fresh 3-primary cluster
LIMITED = "rated"  # max_requests_per_second: 4
RECOMMENDED_ACL = ("resetchannels", "~buddy:*", "&buddy:*", "+@all", "-@dangerous", "+info", "+cluster|slots",
                   "+cluster|info", "+cluster|nodes")


def mapping_config(stub: UpstreamStub) -> dict[str, Any]:
    domains: dict[str, Any] = {name: {"upstream": stub.url} for name in MAPPINGS}
    domains[LIMITED] = {"upstream": stub.url, "max_requests_per_second": 4}
    throttling = {"progressive_max_delay": 30, "default_requests_per_hour": 100_000}
    return {"domain_mappings": domains, "throttling": throttling}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    started = LocalCluster(tmp_path_factory.mktemp("cluster"), primaries=3, replicas=1, node_timeout_ms=1000)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def proxies(cluster: LocalCluster, stub: UpstreamStub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list]:
    """Two gunicorn instances (two workers each) on the cluster: one proxy behind two names."""
    workdir, instances = tmp_path_factory.mktemp("proxies"), []
    try:
        for _ in range(2):
            instances.append(Gunicorn(workdir, mapping_config(stub), {"REDIS_URL": cluster.url}, workers=2))
        for instance in instances:
            instance.wait_until_serving("/admin/health")
        yield instances
    finally:
        for instance in instances:
            instance.stop()


def get(proxy: Gunicorn, path: str, timeout: float = 30) -> requests.Response:
    return requests.get(proxy.url + path, timeout=timeout)


def test_the_mappings_live_on_three_different_primaries(cluster: LocalCluster) -> None:
    owners = {name: cluster.primary_for("{" + name + "}").port for name in MAPPINGS}
    assert len(set(owners.values())) == 3, owners


def test_forty_identical_concurrent_misses_make_one_upstream_call(proxies: list, stub: UpstreamStub) -> None:
    path = f"/slow/400?run={uuid.uuid4().hex}"
    with ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(lambda i: get(proxies[i % 2], "/up" + path), range(40)))
    assert [a.status_code for a in answers] == [200] * 40
    assert stub.count(path) == 1
    assert len({a.content for a in answers}) == 1
    kinds = Counter(a.headers["X-Cache"] for a in answers)
    assert kinds["MISS"] == 1 and kinds["MISS"] + kinds["COALESCED"] + kinds["HIT"] == 40, kinds


def test_a_four_per_second_limit_holds_across_both_instances(proxies: list, stub: UpstreamStub) -> None:
    run = uuid.uuid4().hex
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: get(proxies[i % 2], f"/{LIMITED}/r/{run}/{i}", timeout=60), range(16)))
    assert [a.status_code for a in answers] == [200] * 16
    starts = sorted(seen.started for seen in stub.log if f"/r/{run}/" in seen.path)
    assert len(starts) == 16
    busiest = max(sum(1 for t in starts if start <= t < start + 1.0) for start in starts)
    assert busiest <= 4, [round(t - starts[0], 3) for t in starts]


def test_clearing_one_mapping_leaves_the_others_and_clearing_all_reaches_every_primary(
    proxies: list, stub: UpstreamStub
) -> None:
    run = uuid.uuid4().hex
    paths = {name: [f"/{name}/c/{run}/{i}" for i in range(5)] for name in MAPPINGS}
    for wanted in paths.values():
        assert [get(proxies[0], p).headers["X-Cache"] for p in wanted] == ["MISS"] * 5
        assert [get(proxies[1], p).headers["X-Cache"] for p in wanted] == ["HIT"] * 5
    census = get(proxies[1], "/admin/metrics").json()["cache"]
    assert all(census["entries_per_domain"][name] >= 5 for name in MAPPINGS), census["entries_per_domain"]

    cleared = requests.delete(proxies[0].url + "/admin/cache/other", timeout=30)
    assert cleared.status_code == 200 and cleared.json()["cleared"] >= 5
    assert [get(proxies[1], p).headers["X-Cache"] for p in paths["other"]] == ["MISS"] * 5
    for name in ("up", "one"):
        assert [get(proxies[1], p).headers["X-Cache"] for p in paths[name]] == ["HIT"] * 5

    result = subprocess.run([sys.executable, "-m", "flask", "buddy", "clear-cache"], cwd=ROOT, env=proxies[0].env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in MAPPINGS:
        assert f"{name}: " in result.stdout
        assert [get(proxies[0], p).headers["X-Cache"] for p in paths[name]] == ["MISS"] * 5


def test_a_warc_export_reaches_every_primary_and_imports_back(proxies: list, stub: UpstreamStub,
                                                              tmp_path: Path) -> None:
    from warcio.archiveiterator import ArchiveIterator

    run = uuid.uuid4().hex
    paths = [f"/{name}/w/{run}/{i}" for name in MAPPINGS for i in range(3)]
    bodies = {p: get(proxies[0], p).content for p in paths}
    archive = tmp_path / "slice.warc.gz"

    def flask_buddy(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "flask", "buddy", *args], cwd=ROOT, env=proxies[0].env,
                              capture_output=True, text=True, timeout=120)

    exported = flask_buddy("export", *MAPPINGS, "-o", str(archive))
    assert exported.returncode == 0, exported.stdout + exported.stderr
    with archive.open("rb") as stream:
        found = {(r.rec_headers.get_header("WARC-Buddy-Mapping"), r.rec_headers.get_header("WARC-Target-URI"))
                 for r in ArchiveIterator(stream) if r.rec_type == "response"}
    ours = {(name, uri) for name, uri in found if f"/w/{run}/" in uri}
    assert {name for name, _ in ours} == set(MAPPINGS) and len(ours) == len(paths)  # from all three primaries
    assert flask_buddy("clear-cache").returncode == 0
    calls = len(stub.log)
    imported = flask_buddy("import", str(archive))
    assert imported.returncode == 0, imported.stdout + imported.stderr
    again = {p: get(proxies[1], p) for p in paths}
    assert all(a.headers["X-Cache"] == "HIT" and a.content == bodies[p] for p, a in again.items())
    assert len(stub.log) == calls


def test_health_and_metrics_describe_the_cluster(proxies: list, cluster: LocalCluster) -> None:
    health = get(proxies[0], "/admin/health")
    assert health.status_code == 200, health.text
    report = health.json()
    assert report["status"] == "ok" and report["cluster"]["state"] == "ok" and report["cluster"]["down"] == []
    assert report["cluster"]["primaries"] == 3 and report["cluster"]["known_nodes"] == 6
    database = get(proxies[1], "/admin/metrics").json()["database"]
    assert database["type"] == "redis-cluster" and database["cluster_state"] == "ok"
    primaries = [n for n in database["nodes"] if n["role"] == "primary"]
    assert len(primaries) == 3 and len(database["nodes"]) == 6
    assert database["keys"] == sum(n["keys"] for n in primaries)
    assert database["used_memory_bytes"] == sum(n["used_memory_bytes"] for n in primaries)
    assert database["maxmemory_bytes"] == 3 * 64 * 1024 * 1024 and database["maxmemory_policy"] == "volatile-lru"
    assert "refused a command" not in json.dumps(report)  # no script or transaction crossed slots


def test_in_process_the_generated_key_switches_and_acl_users_work_on_the_cluster(
    cluster: LocalCluster, stub: UpstreamStub
) -> None:
    """The generated key is one for every app; an ACL user in the URL works; a user without INFO or CLUSTER NODES
    still gets answers (the parts it cannot read say why) and nothing crashes."""
    host_ports = cluster.url.split("//", 1)[1]
    for node in cluster.nodes:  # ACL users are per node, replicas included (one may become primary)
        with node.client() as client:
            # the rules deploy/redis-cluster.md recommends, and the same less INFO and CLUSTER NODES
            client.execute_command("ACL", "SETUSER", "buddy", "on", ">s3cret/pw", *RECOMMENDED_ACL)
            client.execute_command("ACL", "SETUSER", "narrow", "on", ">pw", *RECOMMENDED_ACL, "-info",
                                   "-cluster", "+cluster|slots", "+cluster|info")
    config = {**mapping_config(stub), "security": {"require_secure_key": True}, "logging": {"enable_console": False}}
    apps = [create_app(config, environ={"REDIS_URL": f"redis+cluster://buddy:s3cret%2Fpw@{host_ports}"}),
            create_app(config, environ={"REDIS_URL": f"redis+cluster://narrow:pw@{host_ports}"})]
    try:
        keys = {app.extensions["buddy"].secure_key.get() for app in apps}
        assert len(keys) == 1
        headers = {"X-API-Buddy-Key": keys.pop()}
        path = f"/one/acl/{uuid.uuid4().hex}"
        first, second = (app.test_client().get(path, headers=headers) for app in apps)
        assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
        switch = apps[0].extensions["buddy"].service.offline
        switch.set(True)
        assert apps[1].extensions["buddy"].service.offline.state() == (True, "switched at run time")
        switch.reset()
        narrow = apps[1].test_client()
        health = narrow.get("/admin/health", headers=headers).json
        assert health["cluster"]["state"].startswith("unknown: NoPermissionError")
        metrics = narrow.get("/admin/metrics", headers=headers)
        assert metrics.status_code == 200 and "NoPermissionError" in json.dumps(metrics.json["database"])
        wide = apps[0].test_client().get("/admin/health", headers=headers).json
        assert wide["status"] == "ok" and wide["cluster"]["state"] == "ok", wide
    finally:
        for app in apps:
            app.extensions["buddy"].shutdown()
        for node in cluster.nodes:
            with node.client() as client:
                client.execute_command("ACL", "DELUSER", "buddy", "narrow")


def test_a_slot_moved_to_another_primary_under_load_is_followed(proxies: list, cluster: LocalCluster) -> None:
    """Resharding: while one mapping's slot moves key by key, calls meet ASK, MOVED and TRYAGAIN (a script whose keys
    are half moved); each such call goes without the cache, nothing fails, and the entries are HITs on the new node."""
    run = uuid.uuid4().hex
    warm = [f"/one/m/{run}/{i}" for i in range(10)]
    assert all(get(proxies[0], p).headers["X-Cache"] == "MISS" for p in warm)
    time.sleep(1.2)  # the counters flushed: the slot holds entries, counters, rate-limit starts
    slot = key_slot(b"{one}")
    source = cluster.primary_for("{one}")
    target = cluster.primary_for("{other}")  # not that of 'up': the failover test wants two mappings elsewhere
    assert target is not source
    load = Load(proxies, warm, threads=4, misses=("one",))  # new entries: a script on a new key and the counters
    try:
        moved = cluster.migrate_slot(slot, target, pause=0.15)
        time.sleep(1.5)
    finally:
        results = load.stop()
    assert moved >= 10 and cluster.primary_for("{one}") is target
    errors = [r for r in results if r["status"] >= 500 or r["status"] == 0]
    assert all(r["right"] for r in results) and errors == [], errors[:5]
    kinds = Counter(r["cache"] for r in results)
    print(f"\n[slot migration] {moved} keys moved; answers during and after: {dict(kinds)}")
    assert all(get(proxies[1], p).headers["X-Cache"] == "HIT" for p in warm)
    assert get(proxies[0], "/admin/health").json()["status"] == "ok"


class Load:
    """Requests from a few threads at both proxies until stopped: mostly entries cached beforehand, every fifth a
    new miss; each answer is kept with its time, status, X-Cache, and whether its body is the one for its path."""

    def __init__(self, proxies: list, warm: list[str], threads: int = 6, misses: tuple[str, ...] = ("up",)) -> None:
        self.proxies, self.warm, self.misses = proxies, warm, misses
        self.results: list[dict] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self, index: int) -> None:
        n = 0
        while not self.stopping.is_set():
            n += 1
            path = (self.warm[(index * 7 + n) % len(self.warm)] if n % 5 else
                    f"/{self.misses[n // 5 % len(self.misses)]}/new/{index}/{n}/{uuid.uuid4().hex}")
            sent = time.monotonic()
            try:
                answer = get(self.proxies[(index + n) % 2], path, timeout=20)
                status, cache = answer.status_code, answer.headers.get("X-Cache", "")
                # the upstream echoes the path it was asked for: /up/w/... reached it as /w/...
                right = status != 200 or json.loads(answer.content)["path"] == "/" + path.split("/", 2)[2]
            except requests.RequestException as exc:
                status, cache, right = 0, type(exc).__name__, True
            self.results.append({"sent": sent, "done": time.monotonic(), "path": path, "status": status,
                                 "cache": cache, "right": right})
            time.sleep(0.03)

    def stop(self) -> list[dict]:
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)
        return self.results


def hub_on(url: str, node_name: str) -> WakeupHub:
    """A WakeupHub (the proxy's own) whose random pick of a node fell on `node_name`."""
    for _ in range(100):
        hub = WakeupHub(connect(url, timeout=1.0), "buddy:fill")
        if hub.start(wait=5) and hub.node == node_name:
            return hub
        hub.stop()
        hub.client.close()
    raise AssertionError(f"no subscription landed on {node_name}")


def require_full_coverage(cluster: LocalCluster, value: str) -> None:
    """cluster-require-full-coverage on every live node (yes, the default: no node serves any key while a slot has
    no primary; no: the other primaries keep serving theirs, as deploy/redis-cluster.md recommends)."""
    for node in cluster.nodes:
        if node.alive:
            with node.client() as client:
                client.config_set("cluster-require-full-coverage", value)


def test_a_primary_killed_under_load_means_bypass_for_its_mappings_only_until_a_replica_takes_over(
    proxies: list, cluster: LocalCluster, stub: UpstreamStub, capsys: pytest.CaptureFixture
) -> None:
    """One circuit per primary: while the primary of 'up' is dead, only the requests of 'up' bypass the cache; those
    of 'one' and 'other' (each on another primary) are answered from it, hits and new misses alike, throughout."""
    victim = cluster.primary_for("{up}")
    elsewhere = [name for name in MAPPINGS if cluster.primary_for("{" + name + "}") is not victim]
    assert elsewhere, "every mapping lives on one primary"
    run = uuid.uuid4().hex
    warm = [f"/{name}/w/{run}/{i}" for name in MAPPINGS for i in range(8)]
    assert all(get(proxies[0], p).headers["X-Cache"] == "MISS" for p in warm)
    wait_until(lambda: cluster.replicas_in_sync(victim), 10, "the victim's replica has its entries")
    hub = hub_on(cluster.url, victim.name)  # a subscriber on the node about to die
    publisher = connect(cluster.url, timeout=1.0)
    require_full_coverage(cluster, "no")
    try:
        load = Load(proxies, warm, misses=MAPPINGS)
        time.sleep(1.5)
        killed = time.monotonic()
        cluster.kill(victim)
        resubscribed = killed + wait_until(lambda: hub.listening and hub.node != victim.name, 20, "re-subscribed",
                                           every=0.01)
        promoted = time.monotonic()
        promoted += wait_until(lambda: cluster.primary_for("{up}") is not victim, 20, "a replica takes over")
        entry = EntryId("up", "f" * 64)
        waiter = hub.register(entry)
        publisher.publish("buddy:fill", f"up\n{'f' * 64}")
        assert waiter.wait(3), "a fill announced after the failover did not wake the re-subscribed process"
        hub.unregister(entry, waiter)
        time.sleep(5)
        results = load.stop()
    finally:
        hub.stop()
        hub.client.close()
        publisher.close()
        require_full_coverage(cluster, "yes")

    after = [r for r in results if r["sent"] >= killed]
    bypass = [r for r in after if r["cache"] == "BYPASS"]
    failover = promoted - killed
    last_bypass = max((r["done"] for r in bypass), default=killed) - killed
    errors = [r for r in results if r["status"] >= 500 or r["status"] == 0]
    others = [r for r in after if r["path"].split("/")[1] in elsewhere]
    others_meanwhile = [r for r in others if r["sent"] < promoted]
    with capsys.disabled():
        print(f"\n[cluster failover] replica promoted {failover:.2f} s after SIGKILL; {len(bypass)} of {len(after)} "
              f"requests BYPASS, the last {last_bypass:.2f} s after the kill; subscriber re-subscribed after "
              f"{resubscribed - killed:.2f} s; 5xx/failed: {len(errors)}; mappings on the other primaries: "
              f"{dict(Counter(r['cache'] for r in others))}")
    assert all(r["right"] for r in results), "an answer for another request"
    assert errors == [], errors[:5]
    # the mappings on the primaries that stayed up never went without the cache: hits hit, misses were stored
    assert all(r["cache"] in ("HIT", "MISS") for r in others), Counter(r["cache"] for r in others)
    assert Counter(r["cache"] for r in others_meanwhile).keys() == {"HIT", "MISS"}, others_meanwhile
    assert bypass and all(r["path"].startswith("/up/") for r in bypass)
    assert last_bypass <= failover + 2.5, (last_bypass, failover)  # a probe a second, in each process
    late = [r for r in results if r["sent"] >= promoted + 3.0 and "/up/w/" in r["path"]]
    assert late and all(r["cache"] == "HIT" for r in late), Counter(r["cache"] for r in late)
    assert any(r["cache"] == "MISS" for r in results if r["sent"] >= promoted + 3.0 and r["path"].startswith("/up/"))

    health = get(proxies[0], "/admin/health").json()
    assert health["status"] == "ok" and any(victim.name in d for d in health["cluster"]["down"]), health
    cluster.restart(victim)  # it comes back as a replica of the one that took over
    cluster.wait_ok(timeout=30)
    assert get(proxies[1], "/admin/health").json()["cluster"]["down"] == []
    # The census reads the primaries only (the old primary is a replica now, with the same keys): no double count.
    metrics = get(proxies[1], "/admin/metrics").json()
    assert metrics["cache"]["counted"]["keys_total"] == metrics["database"]["keys"]
    assert victim.info("replication")["role"] == "slave"


def test_a_cluster_with_slots_down_is_served_bypass_and_health_names_the_nodes(
    proxies: list, cluster: LocalCluster
) -> None:
    """A primary and its replica both gone: some slots have no primary, the cluster is in state fail and refuses
    every key; the proxy serves without the cache, health says why and which nodes, and all recovers after."""
    run = uuid.uuid4().hex
    kept = [f"/up/k/{run}/{i}" for i in range(4)]
    assert all(get(proxies[0], p).headers["X-Cache"] == "MISS" for p in kept)
    owner = cluster.primary_for("{other}")
    if owner is cluster.primary_for("{up}"):
        pytest.skip("'other' and 'up' share a primary after the failover test")
    pair = [owner, *(n for n in cluster.nodes if n.alive and n is not owner and cluster.replica_of(n) is owner)]
    assert len(pair) == 2
    for node in pair:
        cluster.kill(node)
    wait_until(lambda: get(proxies[0], "/admin/health").status_code == 503, 20, "health says degraded")
    wait_until(lambda: "state fail" in get(proxies[0], "/admin/health").json().get("reason", ""), 20,
               "the cluster is in state fail")
    health = get(proxies[1], "/admin/health").json()
    assert health["cluster"]["state"] == "fail" and health["cluster"]["slots_ok"] < 16384
    assert all(any(node.name in down for down in health["cluster"]["down"]) for node in pair), health
    answers = [get(proxies[i % 2], p) for i, p in enumerate(kept + [f"/other/k/{run}"])]
    assert [(a.status_code, a.headers["X-Cache"]) for a in answers] == [(200, "BYPASS")] * 5
    metrics = get(proxies[0], "/admin/metrics")
    assert metrics.status_code == 200 and metrics.json()["database"]["cluster_state"] == "fail"

    for node in pair:
        cluster.restart(node)  # persistence is off: the pair comes back empty, the primary still a primary
    cluster.wait_ok(timeout=30)
    wait_until(lambda: get(proxies[0], "/admin/health").status_code == 200, 20, "health ok again")
    # each worker's probe closes its own circuit within a second: the entries on the live primaries are HITs again
    wait_until(lambda: all(get(proxies[i % 2], p).headers["X-Cache"] == "HIT" for i, p in enumerate(kept * 2)), 10,
               "the entries kept on the live primaries are HITs again")
    seen = [get(proxies[i % 2], f"/other/k/{run}").headers["X-Cache"] for i in range(4)]
    assert "MISS" in seen and seen[-1] == "HIT", seen


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[LocalSentinel]:
    started = LocalSentinel(tmp_path / "sentinel", down_after_ms=1000)
    yield started
    started.stop()


def test_with_sentinel_the_proxy_follows_a_primary_switch(sentinel: LocalSentinel, stub: UpstreamStub,
                                                          tmp_path: Path) -> None:
    proxy = Gunicorn(tmp_path, mapping_config(stub), {"REDIS_URL": sentinel.url}, workers=2)
    try:
        proxy.wait_until_serving("/admin/health")
        run = uuid.uuid4().hex
        warm = [f"/up/s/{run}/{i}" for i in range(8)]
        assert all(get(proxy, p).headers["X-Cache"] == "MISS" for p in warm)
        old = sentinel.node(sentinel.primary_port())
        wait_until(lambda: old.info("replication")["slave0"]["offset"] >= old.info("replication")["master_repl_offset"],
                   10, "the replica has the entries")
        database = get(proxy, "/admin/metrics").json()["database"]
        assert database["type"] == "redis-sentinel" and database["primary"] == old.name
        load = Load([proxy, proxy], warm, threads=4)
        time.sleep(1.0)
        killed = time.monotonic()
        old.kill()
        switched = killed + wait_until(lambda: sentinel.primary_port() != old.port, 30, "sentinel switches")
        time.sleep(4)
        results = load.stop()
        new = sentinel.node(sentinel.primary_port())
        after = [r for r in results if r["sent"] >= killed]
        bypass = [r for r in after if r["cache"] == "BYPASS"]
        last_bypass = max((r["done"] for r in bypass), default=killed) - killed
        errors = [r for r in results if r["status"] >= 500 or r["status"] == 0]
        print(f"\n[sentinel switch] new primary named {switched - killed:.2f} s after SIGKILL; {len(bypass)} of "
              f"{len(after)} requests BYPASS, the last {last_bypass:.2f} s after the kill; 5xx/failed: {len(errors)}")
        assert all(r["right"] for r in results) and errors == [], errors[:5]
        late = [r for r in results if r["sent"] >= switched + 2.0]
        assert late and all(r["cache"] in ("HIT", "MISS") for r in late), Counter(r["cache"] for r in late)
        assert all(r["cache"] == "HIT" for r in late if "/up/s/" in r["path"])
        health = get(proxy, "/admin/health").json()
        assert health["status"] == "ok", health
        assert get(proxy, "/admin/metrics").json()["database"]["primary"] == new.name
    finally:
        proxy.stop()

