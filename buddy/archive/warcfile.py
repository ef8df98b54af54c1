"""The records of a WARC file (plain, gzipped a record per member, or gzipped whole) through warcio, with bounded
memory, and past corrupt stretches at a bounded cost."""
from __future__ import annotations

import contextlib
import io
import os
import zlib
from pathlib import Path
from typing import IO, Any, Callable, Iterator, cast

from warcio.archiveiterator import WARCIterator
from warcio.bufferedreaders import DecompressingBufferedReader
from warcio.exceptions import ArchiveLoadFailed
from warcio.statusandheaders import StatusAndHeadersParserException
from warcio.utils import BUFF_SIZE

from buddy.archive.common import CHUNK, LINE_LIMIT, Tally, first_line
from buddy.archive.records import Part, read_part

HEADER_LIMIT = 256 * 1024  # one record's WARC header block
# How much a file's corrupt stretches may make the reader read while it looks for the next record, besides
# RESYNC_FACTOR times the file's size: past it the rest of the file is skipped (reported), so that a hostile
# file full of things that look like the start of a record costs time in proportion to its size, no more.
RESYNC_BYTES = 64 * 1024 * 1024
RESYNC_FACTOR = 16


class _BoundedReader(DecompressingBufferedReader):  # type: ignore[misc]
    """warcio's reader with bounded lines. warcio reads WARC header lines with an unbounded readline(): a record
    whose header line never ends would be read whole into memory (gigabytes from a small gzip member). Here a line
    read without a limit is refused past LINE_LIMIT, and a header block past HEADER_LIMIT; a line read with a limit
    is read up to it (warcio's own readline may stop short of it at a buffer's end)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_bytes = 0  # read by unbounded readline() calls since the last read(): one header block

    def read(self, length: int | None = None) -> bytes:
        self.header_bytes = 0
        return cast(bytes, super().read(length))

    def readline(self, length: int | None = None) -> bytes:
        bounded = length is not None and length >= 0
        want = min(cast(int, length), LINE_LIMIT + 1) if bounded else LINE_LIMIT + 1
        line = cast(bytes, super().readline(want))
        while line and len(line) < want and not line.endswith(b"\n"):
            more = cast(bytes, super().readline(want - len(line)))
            if not more:
                break
            line += more
        if bounded:
            self.header_bytes = 0
            return line
        self.header_bytes += len(line)
        if len(line) > LINE_LIMIT or self.header_bytes > HEADER_LIMIT:
            raise ArchiveLoadFailed("WARC headers over their limits (a line over 64 KiB, or 256 KiB in all)")
        return line


class _Records(WARCIterator):  # type: ignore[misc]
    """warcio's WARC iterator over a plain WARC stream (a gzipped file is decoded by _Member), through a
    _BoundedReader; records unparsed (read_part reads their HTTP messages)."""

    def __init__(self, fh: IO[bytes]) -> None:
        super().__init__(fh, no_record_parse=True)
        self.reader = _BoundedReader(self.fh, block_size=BUFF_SIZE, decomp_type=None)


class _Member:
    """One gzip member of a file, as the plain WARC it decodes to: one record in a .warc.gz as it should be, any
    number in a file gzipped whole (`gzip file.warc`). warcio reads a gzipped file itself, but only one record per
    member, and where a member holds more it says so a record late, with offsets that mean nothing.

    Damage (the file cut short inside the member, deflate data that does not decode) ends it as an end of file
    would, after every byte that decodes, and is kept in `damage`; `end` is where the member ends in the file once
    read whole, and `leftover` the bytes after it already read. The last WINDOW bytes decoded are kept, so that
    looking past a corrupt stretch (which reads ahead, then goes back) does not decode the member again from its
    start; going back further does (`restarted` counts the bytes decoded again)."""

    WINDOW = 1024 * 1024

    def __init__(self, raw: IO[bytes], start: int, head: bytes | memoryview = b"") -> None:
        self.raw = raw
        self.start = start
        self.head = head  # the file's bytes from `start` on, already read
        self.end: int | None = None
        self.leftover: bytes | memoryview = b""
        self.damage: BaseException | None = None
        self.restarted = 0
        self.position = 0  # where the next read() starts, in decoded bytes
        self._begin()

    def _begin(self) -> None:
        self.inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self.chunk = memoryview(self.head)  # the file's bytes being decoded, from offset chunk_at
        self.chunk_at = self.start
        self.given = 0  # how much of the chunk the decoder was given
        self.decoded = 0  # decoded so far; the window holds the bytes just before it
        self.window = bytearray()

    @property
    def fed(self) -> int:
        """Where the file's bytes given to the decoder end."""
        return self.chunk_at + self.given

    def _pull(self) -> bool:
        """Decode some more; False at the member's end (or its damage)."""
        while self.end is None and self.damage is None:
            try:
                if self.inflate.unconsumed_tail:
                    data = self.inflate.decompress(self.inflate.unconsumed_tail, CHUNK)
                else:
                    if self.given == len(self.chunk):
                        self.raw.seek(self.fed)
                        self.chunk, self.chunk_at, self.given = memoryview(self.raw.read(CHUNK)), self.fed, 0
                        if not self.chunk:
                            raise EOFError("the file ends inside a record (inside its gzip member)")
                    # A small piece at a time, so that a member's end costs no copy of the rest of the chunk; and
                    # bounded output: a gzip bomb decodes a chunk at a time.
                    piece = self.chunk[self.given:self.given + 4096]
                    self.given += len(piece)
                    data = self.inflate.decompress(piece, CHUNK)
            except (EOFError, OSError, zlib.error) as exc:
                self.damage = exc
                return False
            if self.inflate.eof:
                self.end = self.fed - len(self.inflate.unused_data)
                self.leftover = self.chunk[self.end - self.chunk_at:]
            if data:
                self.window += data
                del self.window[:-self.WINDOW]
                self.decoded += len(data)
                return True
        return False

    def read(self, size: int = -1) -> bytes:
        out = bytearray()
        while size < 0 or len(out) < size:
            if self.position < self.decoded - len(self.window):  # before the window: decode again from the start
                self.restarted += self.decoded
                self._begin()
            if self.position < self.decoded:
                start = len(self.window) - (self.decoded - self.position)
                taken = self.window[start:] if size < 0 else self.window[start:start + size - len(out)]
                out += taken
                self.position += len(taken)
            elif not self._pull():
                break
        return bytes(out)

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = max(0, offset if whence == 0 else self.position + offset)
        return self.position

    def tell(self) -> int:
        return self.position


