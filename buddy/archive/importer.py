"""`buddy import`: request/response pairs of WARC files into the cache, stored as the proxy would have stored them
after fetching them live."""
from __future__ import annotations

import math
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

import click
from flask import current_app
from flask.cli import with_appcontext
from warcio.timeutils import iso_date_to_datetime

from buddy import policy
from buddy.archive.common import (
    ASKED_ENCODINGS,
    Duration,
    Tally,
    first_line,
    namespace_option,
    redis_down,
    unasked_codings,
    upstream_location,
)
from buddy.archive.credentials import (
    ALTERED,
    IN_FILE,
    SEAL,
    Sealer,
    query_credentials,
    sealed_material,
    secret_header,
)
from buddy.archive.mapping import HostMap, origin, resolve
from buddy.archive.records import STATUS_LINE, Part, pairs
from buddy.archive.warcfile import Reader
from buddy.codec import VaryPointer
from buddy.errors import BadProxyRequest, StoreUnavailable
from buddy.fingerprint import credentials_digest
from buddy.forwarding import (
    build_url,
    client_response_headers,
    dated,
    forwardable_request_headers,
    location_for_client,
    safe_path,
    safe_query,
    storable_headers,
    upstream_path,
)
from buddy.messages import ProxyRequest, ProxyResult
from buddy.redis_keys import EntryId
from buddy.settings import DomainSettings
from buddy.views import NAMESPACE

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HEX64 = re.compile(r"[0-9a-f]{64}")
TRUST_FLAG = "--trust-credentials-from-file"


@dataclass
class ImportOptions:
    maps: tuple[HostMap, ...] = ()
    ttl: int | None = None
    overwrite: bool = False
    namespace: str | None = None
    trust_credentials: bool = False  # records keyed on credentials that this installation did not seal, too


