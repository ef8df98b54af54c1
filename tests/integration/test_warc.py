"""Issue 14 with real processes: a warm cache carried in a WARC file from one Redis to another (real gunicorn
workers, a real redis-server, the counting upstream stub), a recording made by warcio's capture_http, and a damaged
file."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import requests
from warcio.archiveiterator import ArchiveIterator

from tests.support.processes import ROOT
from tests.support.upstream_stub import UpstreamStub

API_BUDDY = [sys.executable, "-c", "from buddy.cli import main; main()"]  # `api-buddy`, without an install


def flask_buddy(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flask", "buddy", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def forty(url: str) -> list[tuple[str, str, dict[str, str], bytes]]:
    """40 distinct cacheable requests: queries, Accept variants, POST bodies, gzip-encoded answers."""
    out: list[tuple[str, str, dict[str, str], bytes]] = []
    for i in range(16):
        out.append(("GET", f"{url}/up/item/{i}?b=2&a={i}", {"Accept": "application/json"}, b""))
    for i in range(8):
        out.append(("GET", f"{url}/up/negotiate?i={i}", {"Accept": "text/html", "Accept-Language": f"l{i}"}, b""))
    for i in range(8):
        out.append(("POST", f"{url}/up/search", {"Content-Type": "application/json"}, json.dumps({"q": i}).encode()))
    for i in range(8):
        out.append(("GET", f"{url}/up/gzip?i={i}", {}, b""))
    return out


def send(method: str, url: str, headers: dict[str, str], body: bytes) -> requests.Response:
    return requests.request(method, url, headers=headers, data=body or None, timeout=10)


def served(response: requests.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    """What a client is served, less what says when and how: Age, X-Cache, and the Date gunicorn sets itself."""
    headers = [(n, v) for n, v in response.raw.headers.items() if n.lower() not in ("age", "x-cache", "date")]
    return response.status_code, headers, response.content


def cache_keys(redis_url: str) -> list[bytes]:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return list(client.scan_iter("buddy:cache:*"))
    finally:
        client.close()


def test_forty_entries_exported_cleared_and_imported_are_forty_identical_hits(gunicorn, redis_url, upstream,
                                                                               tmp_path) -> None:
    proxy = gunicorn({"domain_mappings": {"up": {"upstream": upstream.url}}}, env={"REDIS_URL": redis_url})
    calls = forty(proxy.url)
    misses = [send(*call) for call in calls]
    assert [r.headers["X-Cache"] for r in misses] == ["MISS"] * 40 and upstream.count() == 40
    before = [send(*call) for call in calls]
    assert [r.headers["X-Cache"] for r in before] == ["HIT"] * 40

    archive = tmp_path / "slice.warc.gz"
    exported = flask_buddy(proxy.env, "export", "up", "-o", str(archive))
    assert exported.returncode == 0, exported.stderr
    assert "exported 40 entries" in exported.stdout and "exporting" in exported.stderr

    records = list(_records(archive))  # warcio's own reader, as any WARC tool would read it
    responses = [r for r in records if r["type"] == "response"]
    assert len(responses) == 40 and sum(r["type"] == "request" for r in records) == 40
    assert {r["uri"].split("?")[0].rsplit("/", 1)[0] for r in responses} == {
        f"{upstream.url}/item", upstream.url}
    assert sorted(r["body"] for r in responses) == sorted(m.content for m in misses)
    assert all(r["mapping"] == "up" and int(r["fresh_left"]) > 0 for r in responses)

    cleared = flask_buddy(proxy.env, "clear-cache", "up")
    assert cleared.returncode == 0 and cache_keys(redis_url) == []
    imported = subprocess.run([*API_BUDDY, "import", str(archive)], cwd=ROOT, env=proxy.env, capture_output=True,
                              text=True, timeout=120)
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert "imported 40 entries from 1 file" in imported.stdout
    after = [send(*call) for call in calls]
    assert [r.headers["X-Cache"] for r in after] == ["HIT"] * 40
    assert [served(r) for r in after] == [served(r) for r in before]  # status, headers and body, byte for byte
    assert [r.content for r in after] == [r.content for r in misses]
    assert upstream.count() == 40  # no upstream call since the first 40

    again = flask_buddy(proxy.env, "import", str(archive))
    assert again.returncode == 0 and "40 already cached, as fresh or fresher" in again.stdout


def _records(path: Path) -> Any:
    with open(path, "rb") as fh:
        for record in ArchiveIterator(fh):
            headers = record.rec_headers
            yield {"type": record.rec_type, "uri": headers.get_header("WARC-Target-URI"),
                   "mapping": headers.get_header("WARC-Buddy-Mapping"),
                   "fresh_left": headers.get_header("WARC-Buddy-Fresh-Left"),
                   "body": record.content_stream().read() if record.rec_type == "response" else None}


RECORDER = textwrap.dedent("""
    import json, sys
    from warcio.capture_http import capture_http  # before requests, as warcio requires
    import requests

    upstream, path = sys.argv[1], sys.argv[2]
    calls = [("GET", "/item/a?x=1", {}, None), ("GET", "/gzip", {}, None),
             ("POST", "/search", {"Content-Type": "application/json"}, b'{"q": "dog"}'),
             ("GET", "/item/mine", {"Authorization": "Bearer sk-recorded-0001"}, None),
             ("GET", "/cookie", {}, None), ("GET", "/negotiate", {"Accept": "application/json"}, None)]
    bodies = {}
    with capture_http(path):
        for method, target, headers, body in calls:
            bodies[target] = requests.request(method, upstream + target, headers=headers, data=body).text
    print(json.dumps(bodies))
