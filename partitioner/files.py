"""Files read and written safely: regular files only, reads capped, writes whole or not at all.

Profiles, clusters, plans and checkpoints come from files a user names, and outputs go to
paths a user names; the same two rules serve them all.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["NotRegularFile", "FileTooLarge", "read_capped", "staged"]


class NotRegularFile(OSError):
    """A directory, FIFO or device where a regular file was expected; the message says which."""


class FileTooLarge(OSError):
    """A file larger than the cap on what is read of it."""


def read_capped(path: str | os.PathLike[str], cap: int) -> bytes:
    """The bytes of `path`, a regular file of at most `cap` bytes.

    Only regular files (after following links): a FIFO would block until a writer comes,
    and ``/dev/zero`` or ``/dev/urandom`` never end. At most ``cap + 1`` bytes are read,
    whatever `stat` said, so a file that grows while read cannot exhaust memory.

    Raises:
        NotRegularFile: Not a regular file.
        FileTooLarge: Larger than `cap` bytes.
        OSError: The file cannot be read.
    """
    path = Path(path)
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a special file"
        raise NotRegularFile(f"is {kind}, not a regular file")
    with path.open("rb") as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise FileTooLarge(f"larger than {cap:,} bytes")
    return data


@contextmanager
def staged(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary file beside `path` (same suffix) to write, renamed onto `path` when the
    block succeeds and removed when it fails: a reader never sees half a file, and a crash
    or Ctrl-C leaves none. The name holds the process id, so two writers do not collide.

    Raises:
        OSError: The rename failed (the temporary file is removed).
    """
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp{target.suffix}")
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
