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
import os
from pathlib import Path
from typing import Any

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
    try:
        with open(tmp, "wb") as f:
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


def sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class HashingWriter(io.RawIOBase):
    """A write-only file wrapper that hashes and counts what passes through it, so a file is
    hashed in the same pass that writes it."""

    def __init__(self, f) -> None:
        super().__init__()
        self.f = f
        self.sha = hashlib.sha256()
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
        self.count += data.nbytes
        return data.nbytes

    def flush(self) -> None:
        self.f.flush()
