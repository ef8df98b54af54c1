"""The coalescing lock: SET NX PX with a token, extended and released only by its owner, through Lua."""
from __future__ import annotations

import logging
import threading
import time
from importlib import resources
from typing import NamedTuple

import redis

from buddy import codec
from buddy.background import ProcessThread
from buddy.errors import StoreUnavailable
from buddy.redis_keys import EntryId, RedisKeys
from buddy.store.guard import StoreGuard
from buddy.store.pieces import PIECE
from buddy.store.wakeup import entry_message

SUCCESSOR_GRACE_MS = 30_000  # a successor is remembered this long after its lock would expire
LOCK_TTL_MS = 3_000  # short: a killed leader's waiters get a successor within seconds; the keeper renews it
KEEPER_NAP_SECONDS = 1.0  # the keeper looks at least this often; a lock due sooner wakes it
log = logging.getLogger("buddy.coalesce")


LIBRARY_END = "-- main:"  # in a script whose functions another script reuses, where its own main part begins


def load_script(name: str) -> str:
    """A Lua script shipped in the package (buddy/store/lua/<name>.lua)."""
    return resources.files("buddy.store").joinpath("lua").joinpath(f"{name}.lua").read_text()


def library(name: str) -> str:
    """The functions of a shipped script, without its main part: prepended to another script that calls them."""
    text = load_script(name)
    assert LIBRARY_END in text, f"{name}.lua has no '{LIBRARY_END}' line"
    return text.split(LIBRARY_END, 1)[0]


def lead_script() -> str:
    """lead.lua, after the functions it runs (acquire_lock.lua's and throttle.lua's) and the size of the piece of an
    entry it reads (buddy.store.pieces)."""
    return f"local PIECE = {PIECE}\n" + library("acquire_lock") + library("throttle") + load_script("lead")


class LeadPlan(NamedTuple):
    """What a request that takes the lock does in the same call (lead.lua): read `cache_key` again and, if
    it is empty, run the throttle with these keys and ARGV (RateLimiter.plan)."""

    cache_key: str
    throttle_keys: list[str]
    throttle_args: list[int | str]


class Ahead(NamedTuple):
    """What lead.lua found for the new leader: the first piece of the value at the plan's cache key (None: nothing
    there; ResponseCache.complete reads the rest, if any), and, only when there was nothing, the throttle's verdict
    as throttle.lua returns it."""

    blob: bytes | None
    verdict: list | None


class FillLock:
    """Who fetches an entry: acquire (or learn the holder), extend while working, release with a hand-off."""

    def __init__(self, client: redis.Redis, guard: StoreGuard, keys: RedisKeys) -> None:
        self.client = client
        self.guard = guard
        self.keys = keys
        self._acquire = client.register_script(load_script("acquire_lock"))
        self._extend = client.register_script(load_script("extend_lock"))
        self._release = client.register_script(load_script("release_lock"))
        self._lead = client.register_script(lead_script())

    def acquire(self, entry: EntryId, token: str, ttl_ms: int, vanished: str = "") -> tuple[bool, str]:
        """(True, token) if this token now leads the fill, else (False, the token of the leader to follow).

        `vanished` names the leader the caller was following when it disappeared without a result; if another
        waiter already took over from it, the answer is that successor, even when it has finished.
        """
        keys = [self.keys.lock(entry), self.keys.successor(entry, vanished)]
        args = [token, ttl_ms, vanished, ttl_ms + SUCCESSOR_GRACE_MS]
        won, holder = self.guard.run(lambda: self._acquire(keys=keys, args=args), key=keys[0])
        return bool(won), holder.decode() if isinstance(holder, bytes) else str(holder)

    def lead(
        self, entry: EntryId, token: str, ttl_ms: int, plan: LeadPlan, vanished: str = ""
    ) -> tuple[bool, str, Ahead | None]:
        """`acquire`, and as the new leader, in the same round trip, what the plan says (see LeadPlan): (True,
        token, what was found) or (False, the token of the leader to follow, None)."""
        keys = [self.keys.lock(entry), self.keys.successor(entry, vanished), plan.cache_key, *plan.throttle_keys]
        args = [token, ttl_ms, vanished, ttl_ms + SUCCESSOR_GRACE_MS, *plan.throttle_args]
        found = self.guard.run(lambda: self._lead(keys=keys, args=args), key=keys[0])
        holder = found[1].decode() if isinstance(found[1], bytes) else str(found[1])
        if not found[0]:
            return False, holder, None
        blob = found[2] if len(found) > 2 else None
        return True, holder, Ahead(blob or None, found[3] if len(found) > 3 else None)

    def extend(self, entry: EntryId, token: str, ttl_ms: int) -> bool:
        key = self.keys.lock(entry)
        return bool(self.guard.run(lambda: self._extend(keys=[key], args=[token, ttl_ms]), key=key))

    def release(self, entry: EntryId, token: str, shared: bytes = b"", shared_ttl_ms: int = 30_000) -> None:
        """Leave `shared` for this leader's followers (if given), drop the lock if still ours, wake everyone."""
        keys = [self.keys.lock(entry), self.keys.shared_result(entry, token)]
        args = [token, self.keys.fill_channel, entry_message(entry), codec.sendable(shared), shared_ttl_ms]
        self.guard.run(lambda: self._release(keys=keys, args=args), key=keys[0])

    def announce(self, entry: EntryId) -> None:
        """Wake the followers without releasing (a relay has started)."""
        self.guard.run(lambda: self.client.publish(self.keys.fill_channel, entry_message(entry)))


