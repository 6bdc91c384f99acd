"""Files that appear whole or not at all: written under a fresh temporary name in the same folder, then renamed.

The temporary name is random (not the pid, which repeats across the nodes sharing a filesystem) and is created
exclusively without following symlinks, so two writers never share one, and a link planted at a guessable name
cannot redirect the write elsewhere. The rename replaces whatever is at the final name, a symlink included, rather
than writing through it.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

_EXCLUSIVE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


class AtomicFile:
    """A binary file open under a temporary name: ``commit()`` renames it to ``path``, ``discard()`` removes it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.tmp = temporary_name(self.path)
        self.handle: IO[bytes] = os.fdopen(os.open(self.tmp, _EXCLUSIVE, 0o666), "wb")  # 0o666 less the umask

    def commit(self) -> None:
        self.handle.close()
        os.replace(self.tmp, self.path)  # no fsync: this guards against a crashed process, not a lost machine

    def discard(self) -> None:
        self.handle.close()
        self.tmp.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """An open binary file that becomes ``path`` when the block ends; on an error nothing is left behind."""
    file = AtomicFile(path)
    try:
        yield file.handle
    except BaseException:
        file.discard()
        raise
    file.commit()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as handle:
        handle.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


@contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """A fresh empty folder that replaces ``folder`` when the block ends (the old one set aside until then)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(folder)
    tmp.mkdir()  # fails if anything, a link included, is there: the name is ours alone
    try:
        yield tmp
        old = temporary_name(folder) if folder.exists() or folder.is_symlink() else None
        if old is not None:
            folder.rename(old)
        tmp.rename(folder)
        if old is not None:
            if old.is_symlink() or not old.is_dir():
                old.unlink()
            else:
                shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