class Importer:
    """Stores (request, response) pairs as the proxy would have stored them after fetching them live."""

    def __init__(self, buddy: Any, options: ImportOptions, tally: Tally,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = buddy.settings
        self.cache = buddy.service.cache
        self.options = options
        self.tally = tally
        self.clock = clock
        self.now = clock()
        self.sealer = Sealer(self.cache.client, self.cache.guard, self.cache.keys.archive_secret, create=False)
        self.trusted: Counter[str] = Counter()  # records stored on the file's word alone (TRUST_FLAG), by why

    @property
    def limits(self) -> tuple[int, int]:
        return self.settings.server.max_request_body, self.settings.cache.max_cache_response_size

    def store(self, request: Part, response: Part) -> None:
        where = f"{response.where} ({response.uri or request.uri})"
        self.now = self.clock()  # an import may take minutes: each entry's freshness is reckoned when it is stored
        try:
            reason = self._store(request, response)
        except _Refused as refused:
            self.tally.skip(refused.reason, where, error=refused.error)
            return
        except (ValueError, UnicodeError) as exc:  # what a damaged record can still hold: a URL with no valid port...
            self.tally.skip("records that cannot be read", f"{where}: {first_line(exc)}", error=True)
            return
        if reason is None:
            self.tally.done += 1
        else:
            self.tally.skip(reason, where)

    def _store(self, recorded: Part, answer: Part) -> str | None:
        """None once stored, else why not (raises _Refused for what counts as an error)."""
        sent, got = recorded.message, answer.message
        assert sent is not None and got is not None
        url = (recorded.uri or answer.uri).split("#", 1)[0]
        if urlsplit(url).scheme.lower() not in ("http", "https") or not urlsplit(url).hostname:
            raise _Refused("a WARC-Target-URI that is not an http(s) URL", error=True)
        found = resolve(self.settings.domains, url, answer.own.get("warc-buddy-mapping", ""), self.options.maps)
        if found is None:
            scheme, host, port, _, _ = origin(url)
            raise _Refused(f"no mapping for {scheme}://{host}:{port} (see --map HOST=NAME)", error=True)
        domain, rest_text = found
        method = sent.first_line.split(" ", 1)[0].upper()
        if method == "HEAD":
            return "HEAD requests (no body was recorded)"
        if method not in policy.CACHEABLE_METHODS:
            return f"{method} requests (never cached)"
        if sent.short:
            raise _Refused("a request body cut short (shorter than its Content-Length, or chunks missing)", error=True)
        if sent.body is None:
            return "request bodies over server.max_request_body"
        try:
            rest = None if rest_text is None else safe_path(rest_text.encode("utf-8"))
            query = safe_query(origin(url)[4].encode("utf-8"))
            upstream_url = build_url(domain, upstream_path(domain, rest), query)
        except BadProxyRequest as exc:
            raise _Refused(f"a URL the proxy would refuse ({exc})", error=True) from None
        namespace = self.options.namespace
        if namespace is None:
            namespace = answer.own.get("warc-buddy-namespace", "")
        if namespace and not NAMESPACE.fullmatch(namespace):
            raise _Refused("a WARC-Buddy-Namespace the proxy would refuse", error=True)
        request = ProxyRequest(
            domain=domain, method=method, path=upstream_path(domain, rest), query=query, headers=sent.headers,
            body=sent.body, forwarded=forwardable_request_headers(sent.headers), namespace=namespace,
        )
        if not policy.cacheable_request(request):
            return "conditional or range requests (never cached)"
        result = self._result(domain, upstream_url, answer)
        if isinstance(result, str):
            return result
        unasked = unasked_codings(result.header("Content-Encoding"), sent.headers)
        if unasked:
            return (f"answers in a coding the proxy never asks for ({', '.join(unasked)}; it sends Accept-Encoding: "
                    f"{ASKED_ENCODINGS})")
        storage = policy.storage(domain, result)
        if storage.ttl is None:
            return ("answers marked private or no-store, or with Vary: *" if not storage.shareable
                    else f"status {result.status} (never stored)")
        withheld = {name.strip().lower() for name in answer.own.get("warc-buddy-withheld", "").split(",")}
        if withheld & set(domain.vary_headers):
            return "keyed on a credential or cookie value that the archive does not hold"
        credentials = self._credentials(request, answer)
        primary = policy.entry_for(request, credentials)
        target = primary
        recorded_variant = bool(withheld & set(storage.vary))
        if recorded_variant:  # the variant's values are not in the file: its recorded key is
            variant = self._recorded_variant(primary, answer)
            if variant is None:
                return ("keyed on a credential or cookie value that the archive holds as a digest only, for "
                        "another key (another mapping, namespace or configuration)")
            target = variant
        elif storage.vary:
            target = EntryId(domain.name, policy.variant_digest(primary.digest, storage.vary, request.forwarded))
        doubt = self._doubt(recorded, answer, request, credentials, recorded_variant, storage.vary)
        if doubt is not None and not self.options.trust_credentials:
            if doubt == ALTERED:  # damaged or tampered with: an error, and no hint to trust it anyway
                raise _Refused(doubt, error=True)
            return f"{doubt} (see {TRUST_FLAG})"
        fresh_for = self._fresh_for(answer, result.stored_at, storage.ttl)
        left = result.stored_at + fresh_for - self.now
        if left <= 0:
            return "expired (give them new freshness with --ttl)"
        if not self.options.overwrite:
            why = self._kept(primary, target, storage.vary, result.stored_at + fresh_for)
            if why is not None:
                return why
        stored_request = policy.stored_request(request, upstream_url, storage.vary)
        if credentials is not None:
            stored_request = replace(stored_request, credentials=credentials)
        kept = ProxyResult(
            result.status, result.reason, storable_headers(result.headers, storage.drop), result.body,
            fetch_ms=result.fetch_ms, stored_at=result.stored_at, vary=storage.vary,
            variant=target.digest if storage.vary else "", fresh_for=fresh_for, request=stored_request,
            rules=storage.rules,
        )
        pointer = None
        if storage.vary:
            lifetime = max(domain.ttl_seconds, domain.negative_ttl_seconds)
            pointer = (primary, VaryPointer(storage.vary), policy.kept_for(domain, lifetime))
        self.cache.put(target, kept, policy.kept_for(domain, math.ceil(left)), pointer)
        if doubt is not None:
            self.trusted[doubt] += 1
        return None

    def _result(self, domain: DomainSettings, url: str, answer: Part) -> ProxyResult | str:
        """The answer as the proxy would hold it after reading it from the upstream (before policy)."""
        got = answer.message
        assert got is not None
        if got.body is None:
            return "bodies over cache.max_cache_response_size (never stored)"
        if got.short:
            raise _Refused("a body cut short (shorter than its Content-Length, or chunks missing)", error=True)
        found = STATUS_LINE.fullmatch(got.first_line)
        assert found is not None
        status, reason = int(found.group(1)), (found.group(2) or "").strip()
        if not 200 <= status <= 599 or _CONTROL.search(reason):
            return "malformed status lines (never stored)"
        # Whoever wrote the file, the answer is read as the upstream's: a WARC-Buddy-* header switches no check off.
        # Our export writes a redirect as the upstream sent it; one of an older export (`/<name>/...`, as its proxy
        # served it) is first put back the same way.
        recorded = answer.own.get("warc-buddy-mapping", "")
        headers = client_response_headers(got.headers, got.decoded)
        headers = [(n, v) for n, v in (
            (n, location_for_client(domain, url, upstream_location(domain, recorded, v) if recorded else v)
             if n.lower() == "location" else v) for n, v in headers) if v is not None]
        stored_at = _number(answer.own.get("warc-buddy-stored-at"))
        if stored_at is None:
            try:
                stored_at = iso_date_to_datetime(answer.date, tz_aware=True).timestamp()
            except (ValueError, TypeError, OverflowError):
                raise _Refused(f"a WARC-Date that is not a date ({answer.date!r})", error=True) from None
        # What a hit saves, counted in Redis's 64-bit counters: never more than a live fetch may take.
        fetch_ms = min(int(_number(answer.own.get("warc-buddy-fetch-ms")) or 0), math.ceil(domain.total_timeout * 1000))
        received = min(stored_at, self.now)
        return ProxyResult(status, reason, dated(headers, received), got.body, fetch_ms=fetch_ms, stored_at=received,
                           upstream_headers=got.headers)

    def _credentials(self, request: ProxyRequest, answer: Part) -> str | None:
        """The credential digest recorded by our export (whose request never carries the values); None: compute
        it from the recorded headers, as the proxy does."""
        digest = answer.own.get("warc-buddy-credentials", "")
        domain = request.domain
        if not digest or domain.share_across_credentials:
            return None
        if any(name.lower() in domain.credential_headers for name in request.forwarded):
            return None
        return digest

    def _doubt(self, recorded: Part, answer: Part, request: ProxyRequest, credentials: str | None,
               recorded_variant: bool, vary: tuple[str, ...]) -> str | None:
        """Why this installation does not vouch for the credential partition the entry goes to (a reason of
        buddy.archive.credentials), or None: it is keyed on no credential, or sealed by this installation."""
        domain = request.domain
        from_file = bool(credentials) or recorded_variant  # a digest the file holds
        in_file = not domain.share_across_credentials and bool(credentials_digest(
            request.forwarded.items(), domain.credential_headers))
        keyed = set(domain.vary_headers) | {name.lower() for name in vary}
        in_file = in_file or any(name.lower() in keyed and secret_header(domain, name.lower())
                                 for name in request.forwarded)
        in_file = in_file or bool(query_credentials(domain, recorded.uri or answer.uri))
        if not (from_file or in_file):
            return None
        seal = answer.own.get(SEAL.lower(), "")
        if not seal and in_file:
            return IN_FILE
        material = sealed_material(answer.uri, recorded.uri, answer.date, answer.own, recorded.digest, answer.digest)
        return self.sealer.doubt(seal, material)

    def _fresh_for(self, answer: Part, stored_at: float, ttl: float) -> float:
        if self.options.ttl is not None:
            return math.ceil(self.now - stored_at) + self.options.ttl
        recorded = _number(answer.own.get("warc-buddy-fresh-for"))
        return ttl if recorded is None else min(float(recorded), ttl)

    def _recorded_variant(self, primary: EntryId, answer: Part) -> EntryId | None:
        """The variant entry our export recorded for an entry keyed on withheld values, when this import rebuilt
        the same primary entry (else the recorded variant is no key any request here would look up)."""
        recorded, variant = answer.own.get("warc-buddy-primary", ""), answer.own.get("warc-buddy-variant", "")
        head, sep, digest = variant.rpartition(":")
        if recorded != primary.digest or head + sep != primary.digest.rpartition(":")[0] + sep or not _HEX64.fullmatch(
                digest):
            return None
        return EntryId(primary.domain, variant)

    def _kept(self, primary: EntryId, target: EntryId, vary: tuple[str, ...], until: float) -> str | None:
        """Why what the cache holds where this would go stays (without --overwrite), or None."""
        held = self.cache.get(primary)
        if isinstance(held, VaryPointer) and set(held.names) != set(vary):
            # Answers that vary on other headers: this one would replace their pointer and hide them all.
            return "already cached as answers that vary on other headers (see --overwrite)"
        for found in (held, self.cache.get(target) if target != primary else None):
            if isinstance(found, ProxyResult):
                held_until = math.inf if found.fresh_for is None else found.stored_at + found.fresh_for
                if held_until >= until:
                    return "already cached, as fresh or fresher (see --overwrite)"
        return None


class _Refused(Exception):
    def __init__(self, reason: str, error: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) and value >= 0 else None


def import_files(buddy: Any, paths: Iterable[Path], options: ImportOptions, tally: Tally,
                 progress: Callable[[int], None] = lambda n: None) -> Counter[str]:
    """Import every pair of `paths`; returns how many were stored on the file's word alone, by why (see
    ImportOptions.trust_credentials)."""
    importer = Importer(buddy, options, tally)
    for path in paths:
        reader = Reader(path, tally, importer.limits, progress)
        for request, response in pairs(reader.parts(), tally):
            importer.store(request, response)
    return importer.trusted


@click.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--map", "maps", multiple=True, metavar="OLD-HOST=NAME",
              help="Records of OLD-HOST (host, host:port, or scheme://host[:port]/base) go to mapping NAME.")
