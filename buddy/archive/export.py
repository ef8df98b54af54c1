"""`buddy export`: stored entries to a WARC file, as request and response records."""
from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Callable, Iterator, cast
from urllib.parse import urlsplit

import click
from flask import current_app
from flask.cli import with_appcontext
from warcio.statusandheaders import StatusAndHeaders
from warcio.timeutils import datetime_to_iso_date
from warcio.warcwriter import WARCWriter

from buddy import codec, policy
from buddy.archive.common import (
    ASKED_ENCODINGS,
    OWN,
    Duration,
    Tally,
    namespace_option,
    redis_down,
    upstream_location,
)
from buddy.archive.credentials import (
    SEAL,
    Sealer,
    block_digest,
    query_credentials,
    sealed_material,
    secret_header,
)
from buddy.errors import StoreUnavailable
from buddy.fingerprint import CREDENTIAL_HEADERS
from buddy.forwarding import forwardable_request_headers
from buddy.messages import ProxyRequest, ProxyResult, StoredRequest
from buddy.redaction import spellings
from buddy.redis_keys import EntryId
from buddy.settings import DomainSettings
from buddy.store.connect import scan_batches

SCAN_COUNT = 500  # keys per SCAN round trip
FETCH_BYTES = 8 * 1024 * 1024  # entries fetched per MGET at most (one larger entry is fetched alone)
QUERY_REFUSAL = "an upstream credential in the query (never exported)"


class _WireHeaders(StatusAndHeaders):
    """Headers written byte for byte as the proxy stored them (latin-1, as HTTP carries them), where warcio would
    percent-encode any non-ASCII value."""

    def compute_headers_buffer(self, header_filter: Any = None) -> None:
        self.headers_buff = self.to_str(header_filter).encode("latin-1", "replace") + b"\r\n"


def _iso(when: float) -> str:
    return cast(str, datetime_to_iso_date(datetime.fromtimestamp(when, timezone.utc).replace(tzinfo=None)))


