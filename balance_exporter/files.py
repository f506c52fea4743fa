"""Reading and writing files that hold secrets or state: written readable by the owner only and
atomically, read only when they are regular files, and never more than a cap."""

import contextlib
import os
import stat
import tempfile
from pathlib import Path


def write_private_file(path: Path, text: str) -> None:
    """Replace `path` with `text`: written to a new temporary file beside it (created
    exclusively, mode 0600, so that nothing planted there, a symlink included, is followed or
    kept), flushed to disk, then renamed over `path`, so a reader sees the old file or the new
    one, never half of one."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                             suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


class NotARegularFile(OSError):
    """What was asked for is a device, a FIFO, a socket or a directory."""


class FileTooLarge(ValueError):
    """The file is larger than the reader's cap."""


def read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of `path` if it is a regular file (a symlink to one is fine) of at most
    `limit` bytes. A FIFO is not waited on (opened without blocking), and a device, whatever
    size it claims, is not read."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(descriptor, "rb") as file:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFile(f"{path} is not a regular file")
        data = file.read(limit + 1)  # what is read is capped, whatever the size said
    if len(data) > limit:
        raise FileTooLarge(f"larger than {limit} bytes")
    return data