@click.option("--ttl", type=Duration(), help="Fresh for this long from now, whatever was recorded (also "
              "revives expired entries).")
@click.option("--overwrite", is_flag=True, help="Replace entries the cache holds even when they are fresher.")
@click.option("--namespace", callback=lambda ctx, param, value: namespace_option(value),
              help="Store every entry under this X-Buddy-Namespace instead of the recorded one.")
@click.option(TRUST_FLAG, "trust_credentials", is_flag=True,
              help="Also records keyed on credentials that this installation's export did not seal (another "
              "proxy's export, another tool's recording, a file made by hand): the file alone then decides which "
              "credentials are served its answers.")
@with_appcontext
def import_command(files: tuple[str, ...], maps: tuple[str, ...], ttl: int | None, overwrite: bool,
                   namespace: str | None, trust_credentials: bool) -> None:
    """Load the request/response pairs of WARC FILEs into the cache, keyed as the proxy keys the same requests:
    ours from `export`, or recorded by another tool (warcio's capture_http, a crawler). A record keyed on
    credentials is imported only from an export of this installation (sealed by it), unless
    --trust-credentials-from-file. Exits 1 when a record could not be imported for an error (a corrupt file, no
    mapping for its host, a response with no request, a seal that does not match its record)."""
    buddy = current_app.extensions["buddy"]
    try:
        rules = tuple(HostMap.parse(text) for text in maps)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--map") from None
    for rule in rules:
        if rule.name not in buddy.settings.domains:
            raise click.BadParameter(f"{rule.name}: not configured; choose from "
                                     f"{', '.join(sorted(buddy.settings.domains))}", param_hint="--map")
    tally = Tally(lambda line: click.echo(line, err=True))
    paths = [Path(f) for f in files]
    options = ImportOptions(rules, ttl, overwrite, namespace, trust_credentials)
    total = sum(p.stat().st_size for p in paths)
    try:
        with click.progressbar(length=total, label="importing", file=sys.stderr) as bar:
            trusted = import_files(buddy, paths, options, tally, bar.update)
    except StoreUnavailable as exc:
        raise redis_down(exc) from exc
    skipped = sum(tally.skipped.values()) + sum(tally.errors.values())
    click.echo(f"imported {tally.done} entries from {len(paths)} file{'s' if len(paths) != 1 else ''}"
               + (f"; skipped {skipped}:" if skipped else ""))
    for line in tally.lines():
        click.echo(line)
    if trusted:
        click.echo(f"trusted the file alone for the credentials of {sum(trusted.values())} of them ({TRUST_FLAG}):")
        for reason, n in trusted.most_common():
            click.echo(f"  {n} {reason}")
    if tally.errors:
        sys.exit(1)