""")


def test_a_capture_http_recording_is_served_from_the_cache(gunicorn, redis_url, upstream, tmp_path) -> None:
    archive = tmp_path / "recorded.warc.gz"
    recorded = subprocess.run([sys.executable, "-c", RECORDER, upstream.url, str(archive)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
    assert recorded.returncode == 0, recorded.stderr
    bodies = json.loads(recorded.stdout)
    assert upstream.count() == 6
    assert b"sk-recorded-0001" in gzip.decompress(archive.read_bytes())  # capture_http keeps what it saw

    proxy = gunicorn({"domain_mappings": {"up": {"upstream": upstream.url}}}, env={"REDIS_URL": redis_url})
    imported = flask_buddy(proxy.env, "import", str(archive))
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert "imported 5 entries from 1 file; skipped 1:" in imported.stdout  # the file alone vouches for /item/mine
    assert "  1 credentialed, with the credentials in the file" in imported.stdout
    trusting = flask_buddy(proxy.env, "import", "--trust-credentials-from-file", str(archive))
    assert trusting.returncode == 0, trusting.stdout + trusting.stderr
    assert "imported 1 entries from 1 file" in trusting.stdout
    assert "trusted the file alone for the credentials of 1 of them (--trust-credentials-from-file):" in (
        trusting.stdout)
    upstream.clear()
    for target, headers, body in [("/item/a?x=1", {}, None), ("/gzip", {}, None),
                                  ("/search", {"Content-Type": "application/json"}, b'{"q": "dog"}'),
                                  ("/item/mine", {"Authorization": "Bearer sk-recorded-0001"}, None),
                                  ("/cookie", {}, None), ("/negotiate", {"Accept": "application/json"}, None)]:
        hit = requests.request("POST" if body else "GET", f"{proxy.url}/up{target}", headers=headers, data=body,
                               timeout=10)
        assert (hit.headers["X-Cache"], hit.text) == ("HIT", bodies[target]), target
        assert "Set-Cookie" not in hit.headers and "Content-Encoding" not in hit.headers
    assert upstream.log == []  # every one of them served without the upstream
    for key in cache_keys(redis_url):  # the credential is in the key's hash only, never stored
        import redis

        assert b"sk-recorded-0001" not in (redis.Redis.from_url(redis_url).dump(key) or b"")
    stranger = requests.get(f"{proxy.url}/up/item/mine", timeout=10)
    assert stranger.headers["X-Cache"] == "MISS" and upstream.count() == 1  # not served without the credential


def test_a_damaged_file_is_reported_and_the_rest_imported(gunicorn, redis_url, upstream: UpstreamStub,
                                                          tmp_path) -> None:
    proxy = gunicorn({"domain_mappings": {"up": {"upstream": upstream.url}}}, env={"REDIS_URL": redis_url})
    for i in range(12):
        assert requests.get(f"{proxy.url}/up/item/{i}", timeout=10).headers["X-Cache"] == "MISS"
    archive = tmp_path / "slice.warc.gz"
    assert flask_buddy(proxy.env, "export", "-o", str(archive)).returncode == 0
    data = bytearray(archive.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 64] = b"\xff" * 64  # a stretch of the file overwritten
    damaged = tmp_path / "damaged.warc.gz"
    damaged.write_bytes(bytes(data[: len(data) - 100]))  # and its end cut off
    assert flask_buddy(proxy.env, "clear-cache").returncode == 0

    result = flask_buddy(proxy.env, "import", str(damaged), str(tmp_path / "missing-too.warc"))
    assert result.returncode == 2 and "does not exist" in result.stderr  # a missing file is refused up front
    result = flask_buddy(proxy.env, "import", str(damaged))
    assert result.returncode == 1
    assert "error: damaged.warc.gz at offset" in result.stderr and "(error)" in result.stdout
    imported = int(result.stdout.split("imported ")[1].split()[0])
    assert 6 <= imported <= 10, result.stdout
    upstream.clear()
    verdicts = [requests.get(f"{proxy.url}/up/item/{i}", timeout=10).headers["X-Cache"] for i in range(12)]
    assert verdicts.count("HIT") == imported and upstream.count() == 12 - imported
