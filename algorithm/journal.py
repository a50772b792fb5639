"""Crash-safe in-place appends to an HDF5 file: a small write-ahead journal.

HDF5 writes a new group (a finished task) past the end of the file, but it also rewrites a
few metadata blocks in place (the superblock, the root group's index): a process killed
while HDF5 writes those could leave a file that no longer opens. `appending(path)` opens
the file for h5py through a file object that keeps the old part of the file untouched
until the append is complete:
- bytes written past the file's old size go straight to the file (nothing on disk refers
  to them until the metadata does);
- bytes written into the old part (a few KB of metadata per append) are held in memory,
  page by page;
- commit: fsync the new bytes; write the held pages to `<file>.journal` with a checksum
  and fsync it; copy the pages into the file and fsync; delete the journal.
The journal is created (with the old size) before anything is written, so whenever a run
dies there is either no journal and the file is whole, or a journal that `recover` uses
to finish the append (its pages are complete) or to cut the file back to its old size
(they are not). Either way the file is the state before or after one whole append, and an
append costs what it writes: its own bytes, plus a few pages twice.
"""
import os
import struct
import zlib
from contextlib import contextmanager
from pathlib import Path

PAGE = 4096
MAGIC = b"ADJRNL01"
_HEAD = struct.Struct("<8sQI")   # magic, old size, crc32 of the two
_BODY = struct.Struct("<QI")     # new size, number of pages (then the pages, then crc32 of it all)
_PAGE = struct.Struct("<QI")     # page index, length (then the bytes)


def journal_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".journal")


def _fsync_dir(path: Path):
    """Make a file's creation or removal durable (its directory entry), not only its bytes."""
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class JournaledFile:
    """A binary file object for h5py's `fileobj` driver that holds writes below the file's
    old size in memory until `commit` (see the module doc)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDWR)
        self.old_size = self.size = os.fstat(self.fd).st_size
        self.pages: dict[int, bytearray] = {}  # page index -> the page's bytes below old_size
        self.pos = 0
        # the first write that failed (a full disk): the append is lost from then on, and later
        # writes only pretend to succeed, so that HDF5 closes the file quietly instead of
        # retrying, reporting and failing again on every block; `appending` then undoes the
        # append and raises this error
        self.error: OSError | None = None

    # -- the file-object protocol h5py uses: seek, tell, readinto, write, truncate, flush
    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        n = max(0, min(len(view), self.size - self.pos))
        for a, b, page in self._pieces(self.pos, self.pos + n):
            if page is None:
                view[a - self.pos:b - self.pos] = os.pread(self.fd, b - a, a).ljust(b - a, b"\0")
            else:
                start = a - (a // PAGE) * PAGE
                view[a - self.pos:b - self.pos] = page[start:start + b - a]
        self.pos += n
        return n

    def read(self, n: int = -1) -> bytes:
        buf = bytearray(max(0, self.size - self.pos) if n < 0 else n)
        return bytes(buf[:self.readinto(buf)])

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        try:
            if self.error is None:
                self._write(data)
        except OSError as e:
            self.error = e
        self.pos += len(data)
        self.size = max(self.size, self.pos)
        return len(data)

    def _write(self, data: memoryview):
        for a, b, page in self._pieces(self.pos, self.pos + len(data), create=True):
            if page is None:
                os.pwrite(self.fd, data[a - self.pos:b - self.pos], a)
            else:
                start = a - (a // PAGE) * PAGE
                page[start:start + b - a] = data[a - self.pos:b - self.pos]

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        try:
            if self.error is None:  # the old part is never cut before commit: a shorter size comes with the pages
                os.ftruncate(self.fd, max(size, self.old_size))
        except OSError as e:
            self.error = e
        self.size = size
        return size

    def flush(self):
        pass  # durability is commit's job

    def _pieces(self, a: int, b: int, create: bool = False):
        """(start, stop, page or None) covering [a, b): held pages below old_size, the file above."""
        while a < b:
            if a >= self.old_size:
                yield a, b, None
                return
            index = a // PAGE
            stop = min(b, (index + 1) * PAGE, self.old_size)
            page = self.pages.get(index)
            if page is None and create:
                lo, hi = index * PAGE, min((index + 1) * PAGE, self.old_size)
                page = self.pages[index] = bytearray(os.pread(self.fd, hi - lo, lo).ljust(hi - lo, b"\0"))
            yield a, stop, page
            a = stop

    # -- commit and abort
    def commit(self):
        try:
            os.fsync(self.fd)  # the new bytes first: the journal must never point at data not on disk
            body = _BODY.pack(self.size, len(self.pages)) + b"".join(
                _PAGE.pack(i, len(p)) + bytes(p) for i, p in sorted(self.pages.items()))
            _write_journal(self.path, body + struct.pack("<I", zlib.crc32(body)), os.O_APPEND)
        except BaseException:
            # not committed (a full disk, an I/O error): the old part was never touched, so the
            # append is undone here and now, and no journal is left to look like a killed run
            self.abort()
            raise
        _apply(self.fd, self.pages, self.size)
        os.close(self.fd)
        _remove(journal_path(self.path))

    def abort(self):
        """Forget the append: cut the new bytes off (the old part was never written)."""
        os.ftruncate(self.fd, self.old_size)
        os.close(self.fd)
        _remove(journal_path(self.path))


def _apply(fd: int, pages: dict, size: int):
    for i, page in sorted(pages.items()):
        os.pwrite(fd, page, i * PAGE)
    os.ftruncate(fd, size)
    os.fsync(fd)


def _remove(journal: Path):
    if journal.exists():
        os.unlink(journal)
        _fsync_dir(journal)


def _write_journal(path: Path, data: bytes, flags: int):
    fd = os.open(journal_path(path), os.O_WRONLY | os.O_CREAT | flags, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _begin(path: Path, old_size: int):
    """The journal's head, durable before the file is touched: the size to cut back to."""
    _write_journal(path, _HEAD.pack(MAGIC, old_size, zlib.crc32(MAGIC + struct.pack("<Q", old_size))), os.O_TRUNC)
    _fsync_dir(path)