class Reader:
    """The request and response records of one WARC file (plain, gzipped a record per member, or gzipped whole),
    in order. Past a corrupt stretch it looks for the next record (a gzip member that decodes to a WARC record, or
    a `WARC/1.` line that starts a header block) and goes on; what looking costs is bounded in proportion to the
    file's size (RESYNC_BYTES). Problems are reported to `tally` as errors."""

    def __init__(self, path: Path, tally: Tally, limits: tuple[int, int],
                 progress: Callable[[int], None] = lambda n: None) -> None:
        self.path = path
        self.tally = tally
        self.limits = limits
        self.progress = progress
        self._shown = 0
        self._resync_left = 0  # what looking past corrupt stretches may still cost (see RESYNC_BYTES)

    def parts(self) -> Iterator[Part]:
        with open(self.path, "rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            size = os.fstat(raw.fileno()).st_size
            self._resync_left = RESYNC_BYTES + RESYNC_FACTOR * size
            yield from self._members(raw) if gzipped else self._parts(raw, raw)
            self.progress(size - self._shown)

    def _members(self, raw: IO[bytes]) -> Iterator[Part]:
        """The parts of a gzipped file, a gzip member at a time; past a damaged one, from the next that decodes."""
        start: int | None = 0
        head: bytes | memoryview = b""
        while start is not None:
            while True:  # past any padding between members (NUL bytes, blank lines), to the next or the end
                if not head:
                    raw.seek(start)
                    head = raw.read(4096)
                    if not head:
                        return
                lead = bytes(head[:4096])
                skipped = len(lead) - len(lead.lstrip(b"\x00\r\n\t "))
                start, head = start + skipped, head[skipped:]
                if skipped < len(lead):
                    break
            member = _Member(raw, start, head)
            yield from self._parts(cast(IO[bytes], member), raw, member)
            if self._resync_left < 0:
                return  # given up on (and told)
            while member.end is None and member._pull():  # (warcio stops at a record without a length)
                pass
            if member.end is not None:
                start, head = member.end, member.leftover
                continue
            assert member.damage is not None  # (_pull stops at the member's end or its damage)
            where = f"{self.path.name} at offset {start}"
            if isinstance(member.damage, EOFError):
                self.tally.skip("records cut short (a truncated or corrupt file)", f"{where}: {member.damage}",
                                error=True)
            else:
                what = "not a WARC file" if start == 0 and member.decoded == 0 else "corrupt data"
                self.tally.skip(what, f"{where}: {first_line(member.damage)}", error=True)
            self._resync_left -= member.fed - start + member.restarted
            start, head = (self._next_record(raw, start + 1, gzipped=True) if self._resync_left >= 0 else None), b""

    def _parts(self, fh: IO[bytes], raw: IO[bytes], member: _Member | None = None) -> Iterator[Part]:
        """The parts of a plain WARC stream: the file, or one of its gzip members."""
        start: int | None = 0
        resyncing = False
        restarted = 0
        while start is not None:
            at = good = start
            fh.seek(at)
            iterator = _Records(fh)
            try:
                for record in self._quietly(iterator):
                    if record.length is None:  # warcio would read the rest of the file as its content
                        raise ArchiveLoadFailed("a WARC record without a Content-Length (or no WARC record)")
                    resyncing = False  # a record was read: a later failure is a new corrupt stretch
                    if record.rec_type in ("request", "response"):
                        part = read_part(record, self._where(iterator.offset, member), self.limits)
                        if part.problem:
                            self.tally.skip(part.problem, f"{part.where}: {part.detail}", error=True)
                        yield part
                    elif record.rec_type == "revisit":
                        self.tally.skip("revisit records (they point at a body elsewhere)")
                    with contextlib.redirect_stderr(io.StringIO()):  # (see _quietly)
                        iterator.read_to_end()
                    good = iterator.offset
                    self.progress(raw.tell() - self._shown)
                    self._shown = raw.tell()
                start = None
                fh.seek(good)
                if member is None and fh.read(4096).strip():
                    self.tally.skip("records cut short (a truncated or corrupt file)",
                                    f"{self._where(good, member)}: the file ends inside a record", error=True)
            except (ArchiveLoadFailed, StatusAndHeadersParserException, EOFError, OSError, zlib.error) as exc:
                if not resyncing:  # one message per corrupt stretch, not one per attempt to get past it
                    first = good == 0 and (member is None or member.start == 0)
                    self.tally.skip("not a WARC file" if first else "corrupt data",
                                    f"{self._where(good, member)}: {first_line(exc)}", error=True)
                # What the attempt cost: what warcio consumed of what it read (it reads ahead a block at a time),
                # a little for the attempt itself, and what a gzip member was decoded again (see _Member).
                ahead = iterator.reader.rem_length() if iterator.reader is not None else 0
                again = member.restarted - restarted if member is not None else 0
                restarted += again
                self._resync_left -= max(fh.tell() - ahead - at, 0) + BUFF_SIZE + again
                if self._resync_left < 0:
                    self.tally.skip("corrupt data", f"{self._where(at, member)}: too damaged to look further; the "
                                    "rest of the file is skipped", error=True)
                    return
                start, resyncing = self._next_record(fh, max(good, at) + 1, gzipped=False), True

    def _where(self, offset: int, member: _Member | None) -> str:
        """Where a record is: its offset in the file, or in a gzip member's decoded data after the member's."""
        if member is None:
            return f"{self.path.name} at offset {offset}"
        return f"{self.path.name} at offset {member.start}" + (f" (+{offset} decoded)" if offset else "")

    @staticmethod
    def _quietly(iterator: WARCIterator) -> Iterator[Any]:
        """warcio writes its own warnings to stderr; ours are in the tally."""
        while True:
            with contextlib.redirect_stderr(io.StringIO()):
                record = next(iterator, None)
            if record is None:
                return
            yield record

    def _next_record(self, fh: IO[bytes], start: int, gzipped: bool) -> int | None:
        """Where the next record may start, from `start` on: a gzip member that decodes to `WARC/1.` (gzip magic
        in noise is passed over at the cost of a few bytes each), or a `WARC/1.` line that starts a header block.
        What the search reads counts against the budget; None past it, or at the end."""
        blank_lines = _BlankLines(fh)
        marker = b"\x1f\x8b\x08" if gzipped else b"\nWARC/1."
        for found in _occurrences(fh, start, marker, max(self._resync_left, 0)):
            if gzipped:
                opens, cost = _opens_a_record(fh, found)
                self._resync_left -= cost
                if opens:
                    self._resync_left -= found - start
                    return found
            elif blank_lines.after(found + 1, HEADER_LIMIT) is not None:
                self._resync_left -= found - start
                return found + 1
            # (else: no end of a header block within the limit, so warcio could not read one from here)
            if self._resync_left < found - start:
                break
        self._resync_left -= max(fh.tell() - start, 0)
        if self._resync_left < 0:
            self.tally.skip("corrupt data", f"{self.path.name}: too damaged to look further (after offset {start}"
                            f"{' of a gzip member' if isinstance(fh, _Member) else ''}); the rest of the file is "
                            "skipped", error=True)
        return None


def _occurrences(fh: IO[bytes], start: int, marker: bytes, limit: int) -> Iterator[int]:
    """Every offset of `marker` in `fh` from `start` on, up to `limit` bytes after it, reading them once (the caller
    may move `fh` in between)."""
    position, carry = start, b""
    while position - start <= limit:
        fh.seek(position)
        chunk = fh.read(CHUNK)
        if not chunk:
            return
        data, base = carry + chunk, position - len(carry)
        found = data.find(marker)
        while found >= 0:
            yield base + found
            found = data.find(marker, found + 1)
        carry = data[-(len(marker) - 1):]
        position += len(chunk)


class _BlankLines:
    """Where the header block starting at an offset ends (its blank line), for offsets asked about in increasing
    order, reading the file once however many are asked about."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.found = -1  # a blank line's offset (the first at or after the last offset asked about), or -1
        self.scanned = 0  # no blank line starts before this offset and at or after the last offset asked about

    def after(self, at: int, within: int) -> int | None:
        """The offset of the first blank line at or after `at`, if it is within `within` bytes of it."""
        if self.found < at:
            position, end = max(at, self.scanned), at + within
            while position < end:
                self.fh.seek(position)
                data = self.fh.read(min(CHUNK, end - position) + 2)  # +2: a blank line across the chunk's end
                hits = [i for i in (data.find(b"\n\n"), data.find(b"\n\r\n")) if i >= 0]
                if hits:
                    self.found = position + min(hits)
                    break
                if len(data) <= 2:
                    position = end
                    break
                position += len(data) - 2
            self.scanned = position
        return self.found if at <= self.found <= at + within else None


def _opens_a_record(fh: IO[bytes], at: int) -> tuple[bool, int]:
    """Does a gzip member start at `at` whose first decoded bytes are a WARC record's `WARC/1.`? And how many bytes
    it took to tell: at most 16 KiB, 64 bytes first (noise fails within them)."""
    fh.seek(at)
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out, cost = b"", 0
    for size in (64, *(1024,) * 16):
        data = fh.read(size)
        cost += len(data)
        if not data:
            break
        try:
            out += inflate.decompress(data, 64)
        except zlib.error:
            return False, cost
        if len(out.lstrip(b"\r\n")) >= 7 or inflate.eof:
            break
    return out.lstrip(b"\r\n").startswith(b"WARC/1."), cost
