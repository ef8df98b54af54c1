"""What an error from Redis means to the guard: an outage (and of what: one node of a cluster, or all of it), a slot
passing from one cluster node to another, or else (an error reply, a call redis-py refused to send) a bug."""
from __future__ import annotations

import redis
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)

# Redis (or the part of a cluster that a call needs) cannot serve now. MasterDownError is a ClusterDownError.
OUTAGES = (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError, ClusterDownError, SlotNotCoveredError)
# A slot in migration: TRYAGAIN (a script's keys half moved, or all new while the slot is being imported), a MOVED
# or ASK not followed, or redis-py's "TTL exhausted" ClusterError after 16 of those. (AskError includes MovedError;
# ClusterDownError, also a ClusterError, is an outage and is told apart first.)
PASSING = (TryAgainError, AskError, ClusterError)
# redis-py's own RedisClusterException (no RedisError) for a cluster it cannot reach or map; others are bugs
CLUSTER_OUTAGE_TEXTS = ("cannot be connected", "cannot be reached", "not covered", "could not agree",
                        "No targets were found")
# ... of which these (and connect.LazyCluster's "cannot be reached") mean no node of the cluster answers at all
UNREACHABLE_TEXTS = ("cannot be connected", "cannot be reached", "could not agree", "No targets were found")


def is_outage(exc: BaseException) -> bool:
    """Does this error mean Redis (or a part of the cluster) cannot serve now, rather than a bug?"""
    if isinstance(exc, OUTAGES):
        return True
    return isinstance(exc, RedisClusterException) and any(text in str(exc) for text in CLUSTER_OUTAGE_TEXTS)


def unreachable(exc: BaseException) -> bool:
    """Does this outage mean that no node of a cluster answers (rather than one node, or one slot)?"""
    if isinstance(exc, SlotNotCoveredError):
        return False
    if isinstance(exc, RedisClusterException) or (
            isinstance(exc, redis.ConnectionError) and getattr(exc, "connection", None) is None):
        return any(text in str(exc) for text in UNREACHABLE_TEXTS)
    return False


def node_named_by(exc: BaseException) -> str:
    """host:port of the node a cluster call failed on, as redis-py records it on the error (`connection`: the
    connection or the ClusterNode it used); '' when it does not say."""
    for error in (exc, exc.__cause__):
        where = getattr(error, "connection", None)
        host, port = getattr(where, "host", None), getattr(where, "port", None)
        if host and port:
            return f"{host}:{port}"
    return ""
