"""Atomic file output: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` that replaces `path` only if the block completes.

    Missing folders on the way are created, and removed again if the block fails: on any
    error the temporary file is removed and `path` is left as it was. An OSError about the
    temporary file is raised again about `path` (same errno, plain `strerror`, `filename` =
    `path`), so messages name the file the caller asked for, never the temporary one.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    created = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    done = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield temporary
        os.replace(temporary, path)
        done = True
    except OSError as error:
        if not _mentions(error, temporary):
            raise
        raise _about(error, temporary, path) from None
    finally:
        temporary.unlink(missing_ok=True)
        for folder in created if not done else ():  # innermost first; only if still empty
            try:
                folder.rmdir()
            except OSError:
                break


def _mentions(error: OSError, temporary: Path) -> bool:
    names = (error.filename, error.filename2, error.strerror, *error.args)
    return any(str(temporary) in str(name) for name in names if name is not None)


def _about(error: OSError, temporary: Path, path: Path) -> OSError:
    """The same failure, reported about `path` (OSError maps errno to its subclass)."""
    if error.errno is not None:
        return OSError(error.errno, os.strerror(error.errno), str(path))
    return OSError(str(error).replace(str(temporary), str(path)))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in pieces."""
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