class LockKeeper:
    """Extends every fill lock this process holds, a third of its TTL before it would expire, until its
    leader's budget is spent.

    The TTL is short (LOCK_TTL_MS), so a leader whose process dies loses its lock within seconds and a
    waiter takes over; a slow leader (a long wait for a rate-limit slot, a trickling body) keeps it for as
    long as it may legitimately take, and no longer: a leader stuck past its budget lets go too. The
    keeper's thread (a ProcessThread) is restarted if it dies, and after a fork.
    """

    def __init__(self, lock: FillLock) -> None:
        self.lock = lock
        # (entry, token) -> (ttl ms, when to extend next, when to stop extending), monotonic seconds
        self._held: dict[tuple[EntryId, str], tuple[int, float, float]] = {}
        self._mutex = threading.Lock()
        self._changed = threading.Event()
        self.thread = ProcessThread("buddy-lock-keeper", self._run, fresh=self._held.clear)

    def hold(self, entry: EntryId, token: str, ttl_ms: int, budget: float = 3600.0) -> None:
        now = time.monotonic()
        self.thread.ensure()
        with self._mutex:
            self._held[(entry, token)] = (ttl_ms, now + ttl_ms / 3000, now + budget)
        if ttl_ms / 3000 < KEEPER_NAP_SECONDS:
            self._changed.set()  # due before the keeper's longest nap ends: wake it (else, one wake-up per miss)

    def stop(self) -> None:
        self.thread.stopping.set()
        self._changed.set()
        self.thread.stop()

    def drop(self, entry: EntryId, token: str) -> None:
        with self._mutex:
            self._held.pop((entry, token), None)

    def held(self) -> int:
        with self._mutex:
            return len(self._held)

    def _run(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            self._extend_due()  # an error restarts the loop (ProcessThread): locks are never left to expire

    def _extend_due(self) -> None:
        with self._mutex:
            due = min((when for _, when, _ in self._held.values()), default=time.monotonic() + KEEPER_NAP_SECONDS)
        self._changed.wait(max(0.0, min(KEEPER_NAP_SECONDS, due - time.monotonic())))
        self._changed.clear()
        now = time.monotonic()
        with self._mutex:
            ready = [(key, ttl, until) for key, (ttl, when, until) in self._held.items() if when <= now]
        for (entry, token), ttl_ms, until in ready:
            if now >= until:
                log.warning("a fill of '%s' outlived its budget; its lock is left to expire", entry.domain)
                self.drop(entry, token)
                continue
            try:
                kept = self.lock.extend(entry, token, ttl_ms)
            except StoreUnavailable:
                kept = True  # try again next time; the lock may still be ours
            with self._mutex:
                if (entry, token) in self._held:
                    if kept:
                        self._held[(entry, token)] = (ttl_ms, now + ttl_ms / 3000, until)
                    else:
                        del self._held[(entry, token)]  # expired or taken over: nothing left to keep
