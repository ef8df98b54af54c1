"""What the proxy's Redis Cluster or Sentinel looks like now, for health and /admin/metrics: the cluster's state,
which node is down, and each node's memory and keys, summed over the primaries (which hold the data once)."""
from __future__ import annotations

from typing import Any

import redis
from redis.exceptions import RedisClusterException

from buddy import redis_memory

SUMMED = ("used_memory", "maxmemory", "evicted_keys", "expired_keys")  # INFO fields added up over the primaries
ERRORS = (redis.RedisError, RedisClusterException)


def _slot_count(ranges: list[list[str]]) -> int:
    return sum(int(r[-1]) - int(r[0]) + 1 for r in ranges if r and r[0].isdigit())


def cluster_state(cluster: Any) -> dict[str, Any]:
    """The cluster as one of its nodes sees it (CLUSTER INFO and CLUSTER NODES): its state, its nodes with their
    role and state, which are down, and what it lacks (slots without a primary, a primary without a replica)."""
    info = cluster.cluster_info()
    view = cluster.cluster_nodes()
    nodes = []
    for address, fields in sorted(view.items()):
        flags = set(str(fields.get("flags", "")).split(","))
        if "handshake" in flags:
            continue  # a node being introduced, not a member yet
        state = ("fail" if "fail" in flags else "pfail" if "fail?" in flags else
                 "unreachable" if not fields.get("connected", True) and "myself" not in flags else "ok")
        nodes.append({"address": address, "id": fields.get("node_id", ""),
                      "role": "primary" if "master" in flags else "replica", "state": state,
                      "slots": _slot_count(fields.get("slots") or []), "primary_id": fields.get("master_id", "-")})
    by_id = {node["id"]: node for node in nodes}
    down = [f"{n['address']} ({n['role']}, {n['state']})" for n in nodes if n["state"] != "ok"]
    warnings = []
    for node in nodes:
        if node["role"] == "primary" and node["slots"] and node["state"] == "ok":
            replicas = [r for r in nodes if r["primary_id"] == node["id"] and r["state"] == "ok"]
            if not replicas:
                warnings.append(f"Redis Cluster primary {node['address']} has no live replica: if it fails, its "
                                f"{node['slots']} slots go down until it is back")
    for node in nodes:
        if node["role"] == "replica" and node["primary_id"] in by_id:
            node["replica_of"] = by_id[node["primary_id"]]["address"]
        node.pop("primary_id")
    if down:
        warnings.insert(0, f"Redis Cluster nodes down: {', '.join(down)}")
    return {
        "state": info.get("cluster_state", "unknown"),
        "slots_ok": int(info.get("cluster_slots_ok", 0)),
        "slots_pfail": int(info.get("cluster_slots_pfail", 0)),
        "slots_fail": int(info.get("cluster_slots_fail", 0)),
        "slots_unassigned": 16384 - int(info.get("cluster_slots_assigned", 0)),
        "primaries": sum(1 for n in nodes if n["role"] == "primary" and n["slots"]),
        "known_nodes": len(nodes),
        "down": down,
        "warnings": warnings,
        "nodes": nodes,
    }


def state_problem(state: dict[str, Any]) -> str | None:
    """Why the cluster cannot serve every slot now, for health; None while it can. In state ok, slots may still lack
    a working primary (cluster-require-full-coverage no keeps the others serving): only their mappings bypass. (A
    primary only suspected of failing, PFAIL, is no problem yet: one node's view, often a passing hiccup.)"""
    if state["state"] == "ok" and state["slots_fail"] <= 0:
        return None
    down = f"; nodes down: {', '.join(state['down'])}" if state["down"] else ""
    if state["state"] == "ok":
        return (f"Redis Cluster: {state['slots_fail']} of 16384 slots have a failed primary{down}; requests of the "
                "mappings whose keys live there are served without the cache (X-Cache: BYPASS) until a replica "
                "takes over")
    lacking = 16384 - state["slots_ok"]
    return (f"Redis Cluster is in state {state['state']}: {lacking} of 16384 slots have no working primary{down}; "
            "requests for their keys are served without the cache (X-Cache: BYPASS) until a replica takes over")


def node_infos(cluster: Any, section: str | None = None, primaries_only: bool = False) -> dict[str, dict | str]:
    """INFO (one section, or all) of every node the client knows (or its primaries): node name -> the fields, or
    the error that node gave (a node down answers nothing; others are still read)."""
    nodes = cluster.get_primaries() if primaries_only else cluster.get_nodes()
    found: dict[str, dict | str] = {}
    for node in nodes:
        try:
            client = cluster.get_redis_connection(node)
            found[node.name] = client.info(section) if section else client.info()
        except ERRORS as exc:
            found[node.name] = f"{type(exc).__name__}: {exc}"
    return found


def summed_info(infos: dict[str, dict | str]) -> dict[str, Any]:
    """One INFO for the whole cluster: SUMMED fields added up over the nodes given (the primaries), the rest from
    the first node that answered; the policy says 'mixed' when the nodes differ."""
    answered = [info for info in infos.values() if isinstance(info, dict)]
    if not answered:
        return {}
    total: dict[str, Any] = dict(answered[0])
    for name in SUMMED:
        if any(name in info for info in answered):
            total[name] = sum(int(info.get(name, 0) or 0) for info in answered)
    policies = sorted({str(info.get("maxmemory_policy")) for info in answered if "maxmemory_policy" in info})
    if len(policies) > 1:
        total["maxmemory_policy"] = "mixed: " + ", ".join(policies)
    return total


def memory_warnings(infos: dict[str, dict | str]) -> list[str]:
    """redis_memory.warnings for each node (every one, replicas included: a replica becomes a primary), named."""
    found: list[str] = []
    for name, info in infos.items():
        if isinstance(info, dict):
            found += [f"{name}: {warning}" for warning in redis_memory.warnings(info)]
    return found


def sentinel_primary(client: Any) -> str | None:
    """host:port of the primary Sentinel names now, for a client made by Sentinel.master_for; None otherwise."""
    master_address = getattr(getattr(client, "connection_pool", None), "get_master_address", None)
    if master_address is None:
        return None
    host, port = master_address()
    return f"{host}:{port}"
