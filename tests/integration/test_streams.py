"""A live stream (an LLM's `stream=true` answer: server-sent events) through real gunicorn workers and a real Redis:
each event reaches the client while the upstream is still making the next, on a miss and for every coalesced
request; a stream that breaks is cut and never kept; a whole one is replayed as a hit. The upstream holds each
event until the test lets it go, so the verdicts are about what arrived before what, never about how fast."""
from __future__ import annotations

import json
import queue
import threading
import time
from typing import Any, Iterator

import pytest
import requests

from tests.support.processes import Gunicorn, RedisServer, SharedProxy
from tests.support.raw_upstream import LAST_CHUNK, RESET, RawRequest, RawUpstream, chunk, head

pytestmark = pytest.mark.xdist_group("streams-proxy")
WAIT = 10.0  # seconds a test waits for something that must happen; only a broken proxy makes it wait that long


def completion_chunk(n: int, text: str) -> bytes:
    """One event of an OpenAI-style chat completion stream."""
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "stub",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return f"data: {json.dumps(body)}\n\n".encode()


class Generation:
    """An upstream that generates an event stream one event at a time: `release()` lets the next one go."""

    def __init__(self, events: list[bytes], broken: bool = False) -> None:
        self.events = events
        self.broken = broken
        self.gates: queue.Queue[None] = queue.Queue()
        self.sent: list[int] = []  # indexes of the events sent so far

    def release(self) -> None:
        self.gates.put(None)

    def __call__(self, request: RawRequest, count: int) -> Iterator[Any]:
        yield head("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-transform"),
                              ("Transfer-Encoding", "chunked")])
        for i, event in enumerate(self.events):
            if i:
                self.gates.get(timeout=WAIT)  # the next token is not made until the test says so
            self.sent.append(i)
            yield chunk(event)
        if self.broken:
            yield RESET
            return
        yield LAST_CHUNK


ROUTES: dict[str, Generation] = {}


def route(request: RawRequest, count: int) -> Iterator[Any]:
    return ROUTES[request.target.split("?", 1)[0]](request, count)


@pytest.fixture(scope="module")
def raw_upstream() -> Iterator[RawUpstream]:
    upstream = RawUpstream({"/": route})
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def shared(module_gunicorn, redis_server: RedisServer, raw_upstream: RawUpstream) -> Gunicorn:
    config = {"domain_mappings": {"llm": {"upstream": raw_upstream.url, "read_timeout": 20}}}
    return module_gunicorn(config, env={"REDIS_URL": redis_server.url}, workers=2)


@pytest.fixture
def upstream(raw_upstream: RawUpstream) -> RawUpstream:
    raw_upstream.clear()
    ROUTES.clear()
    return raw_upstream


@pytest.fixture
def proxy(shared: Gunicorn, redis_url: str, upstream: RawUpstream) -> SharedProxy:
    return SharedProxy(shared)


