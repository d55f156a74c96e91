"""Durable file writes and hashing. No torch here: the commands that only read run
directories (compare, sweep summaries) use this too.

Every file gptexp writes in a run directory is either appended line by line (metrics.jsonl,
train.log, samples.txt) or written atomically: a temporary file in the same directory,
flushed and fsynced, renamed over its final name, then the directory fsynced. A crash leaves
the old file or the new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
from pathlib import Path
from typing import Any

import xxhash

TMP_SUFFIX = ".tmp"


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.unlink(missing_ok=True)  # a stale one (or a link someone put there): never written through
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def sha256_of_open_file(f) -> str:
    """sha256 of an open binary file, read through a memory mapping: the bytes go from the page
    cache to the hash without a copy, and stay cached for a ``torch.load(mmap=True)`` after."""
    if os.fstat(f.fileno()).st_size == 0:
        return hashlib.sha256().hexdigest()  # an empty file cannot be mapped
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        return hashlib.sha256(mapped).hexdigest()  # releases the GIL while it hashes


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_of_open_file(f)


def xxh3_128_of_open_file(f) -> str:
    """XXH3-128 of an open binary file, read through a memory mapping (see above): several
    times faster than sha256, so a verified load costs less than the load itself."""
    if os.fstat(f.fileno()).st_size == 0:
        return xxhash.xxh3_128().hexdigest()
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        return xxhash.xxh3_128(mapped).hexdigest()


def xxh3_128_file(path: Path) -> str:
    with open(path, "rb") as f:
        return xxh3_128_of_open_file(f)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class HashingWriter(io.RawIOBase):
    """A write-only file wrapper that hashes (sha256 and XXH3-128) and counts what passes
    through it, so a file is hashed in the same pass that writes it."""

    def __init__(self, f) -> None:
        super().__init__()
        self.f = f
        self.sha = hashlib.sha256()
        self.fast = xxhash.xxh3_128()
        self.count = 0
        self.error: OSError | None = None  # torch re-raises write errors as RuntimeError

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = memoryview(data)  # hash and write without copying the chunk
        try:
            self.f.write(data)
        except OSError as error:
            self.error = error
            raise
        self.sha.update(data)
        self.fast.update(data)
        self.count += data.nbytes
        return data.nbytes

    def flush(self) -> None:
        self.f.flush()
