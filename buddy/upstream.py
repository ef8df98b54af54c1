"""The upstream leg: one pooled requests.Session per process, an upstream's answer read (whole, or as a stream) into a
ProxyResult, and its failures told apart. What is sent and kept of headers and URLs: buddy.forwarding."""
from __future__ import annotations

import http.client
import io
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.cookiejar import DefaultCookiePolicy
from typing import Iterable, Iterator

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ReadTimeoutError

from buddy.content import body_chunks, content_coding
from buddy.errors import BrokenBody, UpstreamTimeout, UpstreamUnavailable
from buddy.forwarding import BAD_VALUE, client_response_headers, dated, location_for_client, upstream_fields
from buddy.messages import ProxyResult
from buddy.settings import DomainSettings
from buddy.watchdog import Alarm, Watchdog

log = logging.getLogger("buddy.upstream")

CHUNK = 64 * 1024
NO_HOOKS: dict = {"response": []}  # requests' default_hooks(); never added to
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})  # RFC 9110 9.2.2: may be sent again
_DIGITS = re.compile(r"[0-9]+")  # ASCII digits only: str.isdigit() also accepts superscripts


@dataclass
class BodyStream:
    """The rest of an over-size body, streamed to the client chunk by chunk; closes the upstream when done."""

    prefix: Iterable[bytes]  # what was read before the body turned out to be over-size, in chunks
    chunks: Iterator[bytes]
    response: requests.Response
    domain: str
    alarm: Alarm | None = None
    failed: bool = False
    _closed: bool = field(default=False)

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self.prefix
            self.prefix = ()
            for chunk in self.chunks:
                yield chunk
            if self.alarm is not None and self.alarm.fired:
                raise requests.ConnectionError("cut off at the total timeout")
        except requests.RequestException as exc:
            # Headers are already out: the client learns of it from a body cut off the HTTP way.
            self.failed = True
            log.warning("upstream %s broke off a streamed body: %s", self.domain, type(exc).__name__)
            raise BrokenBody(f"upstream '{self.domain}' broke off the body") from exc
        finally:
            self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.alarm is not None:
                Watchdog.disarm(self.alarm)
            self.response.close()


