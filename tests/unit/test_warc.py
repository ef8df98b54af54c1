"""WARC export and import on fakeredis: an imported answer is stored exactly as the proxy stores the same answer
fetched live, exports round-trip under the same keys, credentials never leave, and bad input is told and survived."""
from __future__ import annotations

import gzip
import io
import re
import time
import uuid
import zlib
from typing import Any, Iterator

import fakeredis
import pytest
from flask import Flask
from warcio.archiveiterator import ArchiveIterator

from buddy import codec, create_app, policy
from buddy.archive import HostMap, parse_duration, resolve, warcfile
from buddy.forwarding import build_url, forwardable_request_headers
from buddy.messages import ProxyRequest, ProxyResult
from tests.support.raw_upstream import LAST_CHUNK, RawUpstream, chunk, head

GZ = gzip.compress(b'{"word": "dog", "edges": [' + b'{"rel": "IsA"},' * 40 + b'{}]}')
DEFLATED = zlib.compress(b"deflated, zlib-wrapped")
# Raw upstream answers, each covering what the proxy changes before it stores an answer.
ANSWERS: dict[str, bytes] = {
    "chunked-gzip": head(headers=[("Content-Type", "application/json"), ("Transfer-Encoding", "chunked"),
                                  ("Content-Encoding", "gzip"), ("Set-Cookie", "s=1; Path=/"),
                                  ("X-Cache", "HIT from a cdn")]) + chunk(GZ[:20]) + chunk(GZ[20:]) + LAST_CHUNK,
    "deflate-latin1-hops": head(headers=[("Content-Encoding", "deflate"), ("Content-Length", str(len(DEFLATED))),
                                         ("X-Name", "caf\xe9"), ("Connection", "close, X-Hop"), ("X-Hop", "1"),
                                         ("Keep-Alive", "timeout=5")], close=False) + DEFLATED,
    "folded": b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    "created": head("201 Created", [("Location", "/case/target?x=1"), ("Content-Length", "0")]),
    "varies": head(headers=[("Vary", "X-Tenant, Accept-Encoding"), ("Content-Length", "6")]) + b"tenant",
    "brotli": head(headers=[("Content-Encoding", "br"), ("Content-Length", "4")]) + b"\x8b\x02\x80x",
    "not-found": head("404 Not Found", [("Content-Type", "application/json"), ("Content-Length", "2")]) + b"{}",
    "private-cookie": head(headers=[("Cache-Control", 'private="Set-Cookie"'), ("Set-Cookie", "id=9"),
                                    ("Content-Length", "1")]) + b"x",
    "to-close": head(headers=[("Content-Type", "text/plain")]) + b"read until the connection closes",
}
SENT = {"Accept": "application/json", "X-Tenant": "acme", "Authorization": "Bearer sk-live-secret-0001"}