class Reader:
    """A client reading a stream in a thread: the events it got so far, and whether the body ended or broke."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        self.events: queue.Queue[bytes] = queue.Queue()
        self.got: list[bytes] = []
        self.outcome = ""
        self.headers: dict[str, str] = {}
        self.thread = threading.Thread(target=self._read, args=(url, kwargs), daemon=True)
        self.thread.start()

    def _read(self, url: str, kwargs: dict[str, Any]) -> None:
        try:
            with requests.post(url, data=b'{"stream": true}', stream=True, timeout=WAIT, **kwargs) as response:
                self.headers = dict(response.headers)
                for line in response.iter_lines():
                    if line:
                        self.events.put(line)
            self.outcome = "ended"
        except requests.RequestException:
            self.outcome = "broken"

    def next_event(self) -> bytes:
        event = self.events.get(timeout=WAIT)
        self.got.append(event)
        return event

    def finish(self) -> list[bytes]:
        self.thread.join(WAIT)
        while not self.events.empty():
            self.got.append(self.events.get())
        return self.got


EVENTS = [f"data: token {i}\n\n".encode() for i in range(4)]


def test_a_miss_streams_each_event_as_it_is_made(proxy: SharedProxy, upstream: RawUpstream) -> None:
    ROUTES["/v1/chat"] = generation = Generation(EVENTS)
    reader = Reader(proxy.url + "/llm/v1/chat")
    for i in range(len(EVENTS)):
        assert reader.next_event() == EVENTS[i].strip()  # arrived while the upstream holds the next one back
        assert generation.sent == list(range(i + 1))
        generation.release()
    assert reader.finish() == [e.strip() for e in EVENTS] and reader.outcome == "ended"
    assert reader.headers["X-Cache"] == "MISS" and reader.headers["Content-Type"] == "text/event-stream"


def test_coalesced_requests_stream_too_from_one_upstream_call(proxy: SharedProxy, upstream: RawUpstream) -> None:
    ROUTES["/v1/together"] = generation = Generation(EVENTS)
    readers = [Reader(proxy.url + "/llm/v1/together") for _ in range(4)]
    for i in range(len(EVENTS)):
        for reader in readers:
            assert reader.next_event() == EVENTS[i].strip()  # every one of them, before the next is made
        generation.release()
    for reader in readers:
        assert reader.finish() == [e.strip() for e in EVENTS] and reader.outcome == "ended"
    assert sorted(r.headers["X-Cache"] for r in readers) == ["COALESCED"] * 3 + ["MISS"]
    assert upstream.count("/v1/together") == 1


def test_a_stream_that_breaks_is_cut_for_everyone_and_never_kept(proxy: SharedProxy, upstream: RawUpstream) -> None:
    ROUTES["/v1/broken"] = generation = Generation(EVENTS[:2], broken=True)
    readers = [Reader(proxy.url + "/llm/v1/broken") for _ in range(2)]
    for reader in readers:
        assert reader.next_event() == EVENTS[0].strip()
    generation.release()
    for reader in readers:
        reader.finish()
        assert reader.outcome == "broken"  # no final chunk: every client can tell
    ROUTES["/v1/broken"] = Generation(EVENTS[:1])
    again = requests.post(proxy.url + "/llm/v1/broken", data=b'{"stream": true}', timeout=WAIT)
    assert again.headers["X-Cache"] == "MISS" and upstream.count("/v1/broken") == 2  # nothing was kept


def test_a_whole_stream_is_replayed_as_a_hit_byte_for_byte(proxy: SharedProxy, upstream: RawUpstream) -> None:
    ROUTES["/v1/kept"] = generation = Generation(EVENTS)
    for _ in EVENTS:
        generation.release()
    first = requests.post(proxy.url + "/llm/v1/kept", data=b'{"stream": true}', timeout=WAIT)
    hit = requests.post(proxy.url + "/llm/v1/kept", data=b'{"stream": true}', timeout=WAIT)
    assert first.headers["X-Cache"] == "MISS" and hit.headers["X-Cache"] == "HIT"
    assert hit.content == first.content == b"".join(EVENTS)
    assert hit.headers["Content-Type"] == "text/event-stream" and upstream.count("/v1/kept") == 1
    deadline = time.monotonic() + WAIT
    while (cache := requests.get(proxy.url + "/admin/metrics", timeout=WAIT).json()["cache"]["by_domain"]["llm"])[
            "hits"] < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cache["bytes_saved"] >= len(b"".join(EVENTS))  # counted as a hit, with what it saved


def test_the_openai_client_yields_chunks_as_they_are_generated_and_the_same_on_a_hit(
        proxy: SharedProxy, upstream: RawUpstream) -> None:
    from openai import OpenAI

    words = ["Reference", " data", " is", " cached", "."]
    ROUTES["/v1/chat/completions"] = generation = Generation(
        [completion_chunk(i, w) for i, w in enumerate(words)] + [b"data: [DONE]\n\n"])
    client = OpenAI(base_url=proxy.url + "/llm/v1", api_key="sk-test", max_retries=0, timeout=WAIT)
    messages = [{"role": "user", "content": "say something"}]
    stream = client.chat.completions.create(model="stub", messages=messages, stream=True)  # type: ignore[arg-type]
    got = []
    for i, part in enumerate(stream):
        got.append(part.choices[0].delta.content)
        assert generation.sent[-1] == i  # the client has token i while the upstream holds token i + 1
        generation.release()
    assert got == words
    again = client.chat.completions.create(model="stub", messages=messages, stream=True)  # type: ignore[arg-type]
    assert [part.choices[0].delta.content for part in again] == words and upstream.count("/v1/chat") == 1


def test_httpx_streams_a_miss_event_by_event(proxy: SharedProxy, upstream: RawUpstream) -> None:
    import httpx

    ROUTES["/v1/httpx"] = generation = Generation(EVENTS)
    with httpx.stream("POST", proxy.url + "/llm/v1/httpx", content=b"{}", timeout=WAIT) as response:
        lines = response.iter_lines()
        for i in range(len(EVENTS)):
            line = next(line for line in lines if line)
            assert line == EVENTS[i].decode().strip() and generation.sent == list(range(i + 1))
            generation.release()