def fresh_left(entry: ProxyResult, ttl_ms: int, now: float) -> int:
    """Seconds of freshness an entry has left (0 once expired); one stored without a lifetime is fresh while kept."""
    if entry.fresh_for is not None:
        return max(0, math.floor(entry.stored_at + entry.fresh_for - now))
    return max(0, ttl_ms // 1000) if ttl_ms > 0 else 0


class Exporter:
    """Writes stored entries to one WARC file (after a warcinfo record): `export()` once per mapping."""

    def __init__(self, buddy: Any, out: IO[bytes], gzip: bool, include_credentialed: bool = False,
                 since: int | None = None, now: float | None = None, filename: str = "") -> None:
        self.buddy = buddy
        self.cache = buddy.service.cache
        self.writer = WARCWriter(out, gzip=gzip)
        self.include_credentialed = include_credentialed
        self.now = time.time() if now is None else now
        self.since = None if since is None else self.now - since
        self.tally = Tally()
        self.bytes = 0
        self.sealed = 0  # entries keyed on credentials, written with this installation's seal
        self.secrets = self._secrets()
        # The installation's seal on entries keyed on credentials (its secret made by the first one that needs it).
        self.sealer = Sealer(self.cache.client, self.cache.guard, self.cache.keys.archive_secret, create=True)
        info = {"software": f"reference-api-buddy {_version()}", "format": "WARC File Format 1.0",
                "description": "cache entries of reference-api-buddy; import with `api-buddy import FILE`"}
        self.writer.write_record(self.writer.create_warcinfo_record(filename, info))

    def _secrets(self) -> frozenset[str]:
        """Every spelling of the proxy's access key, read (never generated) so that no record can carry it."""
        key = self.buddy.settings.security.secure_key
        if not key:
            store = self.buddy.secure_key
            stored = store.guard.run(lambda: store.client.get(store.name))
            key = stored.decode() if isinstance(stored, bytes) else stored
        return spellings(key) if key else frozenset()

    def export(self, domain: DomainSettings, namespace: str | None = None,
               progress: Callable[[int], None] = lambda n: None) -> None:
        for key, entry, ttl_ms in self._entries(domain.name, namespace, progress):
            reason = self._refusal(domain, entry)
            if reason is not None:
                request = entry.request
                named = query_credentials(domain, request.url) if reason == QUERY_REFUSAL and request else []
                self.tally.skip(reason, about=named)  # which parameters, in the summary
                continue
            self._write(domain, key, entry, ttl_ms)
            self.tally.done += 1

    def _entries(self, domain: str, namespace: str | None,
                 progress: Callable[[int], None]) -> Iterator[tuple[str, ProxyResult, int]]:
        """(key, entry, its PTTL in ms) for every stored response of the mapping: SCAN a batch, measure it, and
        fetch it in MGETs of at most FETCH_BYTES, so that memory holds one batch's keys and FETCH_BYTES of blobs."""
        client, guard = self.cache.client, self.cache.guard
        pattern = self.cache.keys.cache_pattern(domain, namespace)
        for found in scan_batches(client, guard.run, match=pattern, count=SCAN_COUNT):  # every primary of a cluster

            def measure() -> list[int]:
                pipe = client.pipeline(transaction=False)
                for key in found:
                    pipe.strlen(key)
                    pipe.pttl(key)
                return cast(list[int], pipe.execute())

            measured = guard.run(measure)
            sizes, ttls = measured[0::2], measured[1::2]
            for group in _groups(list(zip(found, sizes, ttls)), FETCH_BYTES):
                blobs = guard.run(lambda: client.mget([key for key, _, _ in group]))
                for (key, _, ttl_ms), blob in zip(group, blobs):
                    entry = self._decoded(blob)
                    if entry is not None:
                        yield key.decode() if isinstance(key, bytes) else str(key), entry, int(ttl_ms)
            progress(len(found))

    def _decoded(self, blob: bytes | None) -> ProxyResult | None:
        if blob is None:
            return None  # gone (expired, evicted) between SCAN and GET
        try:
            value = codec.decode(blob)
        except codec.CodecError:
            self.tally.skip("unreadable (another format version, or corrupt)")
            return None
        return value if isinstance(value, ProxyResult) else None  # a vary pointer: its variants are entries

    def _refusal(self, domain: DomainSettings, entry: ProxyResult) -> str | None:
        """Why an entry is not exported, or None."""
        request = entry.request
        if request is None:
            return "stored by an older version (no request recorded)"
        if not request.body_kept:
            return "request body too large to have been kept"
        if self.since is not None and entry.stored_at < self.since:
            return "stored before --since"
        if query_credentials(domain, request.url):
            return QUERY_REFUSAL
        withheld = withheld_headers(domain, entry)
        if withheld & set(domain.vary_headers):
            return "keyed (vary_headers) on a credential or cookie value (never exported)"
        if (request.credentials or withheld) and not self.include_credentialed:
            return "keyed on credentials (see --include-credentialed)"
        texts = [request.url, *(v for _, v in request.headers), *(v for _, v in entry.headers)]
        for secret in self.secrets:
            raw = secret.encode("latin-1", "replace")
            if any(secret in text for text in texts) or raw in (entry.body or b"") or raw in request.body:
                return "carries the proxy's access key (never exported)"
        return None

    def _write(self, domain: DomainSettings, key: str, entry: ProxyResult, ttl_ms: int) -> None:
        request = entry.request
        assert request is not None and entry.body is not None
        parts = urlsplit(request.url)
        sent = [(n, v) for n, v in _keyed_headers(request) if not secret_header(domain, n.lower())]
        sent.append(("Accept-Encoding", ASKED_ENCODINGS))  # what the proxy sent (see ASKED_ENCODINGS)
        if request.body:
            sent.append(("Content-Length", str(len(request.body))))
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        left = fresh_left(entry, ttl_ms, self.now)
        keyed = ["method", "url", "body", "content-type", *sorted(set(domain.vary_headers) | set(entry.vary))]
        keyed += ["credentials"] * bool(request.credentials) + ["namespace"] * bool(request.namespace)
        lifetime = entry.fresh_for if entry.fresh_for is not None else math.ceil(self.now - entry.stored_at) + left
        own = {
            "WARC-Date": _iso(entry.stored_at),
            OWN + "Mapping": domain.name,
            OWN + "Stored-At": f"{entry.stored_at:.6f}",
            OWN + "Fresh-For": str(lifetime),
            OWN + "Fresh-Left": str(left),
            OWN + "Keyed-On": ", ".join(keyed),
            OWN + "Entry": key.rsplit(":", 1)[-1],
            OWN + "Fetch-Ms": str(entry.fetch_ms),
        }
        if entry.vary:
            own[OWN + "Vary"] = ", ".join(entry.vary)
        if request.credentials:
            own[OWN + "Credentials"] = request.credentials
        if request.namespace:
            own[OWN + "Namespace"] = request.namespace
        withheld = withheld_headers(domain, entry)
        if withheld:  # the values that chose this variant are not in the file: its key is, as a digest
            own[OWN + "Withheld"] = ", ".join(sorted(withheld))
            own[OWN + "Primary"] = primary_entry(domain, request).digest
            own[OWN + "Variant"] = entry.variant
        # A redirect into the mapping is stored as the client sees it (`/<name>/...`): the file holds what the
        # upstream sent, for an importing proxy to point at its own mapping, whatever its name.
        headers = [(n, upstream_location(domain, domain.name, v) if n.lower() == "location" else v)
                   for n, v in entry.headers]
        response = self.writer.create_warc_record(
            request.url, "response", payload=io.BytesIO(entry.body), length=len(entry.body), warc_headers_dict=own,
            http_headers=_WireHeaders(f"{entry.status} {entry.reason}".rstrip(),
                                      [*headers, ("Content-Length", str(len(entry.body)))], protocol="HTTP/1.1"),
        )
        sent_request = self.writer.create_warc_record(
            request.url, "request", payload=io.BytesIO(request.body), length=len(request.body),
            warc_headers_dict={OWN + "Mapping": domain.name},
            http_headers=_WireHeaders(f"{request.method} {target} HTTP/1.1", [("Host", parts.netloc), *sent]),
        )
        if request.credentials or withheld:  # keyed on credentials: sealed, for this installation's imports only
            material = sealed_material(request.url, request.url, own["WARC-Date"],
                                       {n: v for n, v in own.items() if n.startswith(OWN)},
                                       _block(sent_request, request.body), _block(response, entry.body))
            response.rec_headers.add_header(SEAL, self.sealer.seal(material))
            self.sealed += 1
        self.writer.write_request_response_pair(sent_request, response)
        self.bytes += len(entry.body)


def _block(record: Any, body: bytes) -> str:
    """The digest of a record's block as the writer writes it (and an import reads it): HTTP head, then body."""
    record.http_headers.compute_headers_buffer()
    return block_digest(record.http_headers.headers_buff + body)


def _keyed_headers(request: StoredRequest) -> list[tuple[str, str]]:
    """The stored request's keyed headers and its Content-Type, as its upstream request carried them."""
    headers = list(request.headers)
    if request.content_type and not any(n.lower() == "content-type" for n, _ in headers):
        headers.append(("Content-Type", request.content_type))
    return headers


def withheld_headers(domain: DomainSettings, entry: ProxyResult) -> set[str]:
    """The headers that keyed this entry (the mapping's vary_headers, or the answer's Vary) whose values an export
    leaves out: credential headers (their values are never stored: named, they count whether sent or not) and
    cookies the request sent."""
    assert entry.request is not None
    sent = {name.lower() for name, _ in entry.request.headers}
    return {name for name in (*(n.lower() for n in entry.vary), *domain.vary_headers) if secret_header(domain, name)
            and (name in CREDENTIAL_HEADERS or name in domain.credential_headers or name in sent)}


def primary_entry(domain: DomainSettings, request: StoredRequest) -> EntryId:
    """The primary entry of a stored entry's request, as an import rebuilds it from the exported request."""
    parts = urlsplit(request.url)
    headers = [(n, v) for n, v in _keyed_headers(request) if not secret_header(domain, n.lower())]
    rebuilt = ProxyRequest(domain, request.method, parts.path or "/", parts.query, headers, request.body,
                           forwardable_request_headers(headers), namespace=request.namespace)
    return policy.entry_for(rebuilt, request.credentials or None)


def _groups(items: list[tuple[Any, int, int]], budget: int) -> Iterator[list[tuple[Any, int, int]]]:
    group: list[tuple[Any, int, int]] = []
    size = 0
    for item in items:
        if group and size + item[1] > budget:
            yield group
            group, size = [], 0
        group.append(item)
        size += max(0, item[1])
    if group:
        yield group


def _version() -> str:
    from buddy import __version__

    return __version__


@click.command("export")
@click.argument("names", nargs=-1, metavar="[NAME ...]")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, writable=True),
              help="The WARC file to write; gzipped (one member per record) when it ends in .gz.")
