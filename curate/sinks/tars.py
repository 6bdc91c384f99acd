"""The one way curate writes a tar member: webdataset's layout (``{key}.{ext}``), read-only mode, webdataset's
owner names and a fixed mtime, so a rerun over the same rows writes byte-identical tars.

Members are written with the standard library: importing webdataset imports torch, which costs each writing
worker ~1.7 s and ~470 MiB."""

from __future__ import annotations

import io
import tarfile

# An int: a float mtime gets a pax header per member.
TAR_MTIME = 0


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
    info.uname = info.gname = "bigdata"  # as webdataset's TarWriter writes them
    tar.addfile(info, io.BytesIO(data))
