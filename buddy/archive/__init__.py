"""Cache slices to and from WARC files (ISO 28500, through warcio): `buddy export` and `buddy import`.

An export writes each stored entry as a response record (the stored status, headers and body, dated when it was
stored) and its request record (what the upstream was sent and the entry keyed on, never a credential), with
WARC headers of our own (`WARC-Buddy-*`) for what WARC has no field for. An import reads any WARC, ours or one
recorded by another tool (warcio's `capture_http`, wget, a crawler), rebuilds each entry's key from its recorded
request for the mapping whose upstream the URL belongs to, and stores the answer exactly as the proxy would have
stored it after fetching it live: bodies decoded, hop-by-hop headers and cookies dropped, policy applied.

Both stream: an export reads Redis a SCAN batch at a time and never more than FETCH_BYTES of entries at once; an
import holds at most PENDING records (each at most one body, capped by the proxy's own limits) while it pairs
requests with responses, and reads a gzip member a chunk at a time.

- common.py: our WARC headers, limits, durations, the tally of outcomes, the commands' shared options
- credentials.py: what carries a credential in a record; the installation's seal on records keyed on one
- export.py: `export` (Exporter)
- records.py: the HTTP messages in request and response records; pairing them
- warcfile.py: the records of a file through warcio (Reader), bounded, past corrupt stretches
- importer.py: `import` (Importer, and which mapping a recorded URL belongs to)
"""
from buddy.archive.common import OWN, Duration, Tally, parse_duration
from buddy.archive.credentials import CREDENTIAL_PARAMS, Sealer, query_credentials
from buddy.archive.export import Exporter, export_command, fresh_left
from buddy.archive.importer import HostMap, Importer, ImportOptions, import_command, import_files, resolve
from buddy.archive.records import Malformed, Message, Part, pairs, read_part, read_request, read_response
from buddy.archive.warcfile import Reader

__all__ = [
    "CREDENTIAL_PARAMS", "OWN", "Duration", "Exporter", "HostMap", "ImportOptions", "Importer", "Malformed",
    "Message", "Part", "Reader", "Sealer", "Tally", "export_command", "fresh_left", "import_command", "import_files",
    "pairs", "parse_duration", "query_credentials", "read_part", "read_request", "read_response", "resolve",
]