@click.option("--namespace", callback=lambda ctx, param, value: namespace_option(value),
              help="Only the entries stored under this X-Buddy-Namespace.")
@click.option("--since", type=Duration(), help="Only entries stored within this long (90s, 15m, 2h, 7d, 1w).")
@click.option("--include-credentialed", is_flag=True,
              help="Also entries keyed on upstream credentials: they carry the credentials' digest, never a value.")
@with_appcontext
def export_command(names: tuple[str, ...], output: str, namespace: str | None, since: int | None,
                   include_credentialed: bool) -> None:
    """Write the cached entries of NAME (every mapping when none is named) to a WARC file, as request and
    response records that any WARC tool reads and `import` loads into another proxy's cache."""
    buddy = current_app.extensions["buddy"]
    names = tuple(dict.fromkeys(names))  # `export up up` writes each entry once
    unknown = [name for name in names if name not in buddy.settings.domains]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}: not configured; choose from "
                                 f"{', '.join(sorted(buddy.settings.domains))}", param_hint="NAME")
    target = Path(output)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        census = buddy.service.cache.census(max_age=0)
        chosen = [buddy.settings.domains[n] for n in (names or sorted(buddy.settings.domains))]
        total = sum(census.describe(d.name).entries for d in chosen)
        with open(partial, "wb") as out, click.progressbar(length=total, label="exporting", file=sys.stderr) as bar:
            exporter = Exporter(buddy, out, gzip=target.name.endswith(".gz"),
                                include_credentialed=include_credentialed, since=since, filename=target.name)
            for domain in chosen:
                exporter.export(domain, namespace, bar.update)
        os.replace(partial, target)
    except StoreUnavailable as exc:
        raise redis_down(exc) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    tally = exporter.tally
    click.echo(f"exported {tally.done} entries ({exporter.bytes} bytes of bodies) to {target}")
    if exporter.sealed:
        click.echo(f"{exporter.sealed} of them keyed on credentials, sealed for this installation: another imports "
                   "them only with --trust-credentials-from-file")
    if tally.skipped or tally.errors:
        click.echo(f"not exported: {sum(tally.skipped.values()) + sum(tally.errors.values())}")
        for line in tally.lines():
            click.echo(line)
