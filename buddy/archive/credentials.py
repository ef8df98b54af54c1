"""Credentials in archives: which request headers and query parameters carry one, and the installation's seal on
the records of its exports that are keyed on one.

An entry bought with a credential is stored in that credential's partition of the cache (its key holds the
credentials' digest, a value named by Vary, or the query that carries it). An export of such an entry carries the
digest, never the value, so that an import can rebuild the key; but a digest is no secret (anyone who knows a key
computes it), so a file could plant answers for someone else's credentials. An export therefore seals each record
keyed on a credential with an HMAC keyed by this installation's secret (every proxy on one Redis and key prefix is
one installation), over everything the import reads of the record: its URL, its `WARC-Buddy-*` headers and both
HTTP messages byte for byte. An import takes a credential partition only from a record whose seal it can verify;
any other (another installation's export, an older one, another tool's recording, a file made by hand) only when
the operator says to trust the file.

The secret is one Redis key without a TTL (`archive_secret`), generated once (SET NX) by the first export that
seals a record; it never leaves Redis and is never logged.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from typing import Any, Mapping
from urllib.parse import unquote_plus, urlsplit

from buddy.archive.common import OWN
from buddy.fingerprint import CREDENTIAL_HEADERS, CREDENTIAL_PARAMS
from buddy.redaction import redact_in_logs
from buddy.settings import DomainSettings

SEAL = OWN + "Seal"  # `v1:<installation>:<HMAC-SHA256, hex>` on a response record
_SEAL = re.compile(r"v1:([0-9a-f]{16}):([0-9a-f]{64})")
# Request headers whose values no export carries, besides the credential headers: a session cookie is as good as
# a password. An entry keyed on one (through Vary) is exported as credentialed: its key as a digest.
NEVER_EXPORTED = ("cookie",)

# Why a record keyed on credentials is not vouched for by this installation (a reason of the import's summary).
UNSEALED = "credentialed, with no seal of this installation: an older export or a file made by hand"
IN_FILE = "credentialed, with the credentials in the file: another tool's recording or a file made by hand"
ELSEWHERE = "credentialed, sealed by another installation: another Redis or key prefix"
ALTERED = "credentialed, with a seal that does not match the record: altered since its export"


def secret_header(domain: DomainSettings, name: str) -> bool:
    """Is `name` (lower case) a request header whose value no export carries?"""
    return name in CREDENTIAL_HEADERS or name in domain.credential_headers or name in NEVER_EXPORTED


def query_credentials(domain: DomainSettings, url: str) -> list[str]:
    """The names (lower case) of the query parameters in `url` that carry a credential: CREDENTIAL_PARAMS and the
    mapping's own `credential_params`."""
    names = (unquote_plus(item.partition("=")[0]).lower() for item in urlsplit(url).query.split("&") if item)
    return sorted({name for name in names if name in CREDENTIAL_PARAMS or name in domain.credential_params})


def sealed_material(response_uri: str, request_uri: str, date: str, own: Mapping[str, str], request_block: str,
                    response_block: str) -> bytes:
    """What a seal covers: the records' URLs and date, the response record's WARC-Buddy-* headers (lower-case
    names, the seal left out), and the SHA-256 of each record's block (its HTTP message, byte for byte)."""
    fields = sorted((name.lower(), value) for name, value in own.items() if name.lower() != SEAL.lower())
    return json.dumps(["v1", response_uri, request_uri, date, fields, request_block, response_block],
                      separators=(",", ":")).encode()


def block_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Sealer:
    """Seals records with the installation's secret and checks seals. The secret is read from Redis when first
    needed; an export (`create`) generates it if there is none yet, an import never does (with none, no seal is
    this installation's)."""

    def __init__(self, client: Any, guard: Any, name: str, create: bool) -> None:
        self.client = client
        self.guard = guard
        self.name = name
        self.create = create
        self._secret: bytes | None = None
        self._loaded = False

    def _key(self) -> bytes | None:
        if not self._loaded:
            def load() -> Any:
                if self.create:  # SET NX: two exports at once agree on the first one's secret
                    self.client.set(self.name, secrets.token_hex(32), nx=True)
                return self.client.get(self.name)

            value = self.guard.run(load)
            if value:
                text = value.decode() if isinstance(value, bytes) else str(value)
                redact_in_logs(text)
                self._secret = text.encode()
            self._loaded = True
        return self._secret

    @staticmethod
    def _installation(key: bytes) -> str:
        """Which installation sealed a record (derived from its secret, which it does not reveal)."""
        return hmac.new(key, b"reference-api-buddy installation", hashlib.sha256).hexdigest()[:16]

    def seal(self, material: bytes) -> str:
        key = self._key()
        if key is None:
            raise RuntimeError(f"no archive secret in Redis at {self.name}")
        return f"v1:{self._installation(key)}:{hmac.new(key, material, hashlib.sha256).hexdigest()}"

    def doubt(self, seal: str, material: bytes) -> str | None:
        """None when `seal` is this installation's over `material`; else why it vouches for nothing (ELSEWHERE,
        ALTERED; UNSEALED when there is none)."""
        if not seal:
            return UNSEALED
        found = _SEAL.fullmatch(seal.strip())
        if found is None:
            return ALTERED
        key = self._key()
        if key is None or not hmac.compare_digest(found.group(1), self._installation(key)):
            return ELSEWHERE
        expected = hmac.new(key, material, hashlib.sha256).hexdigest()
        return None if hmac.compare_digest(found.group(2), expected) else ALTERED
