"""Files written atomically: a reader, or a crash, sees the old file or the new one.

Every file minillm writes (checkpoints, tokenizers, the tour's cache and report)
goes through these three functions:

    atomic_write_bytes(path, data)   bytes -> a temporary sibling, fsync, rename
    atomic_write_text(path, text)    the same for UTF-8 text (newlines as given)
    atomic_dir(path, write)          write(tmp_dir) fills a temporary sibling
                                     directory, which is then swapped in

The temporary name lives in the same directory as ``path`` (``.<name>.tmp-<tag>``),
so the final ``os.replace`` is a rename within one file system, which POSIX makes
atomic. If anything fails before the rename, ``path`` is untouched and the
temporary is removed.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path``: temporary sibling, fsync, ``os.replace``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"data must be bytes, got {type(data).__name__}")
    path = Path(path)
    tmp = _sibling(path, "tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())          # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` as UTF-8 (no newline translation), atomically."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_dir(path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_dir)`` then swap ``tmp_dir`` into ``path`` with renames.

    If anything fails before the swap, ``path`` is untouched. The old directory
    is renamed aside first and removed only after the new one is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp, old = _sibling(path, "tmp", tag), _sibling(path, "old", tag)
    tmp.mkdir()
    try:
        write(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _sibling(path: Path, kind: str, tag: str | None = None) -> Path:
    """A hidden name beside ``path``: ``.<name>.<kind>-<random tag>``."""
    return path.parent / f".{path.name}.{kind}-{tag or uuid.uuid4().hex[:8]}"
