"""Archives in an export tree: zip, tar (plain or compressed) and single compressed files (.dcm.gz).

Patients arrive as `.zip` files or `.dcm.gz` files as often as as folders; skipping them would
drop a patient silently. `Unpacker` unpacks every archive it is given into a private temporary
folder (removed when the import ends) whose entries are named after the archive, so messages
still say where a file came from; archives are recognised by their content, not their name.
An archive that cannot be read (7-Zip, RAR, damaged, too large for the free disk) is reported
with why, so the import can say that a patient may be missing.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path

# Leading bytes of the archives read here, and of those that need a tool outside Python's library.
_COMPRESSED = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}
_UNREADABLE = {b"7z\xbc\xaf\x27\x1c": "a 7-Zip archive", b"Rar!\x1a\x07": "a RAR archive",
               b"\x28\xb5\x2f\xfd": "a Zstandard-compressed file", b"\x04\x22\x4d\x18": "an LZ4-compressed file",
               b"\x1f\x9d": "a Unix-compressed (.Z) file"}
ISO_MAGIC = (32769, b"CD001")  # an ISO 9660 disc image (a CD export as one file)
MAX_DEPTH = 3  # archives inside archives inside archives: deeper is refused


def archive_kind(path: Path) -> str:
    """"zip", "tar", "compressed" (gzip, bzip2, xz of one file), "a 7-Zip archive" / "a RAR archive"
    (not readable here), or "" for a file that is no archive. By content, never by name."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError:
        return ""
    if head[128:132] == b"DICM":  # a DICOM file, whatever its preamble holds
        return ""
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):  # a zip (or an empty one)
        return "zip"
    if head[257:262] == b"ustar":
        return "tar"
    for magic, what in _UNREADABLE.items():
        if head.startswith(magic):
            return what
    if _at(path, *ISO_MAGIC):
        return "an ISO disc image"
    if any(head.startswith(m) for m in _COMPRESSED):
        return "tar" if _is_tar(path) else "compressed"
    return ""


def _at(path: Path, offset: int, magic: bytes) -> bool:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(len(magic)) == magic


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, EOFError, tarfile.TarError, lzma.LZMAError, ValueError):
        return False


def _opener(path: Path):
    with open(path, "rb") as fh:
        head = fh.read(6)
    return next(o for m, o in _COMPRESSED.items() if head.startswith(m))


def _unpacked_size(path: Path, kind: str) -> int:
    """Bytes the archive unpacks to (compressed single files: read through once, nothing written)."""
    if kind == "zip":
        with zipfile.ZipFile(path) as z:
            return sum(i.file_size for i in z.infolist())
    if kind == "tar":
        with tarfile.open(path) as t:
            return sum(m.size for m in t.getmembers())
    size = 0
    with _opener(path)(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            size += len(chunk)
    return size


def _extract(path: Path, kind: str, into: Path) -> None:
    if kind == "zip":
        with zipfile.ZipFile(path) as z:
            z.extractall(into)  # member names with .. or a leading / are made safe by zipfile
    elif kind == "tar":
        with tarfile.open(path) as t:
            if hasattr(tarfile, "data_filter"):
                t.extractall(into, filter="data")  # no links out, no devices, no absolute paths
            else:  # Python < 3.11.4: regular files and folders only, names kept inside `into`
                safe = [m for m in t.getmembers() if (m.isfile() or m.isdir()) and not m.name.startswith("/")
                        and ".." not in Path(m.name).parts]
                t.extractall(into, members=safe)
    else:
        name = Path(path).name
        stem = name.rsplit(".", 1)[0] if "." in name else name + ".unpacked"
        with _opener(path)(path, "rb") as src, open(into / stem, "wb") as dst:
            shutil.copyfileobj(src, dst)


class Unpacker(contextlib.AbstractContextManager):
    """A private temporary folder that archives are unpacked into; removed on exit."""

    def __init__(self):
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.count = 0

    def __exit__(self, *exc):
        if self._tmp is not None:
            self._tmp.cleanup()
        return False

    def unpack(self, path: Path, kind: str, depth: int = 1) -> Path:
        """Unpack the archive at `path` (of `archive_kind` `kind`); the folder holding its files.

        Raises ValueError with why it cannot be read (the caller reports it; a patient may be inside).
        """
        if kind not in ("zip", "tar", "compressed"):
            raise ValueError(f"{kind}, which flaxdose cannot unpack: unpack it (or export the patient as a zip "
                             "or folder) and import again")
        if depth > MAX_DEPTH:
            raise ValueError(f"an archive nested more than {MAX_DEPTH} deep: unpack it and import again")
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="flaxdose-unpacked-")
        self.count += 1
        into = Path(self._tmp.name) / f"{self.count}" / Path(path).name  # messages show the archive's name
        into.mkdir(parents=True)
        try:
            need, free = _unpacked_size(path, kind), shutil.disk_usage(into).free
            if need > free:
                raise ValueError(f"it unpacks to {need / 1e9:.1f} GB and the temporary folder has {free / 1e9:.1f} "
                                 "GB free: unpack it elsewhere (or set TMPDIR) and import again")
            _extract(path, kind, into)
        except Exception as e:  # noqa: BLE001 - a damaged archive raises anything (zlib.error, encrypted: RuntimeError)
            shutil.rmtree(into, ignore_errors=True)
            why = str(e) if isinstance(e, ValueError) else f"it is damaged or encrypted ({type(e).__name__}: {e})"
            raise ValueError(f"a {kind} archive that could not be unpacked: {why}") from None
        return into
