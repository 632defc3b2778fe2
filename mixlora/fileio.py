"""Files a user keeps: written atomically (a complete old or a complete new version, never half of one), and the
error that names an unreadable file."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable
from typing import Any


class AdapterFileError(ValueError):
    """A file of an adapter (or of a training checkpoint) that cannot be read: truncated, corrupt, of the wrong
    kind, or a file where a directory is expected. `path` is the file, `problem` what is wrong with it; the
    message is "PATH: PROBLEM". A ValueError, so callers that catch bad input already catch it."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path, self.problem = os.fspath(path), problem
        super().__init__(f"{self.path}: {problem}")


def write_file_atomically(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Write a file so that `path` only ever holds a complete version of it.

    `write(tmp_path)` creates the new content under a temporary name in the same directory; it then replaces
    `path` with one `os.replace` (atomic on POSIX and Windows). If anything fails, the temporary file is removed
    and the previous `path`, if any, is left as it was. The temporary file is created by `write` itself, so it
    gets the usual permissions (umask), not the 0600 of `tempfile.mkstemp`.
    """
    directory, name = os.path.split(os.path.abspath(path))
    tmp_path = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        raise


def write_bytes_atomically(path: str | os.PathLike[str], data: bytes) -> None:
    """`data` at `path`, via `write_file_atomically`."""

    def write(tmp_path: str) -> None:
        with open(tmp_path, "wb") as f:
            f.write(data)

    write_file_atomically(path, write)


def write_json_atomically(path: str | os.PathLike[str], value: Any) -> None:
    """`value` as indented JSON (UTF-8, trailing newline) at `path`, via `write_file_atomically`."""
    write_bytes_atomically(path, (json.dumps(value, indent=2) + "\n").encode("utf-8"))
