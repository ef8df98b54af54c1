"""The outbox a request's thread writes its answer through (buddy.outbox): a client that does not read costs the
bytes it has not taken, not the thread; the worker's budget for such bytes holds; nothing is lost or reordered."""
from __future__ import annotations

import socket
import threading
from typing import Iterator

import pytest

from buddy.outbox import PRODUCER_AHEAD, Outbox, SendBudget

LARGE = 8 * 1024 * 1024  # more than a socket pair's buffers hold


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def outbox(sock: socket.socket, budget: SendBudget) -> tuple[Outbox, list[int]]:
    woken: list[int] = []
    return Outbox(sock, budget, timeout=60, wake=lambda: woken.append(1)), woken


def read_exactly(sock: socket.socket, size: int, box: Outbox) -> bytes:
    """What the client reads, the loop sending the rest as it does (as the worker's selector would)."""
    got = bytearray()
    sock.settimeout(5)
    while len(got) < size:
        box.flush()
        got += sock.recv(1024 * 1024)
    return bytes(got)


def body(seed: int, size: int = LARGE) -> bytes:
    return bytes([seed]) * 7 + bytes(range(256)) * (size // 256)


def test_a_client_that_does_not_read_leaves_its_answer_queued_and_the_thread_free(pair) -> None:
    ours, theirs = pair
    budget = SendBudget(256 * 1024 * 1024)
    box, woken = outbox(ours, budget)
    answer = body(1)
    done = threading.Thread(target=box.sendall, args=(answer,))
    done.start()
    done.join(5)
    assert not done.is_alive()  # the thread returned although the client has read nothing
    assert box.pending and woken == [1] and 0 < box.queued < len(answer)
    assert budget.held == len(answer)  # held as it is, not copied
    later = threading.Thread(target=box.sendall, args=(b"and then more",))  # waits: its client is far behind
    later.start()
    assert read_exactly(theirs, len(answer) + 13, box) == answer + b"and then more"  # behind it, never past it
    later.join(5)
    assert box.flush() and not box.pending and budget.held == 0


def test_many_clients_of_one_large_answer_hold_it_once(pair) -> None:
    budget = SendBudget(3 * LARGE)
    boxes = []
    socks = [socket.socketpair() for _ in range(10)]
    try:
        for ours, _ in socks:
            box, _ = outbox(ours, budget)
            box.sendall(body(2))  # a fresh copy each time, as each hit reads the entry from Redis
            boxes.append(box)
        assert budget.held == len(body(2))  # ten clients, one copy held
        assert read_exactly(socks[3][1], len(body(2)), boxes[3]) == body(2)
    finally:
        for ours, theirs in socks:
            ours.close()
            theirs.close()


def test_past_the_budget_the_thread_waits_until_its_client_has_read_it_all(pair) -> None:
    ours, theirs = pair
    budget = SendBudget(LARGE // 2)
    box, _ = outbox(ours, budget)
    answer = body(3)
    writer = threading.Thread(target=box.sendall, args=(answer,))
    writer.start()
    writer.join(0.5)
    assert writer.is_alive()  # over the worker's budget: this one holds its thread, as gunicorn's would
    assert read_exactly(theirs, len(answer), box) == answer
    writer.join(5)
    assert not writer.is_alive() and budget.held == 0


def test_a_stream_is_not_read_ahead_of_its_client_by_more_than_a_bound(pair) -> None:
    ours, theirs = pair
    box, _ = outbox(ours, SendBudget(256 * 1024 * 1024))
    chunks = [bytes([i]) * (256 * 1024) for i in range(40)]  # 10 MB, written as a stream's chunks
    written: list[int] = []

    def produce() -> None:
        for chunk in chunks:
            box.sendall(chunk)
            written.append(len(chunk))

    producer = threading.Thread(target=produce)
    producer.start()
    producer.join(1)
    assert producer.is_alive()  # waiting for its client
    assert box.queued <= PRODUCER_AHEAD + len(chunks[0])
    assert read_exactly(theirs, sum(map(len, chunks)), box) == b"".join(chunks)
    producer.join(5)
    assert len(written) == len(chunks)


def test_a_client_closed_for_not_reading_fails_its_thread_next_write_and_frees_the_budget(pair) -> None:
    ours, _theirs = pair
    budget = SendBudget(256 * 1024 * 1024)
    box, _ = outbox(ours, budget)
    box.sendall(body(4))
    assert box.abort() > 0 and budget.held == 0 and not box.pending
    with pytest.raises(BrokenPipeError):
        box.sendall(b"more")