def _read_journal(data: bytes):
    """(old size or None, (new size, pages) or None) from a journal's bytes; None where damaged."""
    if len(data) < _HEAD.size:
        return None, None
    magic, old_size, crc = _HEAD.unpack_from(data)
    if magic != MAGIC or crc != zlib.crc32(MAGIC + struct.pack("<Q", old_size)):
        return None, None
    body, tail = data[_HEAD.size:-4], data[-4:]
    if len(body) < _BODY.size or struct.unpack("<I", tail)[0] != zlib.crc32(body):
        return old_size, None  # the append did not reach its commit
    new_size, n = _BODY.unpack_from(body)
    pages, at = {}, _BODY.size
    for _ in range(n):
        i, length = _PAGE.unpack_from(body, at)
        at += _PAGE.size
        pages[i] = body[at:at + length]
        at += length
    return old_size, (new_size, pages)


def recover(path: Path) -> str | None:
    """Finish or undo an append that a dead process left (see the module doc); what was done."""
    path, journal = Path(path), journal_path(path)
    if not journal.exists():
        return None
    old_size, committed = _read_journal(journal.read_bytes())
    if old_size is not None and path.exists():
        fd = os.open(path, os.O_RDWR)
        try:
            if committed:
                _apply(fd, committed[1], committed[0])
            else:
                os.ftruncate(fd, old_size)
                os.fsync(fd)
        finally:
            os.close(fd)
    _remove(journal)  # a journal without a valid head was cut short before the file was touched
    return "finished" if committed else "undone"


@contextmanager
def appending(path: Path):
    """Yield a file object for `h5py.File(obj, "r+")`; the block's writes reach `path` as
    one crash-safe append when it ends, and not at all if it raises."""
    path = Path(path)
    recover(path)
    try:
        _begin(path, os.path.getsize(path))
        f = JournaledFile(path)
    except BaseException:  # nothing was written to the file yet: a journal left now would be noise
        _remove(journal_path(path))
        raise
    try:
        yield f
    except BaseException:
        f.abort()
        if f.error is not None:  # h5py's own error for a failed write hides its cause (e.g. ENOSPC)
            raise f.error from None
        raise
    if f.error is not None:
        f.abort()
        raise f.error
    f.commit()