def warc(kind: str, uri: str, payload: bytes, record_id: str | None = None, links: tuple[str, ...] = (),
         date: str | None = None, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """One WARC/1.0 record, byte for byte (warcio's writer would re-encode the HTTP headers)."""
    lines = ["WARC/1.0", f"WARC-Type: {kind}", f"WARC-Record-ID: {record_id or f'<urn:uuid:{uuid.uuid4()}>'}",
             f"WARC-Target-URI: {uri}",
             f"WARC-Date: {date or time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
             *(f"WARC-Concurrent-To: {link}" for link in links), *(f"{n}: {v}" for n, v in extra),
             f"Content-Type: application/http; msgtype={kind}", f"Content-Length: {len(payload)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload + b"\r\n\r\n"


def exchange(url: str, answer: bytes, method: str = "GET", headers: dict[str, str] | None = None,
             body: bytes = b"", gzipped: bool = False, **kwargs: Any) -> bytes:
    """A response record and its request record, in capture_http's order (the request links to the response);
    `gzipped`: each record a gzip member, as in a .warc.gz."""
    target = url.split("/", 3)[3] if url.count("/") >= 3 else ""
    host = url.split("/")[2]
    sent = [("Host", host), ("Accept-Encoding", "gzip, deflate"), *(headers or {}).items()]
    if body:
        sent.append(("Content-Length", str(len(body))))
    request = (f"{method} /{target} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in sent)).encode("latin-1")
    response_id = f"<urn:uuid:{uuid.uuid4()}>"
    records = (warc("response", url, answer, record_id=response_id, **kwargs),
               warc("request", url, request + b"\r\n" + body, links=(response_id,)))
    return b"".join(gzip.compress(record) if gzipped else record for record in records)


def make_app(upstream_url: str, name: str = "up", domain: dict[str, Any] | None = None, **config: Any) -> Flask:
    """An app with one mapping, `name` (settings `domain` besides its upstream), on a fakeredis of its own."""
    return create_app({"domain_mappings": {name: {"upstream": upstream_url, "connect_timeout": 2, "read_timeout": 2,
                                                  **(domain or {})}},
                       "cache": {"max_cache_response_size": 64 * 1024}, "logging": {"enable_console": False},
                       **config}, redis_client=fakeredis.FakeRedis(server=fakeredis.FakeServer()), environ={})


@pytest.fixture
def apps() -> Iterator[Any]:
    made: list[Flask] = []

    def make(url: str, name: str = "up", domain: dict[str, Any] | None = None, **config: Any) -> Flask:
        made.append(make_app(url, name, domain, **config))
        return made[-1]

    yield make
    for app in made:
        app.extensions["buddy"].shutdown()


def entries(app: Flask) -> dict[str, Any]:
    """Every cache key of the app's Redis -> its decoded value (a pointer, or the response fields that are served)."""
    client = app.extensions["buddy"].redis
    out: dict[str, Any] = {}
    for key in client.scan_iter("buddy:cache:*"):
        value = codec.decode(client.get(key))
        # A Date the proxy added (the answer had none) says when each copy was received: a moment apart here.
        out[key.decode()] = value if isinstance(value, codec.VaryPointer) else (
            value.status, value.reason, [(n, "(a date)" if n == "Date" else v) for n, v in value.headers], value.body,
            value.vary, value.variant)
    return out


def run(app: Flask, *args: str) -> Any:
    return app.test_cli_runner().invoke(args=["buddy", *args])


def test_durations() -> None:
    assert [parse_duration(t) for t in ("90", "90s", "15m", "2h", "7d", "1w")] == [90, 90, 900, 7200, 604800, 604800]
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_a_credential_digest_keys_an_entry_as_the_credential_itself_does(app) -> None:
    domain = app.extensions["buddy"].settings.domains["up"]
    for namespace in ("", "ci"):
        headers = [("Accept", "text/html"), ("X-API-Key", "k-1")]
        request = ProxyRequest(domain, "POST", "/x", "b=2&a=1", headers, b"body",
                               forwardable_request_headers(headers), namespace=namespace)
        digest = policy.stored_request(request, "http://x/").credentials
        bare = ProxyRequest(domain, "POST", "/x", "b=2&a=1", headers[:1], b"body",
                            forwardable_request_headers(headers[:1]), namespace=namespace)
        assert policy.entry_for(bare, digest) == policy.entry_for(request)  # the digest stands for the value


def test_an_imported_answer_is_stored_exactly_as_the_proxy_stores_it_fetched_live(apps, tmp_path) -> None:
    raw = RawUpstream({f"/case/{name}": (lambda answer: lambda request, count: [answer])(answer)
                       for name, answer in ANSWERS.items()})
    try:
        live, imported = apps(raw.url), apps(raw.url)
        client = live.test_client()
        records = b""
        for name, answer in ANSWERS.items():
            assert client.get(f"/up/case/{name}", headers=SENT).headers["X-Cache"] == "MISS"
            records += exchange(f"{raw.url}/case/{name}", answer, headers=SENT)
        (tmp_path / "live.warc.gz").write_bytes(gzip.compress(records))  # gzipped whole, not per record: read too
        # The recording carries a credential (SENT): the file alone vouches for it, so only when told to trust it.
        result = run(imported, "import", "--trust-credentials-from-file", str(tmp_path / "live.warc.gz"))
        assert result.exit_code == 0, result.output
        assert f"imported {len(ANSWERS)} entries from 1 file" in result.output
        assert f"trusted the file alone for the credentials of {len(ANSWERS)} of them" in result.output
        assert entries(imported) == entries(live)  # same keys (variants and pointers too), same stored answers
        # A folded field is unfolded to one space (RFC 9112 5.2), whether or not urllib3 unfolds it itself.
        assert imported.test_client().get("/up/case/folded", headers=SENT).headers["X-Folded"] == "a b"
        assert b"sk-live-secret" not in b"".join(imported.extensions["buddy"].redis.dump(k) or b""
                                                 for k in imported.extensions["buddy"].redis.keys("*"))
        hit = imported.test_client().get("/up/case/chunked-gzip", headers=SENT)
        assert hit.headers["X-Cache"] == "HIT" and hit.data == gzip.decompress(GZ)
        assert "Set-Cookie" not in hit.headers and hit.headers["X-Upstream-Cache"] == "HIT from a cdn"
        assert imported.test_client().get("/up/case/chunked-gzip", headers={**SENT, "Authorization": "Bearer other"}
                                          ).headers["X-Cache"] == "MISS"  # keyed on the recorded credentials
    finally:
        raw.stop()


def test_an_export_imports_under_the_same_keys_with_credentials_only_as_a_digest(apps, tmp_path) -> None:
    raw = RawUpstream({"/case/": lambda request, count: [ANSWERS["varies"]]})
    try:
        source, copy = apps(raw.url), apps(raw.url)
        records = b""
        for i, (method, headers) in enumerate([("GET", {"Accept": "a/b"}), ("POST", {"Content-Type": "text/plain"}),
                                               ("GET", SENT), ("GET", {"X-Tenant": "t2", "Accept-Language": "fr"})]):
            records += exchange(f"{raw.url}/case/{i}?q=caf%C3%A9&b=2&a=1", ANSWERS["not-found" if i == 3 else "varies"],
                                method=method, headers=headers, body=b"payload" if method == "POST" else b"")
        (tmp_path / "in.warc").write_bytes(records)
        trusting = ("--trust-credentials-from-file",)  # SENT carries a credential
        assert run(source, "import", *trusting, "--namespace", "ci", str(tmp_path / "in.warc")).exit_code == 0
        out = tmp_path / "out.warc.gz"
        plain = run(source, "export", "-o", str(out))
        assert plain.exit_code == 0 and "exported 3 entries" in plain.output
        assert "1 keyed on credentials (see --include-credentialed)" in plain.output
        full = run(source, "export", "up", "-o", str(out), "--namespace", "ci", "--include-credentialed")
        assert full.exit_code == 0 and "exported 4 entries" in full.output, full.output
        data = out.read_bytes()
        assert b"sk-live-secret" not in gzip.decompress(data) and b"sk-live-secret" not in data
        kinds = [(r.rec_type, r.rec_headers.get_header("WARC-Buddy-Namespace"))
                 for r in ArchiveIterator(io.BytesIO(data))]
        assert kinds[0] == ("warcinfo", None) and kinds[1:].count(("response", "ci")) == 4
        result = run(copy, "import", str(out))  # another installation: the credentialed entry only when trusted
        assert result.exit_code == 0 and "imported 3 entries" in result.output, result.output
        assert "imported 1 entries" in run(copy, "import", *trusting, str(out)).output
        assert entries(copy) == entries(source)
        assert run(copy, "import", str(out)).output.count("already cached, as fresh or fresher") == 1  # idempotent
        assert run(source, "export", "-o", str(out), "--namespace", "other").output.count("exported 0 entries") == 1
    finally:
        raw.stop()


def store(app: Flask, path: str, query: str = "", headers: tuple[tuple[str, str], ...] = (), fresh_for: int = 3600,
          age: float = 5.0, response_headers: tuple[tuple[str, str], ...] = ()) -> None:
    """An entry as the proxy stores one (with its request)."""
    buddy = app.extensions["buddy"]
    domain = buddy.settings.domains["up"]
    request = ProxyRequest(domain, "GET", path, query, list(headers), b"", forwardable_request_headers(list(headers)))
    stored = ProxyResult(200, "OK", list(response_headers), b"{}", stored_at=time.time() - age, fresh_for=fresh_for,
                         request=policy.stored_request(request, build_url(domain, path, query)))
    buddy.service.cache.put(policy.entry_for(request), stored, policy.kept_for(domain, fresh_for))


def test_query_credentials_and_the_access_key_are_never_exported(apps, tmp_path) -> None:
    app = apps("http://127.0.0.1:9", security={"require_secure_key": True, "secure_key": "the-proxy-key-0123456789"})
    store(app, "/a", "api_key=upstream-secret")
    store(app, "/b", response_headers=(("X-Echo", "the-proxy-key-0123456789"),))
    store(app, "/c", "page=2")
    buddy = app.extensions["buddy"]
    buddy.service.cache.put(policy.entry_for(ProxyRequest(buddy.settings.domains["up"], "GET", "/old", "", [], b"",
                                                          {})), ProxyResult(200, "OK", [], b"x", stored_at=1.0), 60)
    result = run(app, "export", "-o", str(tmp_path / "x.warc"), "--include-credentialed")
    assert result.exit_code == 0 and "exported 1 entries" in result.output
    for reason in ("an upstream credential in the query (never exported)",
                   "carries the proxy's access key (never exported)",
                   "stored by an older version (no request recorded)"):
        assert f"1 {reason}" in result.output
    data = (tmp_path / "x.warc").read_bytes()
    assert b"upstream-secret" not in data and b"the-proxy-key" not in data and b"page=2" in data


def test_freshness_is_carried_and_expired_entries_need_a_new_ttl(apps, tmp_path) -> None:
    source, copy = apps("http://127.0.0.1:9"), apps("http://127.0.0.1:9")
    store(source, "/fresh", fresh_for=3600, age=600)
    store(source, "/expired", fresh_for=60, age=600)
    out = tmp_path / "x.warc.gz"
    assert run(source, "export", "-o", str(out)).exit_code == 0
    left = {r.rec_headers.get_header("WARC-Target-URI").rsplit("/", 1)[1]: r.rec_headers.get_header(
        "WARC-Buddy-Fresh-Left") for r in ArchiveIterator(io.BytesIO(out.read_bytes())) if r.rec_type == "response"}
    assert left["expired"] == "0" and 2990 <= int(left["fresh"]) <= 3000
    result = run(copy, "import", str(out))
    assert "imported 1 entries" in result.output and "1 expired (give them new freshness with --ttl)" in result.output
    assert result.exit_code == 0  # not an error: the entry is just old
    assert copy.test_client().get("/up/fresh").headers["Age"] in ("600", "601")
    assert "imported 1 entries" in run(copy, "import", "--ttl", "10m", str(out)).output  # /expired; /fresh is fresher
    assert copy.test_client().get("/up/expired").headers["X-Cache"] == "HIT"
    assert "imported 2 entries" in run(copy, "import", "--overwrite", "--ttl", "2h", str(out)).output
    assert "imported 0 entries" in run(copy, "import", str(out)).output


def test_answers_the_proxy_never_stores_are_refused_with_a_reason(app, upstream, tmp_path) -> None:
    body = b'{"ok": true}'
    plain = head(headers=[("Content-Length", str(len(body)))]) + body
    cases = [
        exchange(f"{upstream.url}/private", head(headers=[("Cache-Control", "private"), ("Content-Length", "0")])),
        exchange(f"{upstream.url}/no-store", head(headers=[("Cache-Control", "no-store"), ("Content-Length", "0")])),
        exchange(f"{upstream.url}/boom", head("500 Internal Server Error", [("Content-Length", "0")])),
        exchange(f"{upstream.url}/put", plain, method="PUT"),
        exchange(f"{upstream.url}/head", head(headers=[("Content-Length", "12")]), method="HEAD"),
        exchange(f"{upstream.url}/ranged", plain, headers={"Range": "bytes=0-1"}),
        exchange(f"{upstream.url}/huge", head(headers=[("Content-Length", "70000")]) + b"x" * 70000),
        exchange(f"{upstream.url}/cookie", head(headers=[("Set-Cookie", "a=1"), ("Content-Length", "12")]) + body),
    ]
    (tmp_path / "x.warc").write_bytes(b"".join(cases))
    result = run(app, "import", str(tmp_path / "x.warc"))
    assert result.exit_code == 0 and "imported 1 entries" in result.output, result.output
    for reason in ("2 answers marked private or no-store, or with Vary: *", "1 status 500 (never stored)",
                   "1 PUT requests (never cached)", "1 HEAD requests (no body was recorded)",
                   "1 conditional or range requests (never cached)",
                   "1 bodies over cache.max_cache_response_size (never stored)"):
        assert reason in result.output
    hit = app.test_client().get("/up/cookie")
    assert hit.headers["X-Cache"] == "HIT" and "Set-Cookie" not in hit.headers and hit.data == body
    assert upstream.log == []


def test_bad_input_is_told_and_the_rest_still_imported(app, upstream, tmp_path) -> None:
    answer = head(headers=[("Content-Length", "2")]) + b"ok"
    members = [exchange(f"{upstream.url}/item/{i}", answer, gzipped=True) for i in range(10)]
    damaged = bytearray(b"".join(members))
    middle = sum(len(m) for m in members[:4])
    damaged[middle + 12: middle + 40] = b"\x00" * 28  # one member's deflate data destroyed
    files = {"damaged.warc.gz": bytes(damaged), "cut.warc.gz": b"".join(members)[: middle + len(members[4]) // 2],
             "notes.txt": b"this is not a WARC file\n" * 20,
             "orphan.warc": warc("response", f"{upstream.url}/orphan", answer)
             + exchange("https://elsewhere.example/x", answer)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    result = run(app, "import", *(str(tmp_path / name) for name in files))
    assert result.exit_code == 1
    assert "error: damaged.warc.gz at offset" in result.output and "corrupt data" in result.output
    assert "error: cut.warc.gz at offset" in result.output and "the file ends inside a record" in result.output
    assert "error: notes.txt at offset 0" in result.output and "1 not a WARC file (error)" in result.output
    assert "2 a response record with no request record (error)" in result.output  # the orphan, and the cut one
    assert "1 no mapping for https://elsewhere.example:443 (see --map HOST=NAME) (error)" in result.output
    assert "imported 9 entries from 4 files" in result.output, result.output  # 9 of damaged, the 4 before the cut
    client = app.test_client()
    assert [client.get(f"/up/item/{i}").headers["X-Cache"] for i in range(10)].count("HIT") == 9
    assert run(app, "import", "--map", "elsewhere.example=up", str(tmp_path / "orphan.warc")).output.count(
        "imported 1 entries") == 1


def test_records_pair_in_either_order_and_by_uri_when_unlinked(app, upstream, tmp_path) -> None:
    answer = head(headers=[("Content-Length", "2")]) + b"ok"
    request = f"GET /{{}} HTTP/1.1\r\nHost: {upstream.url[7:]}\r\n\r\n"
    wget_like = (warc("request", f"{upstream.url}/first", request.format("first").encode(), record_id="<urn:q>")
                 + warc("response", f"{upstream.url}/first", answer, links=("<urn:q>",)))
    unlinked = (warc("request", f"{upstream.url}/bare", request.format("bare").encode())
                + warc("response", f"{upstream.url}/bare", answer))
    (tmp_path / "x.warc").write_bytes(wget_like + unlinked + exchange(f"{upstream.url}/capture", answer))
    result = run(app, "import", str(tmp_path / "x.warc"))
    assert result.exit_code == 0 and "imported 3 entries" in result.output, result.output


def test_a_url_belongs_to_the_longest_base_path_or_the_recorded_mapping() -> None:
    config = {"domain_mappings": {"root": {"upstream": "https://api.example.org"},
                                  "v2": {"upstream": "https://api.example.org/v2/"}}}
    app = create_app(config, redis_client=fakeredis.FakeRedis(), environ={})
    try:
        domains = app.extensions["buddy"].settings.domains
        found = resolve(domains, "https://API.example.org:443/v2/items?x=1", "", ())
        assert found is not None and (found[0].name, found[1]) == ("v2", "items")
        found = resolve(domains, "https://api.example.org/v2/items", "root", ())
        assert found is not None and (found[0].name, found[1]) == ("root", "v2/items")
        assert resolve(domains, "http://api.example.org/v2/items", "", ()) is None  # another scheme, another port
        moved = (HostMap.parse("http://localhost:5000/api=v2"),)
        found = resolve(domains, "http://localhost:5000/api/items", "", moved)
        assert found is not None and (found[0].name, found[1]) == ("v2", "items")
        assert resolve(domains, "http://localhost:5000/other", "", moved) is None
        with pytest.raises(ValueError):
            HostMap.parse("no-name-here")
    finally:
        app.extensions["buddy"].shutdown()


# -- what a hostile review of issue 14 found ---------------------------------------------------------------------

NOWHERE = "http://127.0.0.1:9"
OK = head(headers=[("Content-Length", "2")]) + b"ok"


def imported_count(output: str) -> int:
    found = re.search(r"imported ([0-9]+) entries", output)
    assert found, output
    return int(found.group(1))


def test_an_archived_fetch_ms_cannot_break_metrics_or_count_twice(apps, tmp_path) -> None:
    (tmp_path / "x.warc").write_bytes(exchange(f"{NOWHERE}/x", OK, extra=(("WARC-Buddy-Fetch-Ms", "1e20"),)))
    app = apps(NOWHERE)
    assert "imported 1 entries" in run(app, "import", str(tmp_path / "x.warc")).output
    client, buddy = app.test_client(), app.extensions["buddy"]
    metrics = buddy.service.metrics
    for _ in range(3):
        assert client.get("/up/x").headers["X-Cache"] == "HIT"
        metrics.flush()
    assert buddy.redis.hget("buddy:stats:{up}", "hits") == b"3"  # not 6: a failed flush re-added them
    assert int(buddy.redis.hget("buddy:stats:{up}", "ms_saved")) <= 3 * 120_000  # at most the total_timeout each
    assert client.get("/admin/health").status_code == 200
    metrics.count_many("up", {"ms_saved": 10**20, "hits": 1})  # whatever counts it, an increment is clamped
    metrics.flush()
    assert buddy.redis.hget("buddy:stats:{up}", "hits") == b"4"
    assert client.get("/admin/health").status_code == 200
    # One command of the flush refused (a key of another type): the others are counted once, never re-added.
    buddy.redis.set(metrics.keys.minute_counts("up", int(time.time() // 60)), "not a hash")
    metrics.count("up", "hits")
    metrics.flush()
    metrics.flush()
    assert buddy.redis.hget("buddy:stats:{up}", "hits") == b"5"


def test_a_gzip_member_whose_warc_header_line_never_ends_keeps_memory_bounded(apps, tmp_path) -> None:
    import resource

    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    path = tmp_path / "bomb.warc.gz"
    with open(path, "wb") as out:  # about 0.5 MB on disk, 512 MB decoded
        out.write(compressor.compress(b"WARC/1.0\r\nWARC-Type: response\r\nX: "))
        for _ in range(512):
            out.write(compressor.compress(b"A" * (1 << 20)))
        out.write(compressor.flush())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run(apps(NOWHERE), "import", str(path))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert result.exit_code == 1
    assert grown_mb < 200, f"import of a {path.stat().st_size}-byte file grew RSS by {grown_mb:.0f} MB"


class CountingFile(io.FileIO):
    """A file that counts the bytes read from it: what an import costs, whatever the machine's load."""

    read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        CountingFile.read_bytes += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        count = super().readinto(buffer) or 0
        CountingFile.read_bytes += count
        return count


@pytest.mark.parametrize("noise", ["gzip magic", "WARC lines", "WARC lines, gzipped whole"])
def test_noise_that_looks_like_records_costs_reads_in_proportion_to_its_size(apps, tmp_path, monkeypatch,
                                                                           noise) -> None:
    monkeypatch.setattr(warcfile, "open", lambda path, mode: io.BufferedReader(CountingFile(path, "r")),
                        raising=False)
    after = exchange(f"{NOWHERE}/after", OK, gzipped=noise == "gzip magic")
    read = []
    for times in (1, 2):
        data = {"gzip magic": b"\x1f\x8b" + b"\x1f\x8b\x08\x00" * 50_000 * times + after,  # 200 kB a time
                "WARC lines": b"\nWARC/1.0" * 50_000 * times + after,
                "WARC lines, gzipped whole": gzip.compress(b"\nWARC/1.0\r\nX: y" * 25_000 * times + after)}[noise]
        (tmp_path / "noise.warc.gz").write_bytes(data)
        CountingFile.read_bytes = 0
        result = run(apps(NOWHERE), "import", str(tmp_path / "noise.warc.gz"))
        assert result.exit_code == 1 and "imported 1 entries" in result.output, result.output  # the record after it
        read.append(CountingFile.read_bytes / len(data))
    # Bytes read per byte of file stay flat as the noise doubles (it was quadratic: ~144 s for 400 kB of gzip magic).
    assert read[1] < 1.5 * read[0], read


@pytest.mark.parametrize("damage", ["trailing garbage", "truncated", "none: two records a member"])
def test_a_damaged_whole_gzip_file_is_reported_and_the_other_files_still_import(apps, tmp_path, damage) -> None:
    records = [exchange(f"{NOWHERE}/item/{i}", OK) for i in range(40)]
    whole = gzip.compress(b"".join(records))
    data = {"trailing garbage": whole + b"garbage", "truncated": whole[: len(whole) * 2 // 3],
            "none: two records a member": b"".join(gzip.compress(pair) for pair in records)}[damage]
    (tmp_path / "a.warc.gz").write_bytes(data)
    (tmp_path / "b.warc").write_bytes(exchange(f"{NOWHERE}/other", OK))
    result = run(apps(NOWHERE), "import", str(tmp_path / "a.warc.gz"), str(tmp_path / "b.warc"))
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)  # (was a
    # BadGzipFile or EOFError traceback)
    assert "from 2 files" in result.output, result.output
    if damage == "trailing garbage":
        assert result.exit_code == 1 and "imported 41 entries" in result.output
        assert "1 corrupt data (error)" in result.output
    elif damage == "truncated":
        assert result.exit_code == 1 and "the file ends inside a record" in result.output
        assert imported_count(result.output) >= 20
    else:
        assert result.exit_code == 0 and "imported 41 entries" in result.output


def test_vary_on_a_credential_keeps_the_variants_apart_across_an_export(apps, tmp_path) -> None:
    def answer(request: Any, count: int) -> list[bytes]:
        body = b"for alice" if "alice" in request.headers.get("authorization", "") else b"anonymous"
        return [head(headers=[("Vary", "Authorization"), ("Content-Length", str(len(body)))]) + body]

    raw = RawUpstream({"/acct": answer})
    shared = {"share_across_credentials": True}
    try:
        source = apps(raw.url, domain=shared)
        alice = {"Authorization": "Bearer alice-token"}
        assert source.test_client().get("/up/acct", headers=alice).data == b"for alice"
        assert source.test_client().get("/up/acct").headers["X-Cache"] == "MISS"  # live: another variant
        plain = run(source, "export", "-o", str(tmp_path / "plain.warc"))
        assert "2 keyed on credentials (see --include-credentialed)" in plain.output, plain.output
        copy = apps(raw.url, domain=shared)
        run(copy, "import", str(tmp_path / "plain.warc"))
        calls = len(raw.log)
        anonymous = copy.test_client().get("/up/acct")
        assert anonymous.headers["X-Cache"] == "MISS" and anonymous.data == b"anonymous"  # was HIT b"for alice"
        assert len(raw.log) == calls + 1
        # With --include-credentialed each variant goes with its key as a digest, never the value it was keyed on.
        out = tmp_path / "full.warc"
        assert "exported 2 entries" in run(source, "export", "-o", str(out), "--include-credentialed").output
        assert b"alice-token" not in out.read_bytes()
        full, calls = source, len(raw.log)  # back into the installation that exported (and sealed) them
        assert run(full, "clear-cache").exit_code == 0
        assert "imported 2 entries" in run(full, "import", str(out)).output
        client = full.test_client()
        assert client.get("/up/acct", headers=alice).data == b"for alice"
        assert client.get("/up/acct").data == b"anonymous" and len(raw.log) == calls
        assert client.get("/up/acct", headers={"Authorization": "Bearer bob"}).headers["X-Cache"] == "MISS"
        elsewhere = run(apps(raw.url, domain=shared), "import", "--namespace", "other", str(out))
        assert "imported 0 entries" in elsewhere.output and "holds as a digest only" in elsewhere.output
    finally:
        raw.stop()


def test_an_older_unvarying_answer_does_not_replace_fresher_variants_without_overwrite(apps, tmp_path) -> None:
    raw = RawUpstream({"/doc": lambda r, n: [head(headers=[("Vary", "X-Tenant"), ("Content-Length", "5")]) + b"fresh"]})
    try:
        app = apps(raw.url)
        client = app.test_client()
        assert client.get("/up/doc", headers={"X-Tenant": "acme"}).headers["X-Cache"] == "MISS"
        hour_ago = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600))
        (tmp_path / "x.warc").write_bytes(exchange(f"{raw.url}/doc", head(headers=[("Content-Length", "5")]) + b"stale",
                                                   date=hour_ago))
        result = run(app, "import", str(tmp_path / "x.warc"))
        assert "1 already cached as answers that vary on other headers (see --overwrite)" in result.output
        assert client.get("/up/doc", headers={"X-Tenant": "acme"}).data == b"fresh"  # was b"stale", Age 3600
        assert "imported 1 entries" in run(app, "import", "--overwrite", str(tmp_path / "x.warc")).output
        assert client.get("/up/doc", headers={"X-Tenant": "acme"}).data == b"stale"
    finally:
        raw.stop()


@pytest.mark.parametrize("held_varies", [True, False], ids=["fresher-variant", "fresher-plain-answer"])
def test_an_older_varying_answer_does_not_replace_a_fresher_one_without_overwrite(apps, tmp_path,
                                                                                   held_varies: bool) -> None:
    """The import looks at both places its answer would go: the request's variant, and the primary entry, where a
    vary pointer would replace a plain answer."""
    vary = [("Vary", "X-Tenant")] if held_varies else []
    raw = RawUpstream({"/doc": lambda r, n: [head(headers=[*vary, ("Content-Length", "5")]) + b"fresh"]})
    try:
        app = apps(raw.url)
        client = app.test_client()
        assert client.get("/up/doc", headers={"X-Tenant": "acme"}).headers["X-Cache"] == "MISS"
        hour_ago = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600))
        older = head(headers=[("Vary", "X-Tenant"), ("Content-Length", "5")]) + b"stale"
        (tmp_path / "x.warc").write_bytes(exchange(f"{raw.url}/doc", older, headers={"X-Tenant": "acme"},
                                                   date=hour_ago))
        result = run(app, "import", str(tmp_path / "x.warc"))
        assert "imported 0 entries" in result.output and "1 already cached, as fresh or fresher" in result.output
        kept = client.get("/up/doc", headers={"X-Tenant": "acme"})
        assert (kept.headers["X-Cache"], kept.data) == ("HIT", b"fresh")  # was b"stale", an hour older
        assert "imported 1 entries" in run(app, "import", "--overwrite", str(tmp_path / "x.warc")).output
        assert client.get("/up/doc", headers={"X-Tenant": "acme"}).data == b"stale"
    finally:
        raw.stop()


def test_a_buddy_header_does_not_switch_off_the_private_check(apps, tmp_path) -> None:
    answer = head(headers=[("Cache-Control", "private"), ("Connection", "Cache-Control"), ("Content-Length", "5")],
                  close=False) + b"alice"
    (tmp_path / "x.warc").write_bytes(exchange(f"{NOWHERE}/me", answer,
                                               extra=(("WARC-Buddy-Stored-At", str(time.time())),)))
    result = run(apps(NOWHERE), "import", str(tmp_path / "x.warc"))
    assert "imported 0 entries" in result.output, result.output  # (a plain record is refused too)
    assert "1 answers marked private or no-store" in result.output


def test_a_redirect_imported_under_another_mapping_points_at_that_mapping(apps, tmp_path) -> None:
    raw = RawUpstream({"/case": lambda r, n: [head("201 Created", [("Location", "/case/t"), ("Content-Length", "0")])]})
    try:
        source = apps(raw.url, "up")
        assert source.test_client().get("/up/case/x").headers["Location"] == "/up/case/t"
        run(source, "export", "-o", str(tmp_path / "x.warc"))
        assert f"Location: {raw.url}/case/t".encode() in (tmp_path / "x.warc").read_bytes()  # as the upstream sent it
        for name in ("api", "up"):
            copy = apps(raw.url, name)
            assert "imported 1 entries" in run(copy, "import", str(tmp_path / "x.warc")).output
            hit = copy.test_client().get(f"/{name}/case/x")
            assert hit.headers["X-Cache"] == "HIT" and hit.headers["Location"] == f"/{name}/case/t"  # was /up/...
        # An older export wrote the Location as its proxy served it: put back the same way.
        older = head("201 Created", [("Location", "/up/case/t?x=1"), ("Content-Length", "0")])
        (tmp_path / "old.warc").write_bytes(exchange(f"{raw.url}/case/y", older, extra=(("WARC-Buddy-Mapping", "up"),)))
        copy = apps(raw.url, "api")
        assert "imported 1 entries" in run(copy, "import", str(tmp_path / "old.warc")).output
        assert copy.test_client().get("/api/case/y").headers["Location"] == "/api/case/t?x=1"
    finally:
        raw.stop()


def test_an_encoding_the_proxy_never_asks_for_is_not_served_from_an_import(apps, tmp_path) -> None:
    brotli = head(headers=[("Content-Encoding", "br"), ("Content-Length", "4")]) + b"\x8b\x02\x80x"
    asked = {"Accept-Encoding": "gzip, deflate, br"}
    (tmp_path / "x.warc").write_bytes(exchange(f"{NOWHERE}/doc", brotli, headers=asked))
    app = apps(NOWHERE)
    result = run(app, "import", str(tmp_path / "x.warc"))
    assert "1 answers in a coding the proxy never asks for (br" in result.output, result.output
    hit = app.test_client().get("/up/doc", headers={"Accept-Encoding": "identity"})
    assert hit.headers.get("Content-Encoding") != "br"  # was a HIT, Content-Encoding: br
    # An upstream that answers br to the proxy's own `gzip, deflate` is stored live so: an export carries it over.
    raw = RawUpstream({"/doc": lambda r, n: [brotli]})
    try:
        live, copy = apps(raw.url), apps(raw.url)
        assert live.test_client().get("/up/doc").headers["Content-Encoding"] == "br"
        run(live, "export", "-o", str(tmp_path / "live.warc"))
        assert "imported 1 entries" in run(copy, "import", str(tmp_path / "live.warc")).output
        hit = copy.test_client().get("/up/doc")
        assert hit.headers["X-Cache"] == "HIT" and hit.headers["Content-Encoding"] == "br"
    finally:
        raw.stop()


def test_a_request_body_cut_short_is_an_error(apps, tmp_path) -> None:
    request = b"POST /s HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n{\"q\": 1"
    (tmp_path / "x.warc").write_bytes(warc("response", f"{NOWHERE}/s", OK, record_id="<urn:r>")
                                      + warc("request", f"{NOWHERE}/s", request, links=("<urn:r>",)))
    result = run(apps(NOWHERE), "import", str(tmp_path / "x.warc"))
    assert result.exit_code == 1 and "1 a request body cut short" in result.output, result.output  # was exit 0


def test_a_status_line_http_client_refuses_is_not_stored(apps, tmp_path) -> None:
    (tmp_path / "x.warc").write_bytes(exchange(f"{NOWHERE}/x", b"HTTP/1.1 200 " + b"A" * 200_000 + b"\r\n\r\n"))
    result = run(apps(NOWHERE), "import", str(tmp_path / "x.warc"))
    assert "imported 0 entries" in result.output and "a status line over 64 KiB" in result.output  # was imported


def test_naming_a_mapping_twice_exports_it_once(apps, tmp_path) -> None:
    app = apps(NOWHERE)
    store(app, "/a")
    assert "exported 1 entries" in run(app, "export", "up", "up", "-o", str(tmp_path / "x.warc")).output  # was 2


def test_a_session_cookie_named_by_vary_is_exported_as_a_digest_only(apps, tmp_path) -> None:
    raw = RawUpstream({"/ck": lambda r, n: [head(headers=[("Vary", "Cookie"), ("Content-Length", "2")]) + b"hi"]})
    session = {"Cookie": "session=SESSION-SECRET-1"}
    try:
        app = apps(raw.url)
        app.test_client(use_cookies=False).get("/up/ck", headers=session)
        plain = run(app, "export", "-o", str(tmp_path / "x.warc"))
        assert "exported 0 entries" in plain.output and "1 keyed on credentials" in plain.output
        run(app, "export", "-o", str(tmp_path / "x.warc"), "--include-credentialed")
        assert b"SESSION-SECRET-1" not in (tmp_path / "x.warc").read_bytes()  # was in the request record
        copy = app  # back into the installation that exported (and sealed) it
        assert run(copy, "clear-cache").exit_code == 0
        assert "imported 1 entries" in run(copy, "import", str(tmp_path / "x.warc")).output
        client = copy.test_client(use_cookies=False)
        assert client.get("/up/ck", headers=session).headers["X-Cache"] == "HIT"
        assert client.get("/up/ck", headers={"Cookie": "session=other"}).headers["X-Cache"] == "MISS"
        assert client.get("/up/ck").headers["X-Cache"] == "MISS"
    finally:
        raw.stop()
