"""A change counter every process of the machine shares through one mapped file.

The cache's workers remember the index rows they read (``cache_store``) and
must forget them the moment another process changes the entries: a purge
holds for every request after it returns. Asking SQLite (``PRAGMA
data_version``) costs a statement and two ``fcntl`` locks per lookup;
reading this counter costs one memory load. Every writer of the entries
moves it after its commit, so a reader that sees the old value has not
missed a commit that was visible before it looked.

The counter is one aligned 8-byte word: CPython's ``struct``, in native
mode, stores and loads it with one fixed-size ``memcpy`` (one machine
move), so a reader sees the old value or the new, never a mix. Writers
increment it under an exclusive ``flock`` of the file, so no increment is
lost (a lost one could bring the counter back to a value a reader holds).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from pathlib import Path

__all__ = ["Generation"]

_WORD = struct.Struct("Q")  # native: one aligned machine word, moved by one memcpy
#: The file's size: one page, so the map never reaches past the file's end.
_SIZE = mmap.PAGESIZE


class Generation:
    """This process's view of the counter in ``path`` (created if missing)."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if os.fstat(fd).st_size < _SIZE:
                os.ftruncate(fd, _SIZE)  # zeros; never shrinks a file another process maps
            self._map = mmap.mmap(fd, _SIZE)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    @property
    def value(self) -> int:
        return int(_WORD.unpack_from(self._map)[0])

    def bump(self) -> None:
        """Move the counter on: call after the commit that changed what readers remember."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            _WORD.pack_into(self._map, 0, (self.value + 1) & 0xFFFF_FFFF_FFFF_FFFF)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)
