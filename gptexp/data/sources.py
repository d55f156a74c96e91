"""Text sources: the default corpus (Python's own documentation), tiny Shakespeare (downloaded
once, checked by its sha256) and any UTF-8 file."""

from __future__ import annotations

import hashlib
import logging
import urllib.error
import urllib.request
from pathlib import Path

from gptexp.core.config import DataConfig
from gptexp.core.errors import DataError
from gptexp.core.fsio import atomic_write_bytes, sha256_text
from gptexp.data.cache import cache_dir

log = logging.getLogger(__name__)

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def python_docs_text() -> str:
    """The default corpus: the documentation topics that ship with Python (``pydoc_data``).

    About 450 KB of English prose and code examples, licensed with Python itself, present on
    every Python installation, so the default run needs no download.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _read_utf8(path: Path, key: str) -> str:
    """The text of a regular file (a device such as /dev/zero never ends, a pipe is read once)."""
    named = f"{key}={str(path)!r}"
    if not path.exists():
        raise DataError(f"{named}: no such file")
    if path.is_dir():
        raise DataError(f"{named}: a directory; give the text file itself")
    if not path.is_file():
        raise DataError(f"{named}: not a regular file (a device, pipe or socket); give a text file")
    try:
        return path.read_text(encoding="utf-8")
    except PermissionError:
        raise DataError(f"{named}: permission denied (cannot read it)") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{key}={str(path)!r}: not UTF-8 text ({error.reason})") from None


def shakespeare_text(path: str | None) -> str:
    """tiny-shakespeare: from ``path`` if given, else the cache, else downloaded once."""
    if path:
        text = _read_utf8(Path(path), "data.path")
        if sha256_text(text) != SHAKESPEARE_SHA256:
            raise DataError(
                f"data.path={path!r} is not tiny-shakespeare (sha256 differs); "
                "use data=text for other files"
            )
        return text
    cached = cache_dir() / "tinyshakespeare.txt"
    if cached.is_file():
        # Hash the bytes, not decoded text: a damaged cache may not even be UTF-8.
        raw = cached.read_bytes()
        if hashlib.sha256(raw).hexdigest() == SHAKESPEARE_SHA256:
            return raw.decode("utf-8")
        log.warning("cached %s is damaged (sha256 differs); downloading it again", cached)
    log.info("downloading tiny-shakespeare from %s", SHAKESPEARE_URL)
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
            raw = response.read()
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        raise DataError(
            f"could not download tiny-shakespeare from {SHAKESPEARE_URL} ({error}). "
            f"Offline? Put the file at {cached} or pass data.path=<local copy>"
        ) from None
    if hashlib.sha256(raw).hexdigest() != SHAKESPEARE_SHA256:
        raise DataError(f"download from {SHAKESPEARE_URL} failed its sha256 check; not cached")
    cached.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cached, raw)
    return raw.decode("utf-8")


def load_text(cfg: DataConfig) -> str:
    if cfg.name == "pydocs":
        return python_docs_text()
    if cfg.name == "shakespeare":
        return shakespeare_text(cfg.path)
    return _read_utf8(Path(cfg.path or ""), "data.path")