def failure_kind(exc: BaseException) -> str:
    """What went wrong reaching an upstream, in words an operator can act on (never the URL or its query)."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    chain += [arg for e in chain for arg in getattr(e, "args", ()) if isinstance(arg, BaseException)]
    text = " ".join(type(e).__name__ + " " + str(e) for e in chain)
    if isinstance(exc, requests.exceptions.SSLError) or "SSL" in text:
        return "TLS verification failed" if "CERTIFICATE_VERIFY_FAILED" in text else "TLS handshake failed"
    if any(isinstance(e, socket.gaierror) for e in chain) or "NameResolutionError" in text:
        return "DNS lookup failed"
    if any(isinstance(e, ConnectionRefusedError) for e in chain) or "Connection refused" in text:
        return "connection refused"
    if any(isinstance(e, ConnectionResetError) for e in chain) or "reset by peer" in text:
        return "connection reset"
    return "connection failed"


def closed_before_answer(exc: BaseException) -> bool:
    """Did the connection break before the answer began (no status line came: closed, reset or broken while the
    request was sent or its answer awaited), not by a timeout or a refused connection?"""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                             ConnectionAbortedError)):
            return True
        if isinstance(seen, (TimeoutError, ConnectionRefusedError)):
            return False
        nested = [arg for arg in getattr(seen, "args", ()) if isinstance(arg, BaseException)]
        seen = seen.__cause__ or seen.__context__ or (nested[0] if nested else None)
    return False


def socket_of(response: requests.Response) -> socket.socket | None:
    """The socket an upstream answer is read from: the pooled connection's, or (when the upstream said
    `Connection: close` and http.client detached it) the one behind the response's file object."""
    sock = getattr(response.raw.connection, "sock", None)
    if sock is None:
        stream = getattr(getattr(response.raw, "_fp", None), "fp", None)
        sock = getattr(getattr(stream, "raw", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


# Content types an upstream sends as it produces them (an LLM's tokens, a feed's events): a client reads each piece
# as it comes, so the proxy passes them on as they arrive. A JSON document (even chunked) is one value, useless
# until whole: it is read whole first, so that one broken off is a clean 502, not a cut connection.
LIVE_TYPES = frozenset({"text/event-stream", "application/x-ndjson", "application/jsonl", "application/jsonlines",
                        "application/json-seq"})


def is_live(content_type: str) -> bool:
    """Is an answer of this Content-Type a live stream (see LIVE_TYPES)?"""
    return content_type.split(";", 1)[0].strip().lower() in LIVE_TYPES


def is_interim(status: int) -> bool:
    """An interim answer (RFC 9110 15.2) that a final one follows on the same connection: skipped, never used."""
    return 100 <= status < 200 and status != 101


class FinalResponse(http.client.HTTPResponse):
    """http.client's response past every interim answer (RFC 9110 15.2): a 103 Early Hints or 102 Processing before
    the final answer is read and dropped with its fields (http.client itself skips only 100 Continue, and would take
    a 103 for the answer). 101 is left alone: it is final for the connection."""

    def _read_status(self) -> tuple[str, int, str]:
        while True:
            version, status, reason = super()._read_status()  # type: ignore[misc]  # http.client's own step
            if status == 100 or not is_interim(status):  # (begin() skips a 100 Continue itself)
                return version, status, reason
            http.client.parse_headers(self.fp)  # type: ignore[arg-type]  # the interim fields: never used


_connecting = threading.local()  # `.fresh`: this thread's request went out on a connection made for it


class _Connection(HTTPConnection):
    response_class = FinalResponse

    def connect(self) -> None:
        _connecting.fresh = True
        super().connect()


class _TLSConnection(HTTPSConnection):
    response_class = FinalResponse

    def connect(self) -> None:
        _connecting.fresh = True
        super().connect()


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


class UpstreamClient:
    """Sends requests upstream through one pooled Session per process (re-created after a fork)."""

    def __init__(self, max_body: int, pool_size: int = 64) -> None:
        self.max_body = max_body
        self.pool_size = pool_size
        self.watchdog = Watchdog()
        self._session: requests.Session | None = None
        self._pid = 0
        self._lock = threading.Lock()

    @property
    def session(self) -> requests.Session:
        if self._session is None or self._pid != os.getpid():
            with self._lock:
                if self._session is None or self._pid != os.getpid():
                    session = requests.Session()
                    adapter = HTTPAdapter(pool_connections=16, pool_maxsize=self.pool_size, max_retries=0)
                    adapter.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}  # FinalResponse
                    session.mount("https://", adapter)
                    session.mount("http://", adapter)
                    session.trust_env = False  # never route through a proxy from the environment
                    # The upstream gets the client's headers, not requests' defaults (Accept: */*, its
                    # User-Agent): the cache key describes exactly what was sent.
                    session.headers.clear()
                    # The session serves every client of this worker: it must never keep one client's
                    # cookies and send them with another's requests.
                    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
                    self._session, self._pid = session, os.getpid()
        return self._session

    def send(
        self,
        domain: DomainSettings,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes,
    ) -> ProxyResult:
        """Send one request; the body is read whole up to the size limit, streamed past it."""
        headers = {**headers, "Accept-Encoding": "gzip, deflate"}
        deadline = time.monotonic() + domain.total_timeout
        try:
            # What Session.request does, less what cannot apply to this session (it sets no headers, keeps no
            # cookies, reads nothing from the environment): merging those per request cost more than the rest.
            prepared = requests.PreparedRequest()
            prepared.prepare(method=method, url=url, headers=headers, data=body or None, hooks=NO_HOOKS)
            timeouts = (min(domain.connect_timeout, domain.total_timeout),
                        min(domain.read_timeout, domain.total_timeout))
            _connecting.fresh = False
            try:
                response = self.session.send(prepared, stream=True, allow_redirects=False, verify=True, proxies={},
                                             cert=None, timeout=timeouts)
            except requests.ConnectionError as exc:
                # A kept-alive connection the upstream closed as we reused it (legal in HTTP/1.1): the request was
                # never answered, not a byte of it. An idempotent one is sent once more, on another connection;
                # never a POST or PATCH, which the upstream may have acted on, nor one that failed on a connection
                # made for it (that upstream is broken, not idle).
                if method not in IDEMPOTENT or _connecting.fresh or not closed_before_answer(exc):
                    raise
                log.info("upstream %s closed a kept-alive connection before answering; sending it again", domain.name)
                response = self.session.send(prepared, stream=True, allow_redirects=False, verify=True, proxies={},
                                             cert=None, timeout=timeouts)
        except requests.Timeout as exc:
            raise UpstreamTimeout(
                domain.name, f"upstream '{domain.name}' ({domain.netloc}) did not answer in time", "timeout"
            ) from exc
        except requests.RequestException as exc:
            raise UpstreamUnavailable(
                domain.name, f"could not reach upstream '{domain.name}' ({domain.netloc}): {failure_kind(exc)}"
            ) from exc
        except (UnicodeError, ValueError) as exc:  # requests decodes a redirect's Location even when not following
            raise UpstreamUnavailable(
                domain.name, f"upstream '{domain.name}' sent a malformed answer", kind="malformed"
            ) from exc
        alarm = self.watchdog.arm(deadline, socket_of(response))
        try:
            result = self._read(domain, response, alarm)
        except BaseException:
            self.watchdog.disarm(alarm)
            raise
        if result.stream is None:
            self.watchdog.disarm(alarm)
        return result

    def _read(self, domain: DomainSettings, response: requests.Response, alarm: Alarm) -> ProxyResult:
        if not 200 <= response.status_code <= 599 or BAD_VALUE.search(response.reason or ""):
            response.close()  # `200 OK\rX-Evil: 1`: an answer that cannot be passed on, let alone stored
            raise UpstreamUnavailable(
                domain.name, f"upstream '{domain.name}' sent a malformed status line", kind="malformed"
            )
        raw_headers = upstream_fields(response.raw.headers.items())
        framing = {name.lower() for name, _ in raw_headers} & {"content-length", "transfer-encoding"}
        if len(framing) == 2:
            # Which one frames the body? A client and a cache that disagree is how responses are smuggled: a broken
            # answer (nginx's choice too), never stored.
            response.close()
            raise UpstreamUnavailable(domain.name, f"upstream '{domain.name}' sent both Content-Length and "
                                      "Transfer-Encoding", kind="malformed")
        coding = content_coding(response.headers.get("Content-Encoding", ""))
        decoded = coding is not None
        headers = client_response_headers(raw_headers, decoded)
        received = time.time()
        headers = dated(headers, received)
        result = ProxyResult(
            response.status_code, response.reason or "", headers, stored_at=received, upstream_headers=raw_headers
        )
        if "location" in (name.lower() for name, _ in headers):
            result.headers = []
            for name, value in headers:
                sent: str | None = value
                if name.lower() == "location":
                    sent = location_for_client(domain, response.url, value)
                if sent is not None:
                    result.headers.append((name, sent))
        declared = response.headers.get("Content-Length", "")
        if is_live(response.headers.get("Content-Type", "")):
            # Passed on as it arrives, event by event; kept once whole, if it ends within max_body (the service).
            chunks = body_chunks(response, coding, CHUNK, eager=True)
            result.stream, result.live = BodyStream((), chunks, response, domain.name, alarm), True
            if not decoded and _DIGITS.fullmatch(declared):
                result.headers.append(("Content-Length", declared))
            return result
        chunks = body_chunks(response, coding, CHUNK)
        if not decoded and _DIGITS.fullmatch(declared) and int(declared) > self.max_body:
            result.stream = BodyStream((), chunks, response, domain.name, alarm)
            result.headers.append(("Content-Length", declared))
            return result
        # Gathered where the body is then taken from without a copy (BytesIO.getvalue() hands over its buffer).
        buffer = io.BytesIO()
        too_late = f"upstream '{domain.name}' did not finish within its total_timeout ({domain.total_timeout:g} s)"
        try:
            for chunk in chunks:
                buffer.write(chunk)
                if buffer.tell() > self.max_body:
                    # Over the limit after all: what came so far goes on in chunks (not as one write of max_body
                    # bytes, to the client or into a relay entry), then the rest as it comes.
                    result.stream = BodyStream(_pieces(buffer.getvalue()), chunks, response, domain.name, alarm)
                    return result
        except requests.RequestException as exc:
            response.close()
            if alarm.fired:
                raise UpstreamTimeout(domain.name, too_late, "timeout") from exc
            if isinstance(exc.__context__, ReadTimeoutError) or isinstance(exc, requests.Timeout):
                raise UpstreamTimeout(
                    domain.name, f"upstream '{domain.name}' stopped sending in time", "timeout"
                ) from exc
            raise UpstreamUnavailable(
                domain.name, f"upstream '{domain.name}' broke off the body", "broken body"
            ) from exc
        if alarm.fired:  # a shut-down socket also looks like the clean end of a close-delimited body
            response.close()
            raise UpstreamTimeout(domain.name, too_late, "timeout")
        response.close()
        result.body = buffer.getvalue()
        return result


def _pieces(data: bytes) -> Iterator[bytes]:
    """`data` in CHUNK-sized slices (each a small copy, made when it is sent)."""
    for start in range(0, len(data), CHUNK):
        yield data[start : start + CHUNK]
