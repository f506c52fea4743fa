"""Writing a file that holds secrets or state: readable by its owner only, and atomically."""

import os
from pathlib import Path


def write_private_file(path: Path, text: str) -> None:
    """Replace `path` with `text`: written to a temporary file beside it (mode 0600 even if one
    was left by a crash with another mode), flushed to disk, then renamed over `path`, so a
    reader sees the old file or the new one, never half of one."""
    temporary = path.with_name(f".{path.name}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # O_CREAT keeps the mode of a file that was already there
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
