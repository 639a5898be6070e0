"""Small filesystem helpers shared by the local object store and the artifact cache."""

from __future__ import annotations

import os
import pathlib


def fsync_dir(path: pathlib.Path) -> None:
    """Make a rename in `path` durable; some filesystems refuse fsync on directories, which is harmless."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
