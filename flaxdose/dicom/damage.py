"""Which DICOM files are damaged and why, and which plan a damaged file stops: one rule for every reader.

pydicom reads a file cut short without complaint: a sequence cut at the end of the file just
ends (an RTSTRUCT then loses its last ROIs' contours and observations, and its structures
look misnamed), and a value cut short (a CT slice's PixelData) is read as the bytes that are
there. `file_damage` finds such files cheaply, without decoding pixel data:

- the Type 1 UIDs of a CT, RTSTRUCT, RTDOSE, RTPLAN (SOPInstanceUID, StudyInstanceUID,
  SeriesInstanceUID) and the Type 1 sequences an RTSTRUCT cannot be read without
  (StructureSetROISequence, ROIContourSequence; PS3.3 C.8.8.5, C.8.8.6);
- the encoding (PS3.5 section 7): every data element's value, and every sequence and item of
  undefined length up to its delimiter, lies inside the file, and the file ends where its last
  element ends (values of defined length are skipped, never read); a deflated file is walked
  inflated, a big-endian one in its byte order;
- pixel data: a CT holds PixelData, an RTDOSE whose header describes an image (Rows) holds
  it, and native (uncompressed) PixelData holds at least Rows x Columns x SamplesPerPixel x
  NumberOfFrames x BitsAllocated / 8 bytes.

`plan_damage` is the rule that turns damaged files into a refused plan: `import_dicom` applies
it to the folders of each plan's files, `read_rt` (and `write_rtdose` to its reference CT) to
every path it was given.
"""

from __future__ import annotations

import mmap
import struct
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}  # PS3.5 7.1.2
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
PIXEL_DATA = 0x7FE00010
OTHER_PIXEL_DATA = (0x7FE00008, 0x7FE00009)  # Float / Double Float Pixel Data
RTSTRUCT_SEQUENCES = ("StructureSetROISequence", "ROIContourSequence")  # without them nothing can be read
FIX = "re-export it from the planning system, or move it out of the export"


class _Cut(Exception):
    """The encoding stops before the structure it started is complete."""


class _Walk:
    """A walk over the data elements of an encoded dataset (PS3.5 7.1, 7.5), bounds-checked."""

    def __init__(self, buf, implicit: bool, little: bool):
        self.buf, self.size = buf, len(buf)
        self.implicit, self.little = implicit, little
        self.pixel_length: int | None = None  # the top-level PixelData's length (UNDEFINED: encapsulated)

    def need(self, end: int, what: str) -> None:
        if end > self.size:
            raise _Cut(f"{what} ends at byte {end}, after the end of the file ({self.size} bytes)")

    def tag(self, pos: int, little: bool) -> int:
        self.need(pos + 8, "a data element header")
        group, element = struct.unpack_from("<HH" if little else ">HH", self.buf, pos)
        return group << 16 | element

    def element(self, pos: int, implicit: bool, little: bool, top: bool = False) -> int:
        """The position after the data element at `pos`."""
        end = "<" if little else ">"
        tag = self.tag(pos, little)
        vr = None
        if implicit or tag >> 16 == 0xFFFE:
            length, pos = struct.unpack_from(end + "L", self.buf, pos + 4)[0], pos + 8
        else:
            vr = bytes(self.buf[pos + 4:pos + 6])
            if vr in _LONG_VRS:
                self.need(pos + 12, "a data element header")
                length, pos = struct.unpack_from(end + "L", self.buf, pos + 8)[0], pos + 12
            else:
                length, pos = struct.unpack_from(end + "H", self.buf, pos + 6)[0], pos + 8
        if top and tag == PIXEL_DATA:
            self.pixel_length = length
        if tag in (ITEM, ITEM_END, SEQUENCE_END):
            raise _Cut(f"an item or delimiter tag at byte {pos - 8} outside a sequence")
        if length != UNDEFINED:
            self.need(pos + length, f"the value of ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            return pos + length
        if vr == b"UN":  # an undefined-length UN holds implicit VR little endian items (PS3.5 6.2.2)
            implicit, little = True, True
        return self.items(pos, implicit, little)  # a sequence, or encapsulated pixel data

    def items(self, pos: int, implicit: bool, little: bool) -> int:
        """Items up to the sequence delimiter; the position after it."""
        while True:
            tag = self.tag(pos, little)
            if tag == SEQUENCE_END:
                return pos + 8
            if tag != ITEM:
                raise _Cut(f"a sequence item expected at byte {pos}")
            length, pos = struct.unpack_from("<L" if little else ">L", self.buf, pos + 4)[0], pos + 8
            if length != UNDEFINED:
                self.need(pos + length, "a sequence item")
                pos += length
            else:
                pos = self.dataset(pos, implicit, little)

    def found_implicit(self, pos: int, implicit: bool) -> bool:
        """Whether the dataset at `pos` is implicit VR, pydicom's test: its first VR is not two letters.

        An item may be implicit inside an explicit dataset (PS3.5 6.2.2), a top-level dataset
        either way (a file whose transfer syntax misstates it, as pydicom reads it).
        """
        if self.size - pos < 6:
            return implicit
        return not (0x40 < self.buf[pos + 4] < 0x5B and 0x40 < self.buf[pos + 5] < 0x5B)

    def dataset(self, pos: int, implicit: bool, little: bool) -> int:
        """Elements of an item of undefined length up to its delimiter; the position after it."""
        implicit = implicit or self.found_implicit(pos, implicit)
        while self.tag(pos, little) != ITEM_END:
            pos = self.element(pos, implicit, little)
        return pos + 8

    def file(self) -> None:
        """The whole file: File Meta (explicit VR little endian, PS3.10 7.1), then the dataset to its end."""
        pos = _meta_end(self.buf)
        implicit = self.found_implicit(pos, self.implicit)
        while pos < self.size:
            if self.size - pos < 8 and not any(self.buf[pos:]):
                return  # a few zero bytes of padding after the last element
            pos = self.element(pos, implicit, self.little, top=True)


def _meta_end(buf) -> int:
    """The position after the File Meta group (explicit VR little endian, PS3.10 7.1)."""
    walk = _Walk(buf, implicit=False, little=True)
    pos = 132 if buf[128:132] == b"DICM" else 0
    while walk.size - pos >= 8 and struct.unpack_from("<H", buf, pos)[0] == 2:
        pos = walk.element(pos, implicit=False, little=True)
    return pos


def _inflated(path: Path) -> bytes:
    """A deflated file (PS3.5 A.5) as it reads once inflated: its File Meta, then the raw-deflated dataset."""
    raw = Path(path).read_bytes()
    start = _meta_end(raw)
    inflate = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        body = inflate.decompress(raw[start:]) + inflate.flush()
    except zlib.error as e:
        raise _Cut(f"its deflated dataset does not inflate ({e})") from None
    if not inflate.eof:
        raise _Cut("its deflated dataset ends before the end of its compressed stream")
    return raw[:start] + body


def _walk_file(path: Path, implicit: bool, little: bool, deflated: bool) -> int | None:
    """Walk the encoding (inflated first when deflated); the top-level PixelData length (None if absent)."""
    if deflated:
        walk = _Walk(_inflated(path), implicit, little)
        walk.file()
        return walk.pixel_length
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        walk = _Walk(buf, implicit, little)
        walk.file()
        return walk.pixel_length


NOT_WALKED = -1  # `_encoding_cut`'s pixel length when the encoding could not be walked


def _encoding_cut(path: Path, ds) -> tuple[str | None, int | None]:
    """(why the encoding is cut or broken, or None; the top-level PixelData's length: None if absent,
    NOT_WALKED for an encoding this walk does not know, whose pixel data it cannot judge).

    Every transfer syntax pydicom reads is walked: implicit and explicit VR, little and big
    endian, encapsulated pixel data, and deflated files once inflated (their compressed bytes
    are no DICOM encoding).
    """
    try:
        syntax = ds.file_meta.TransferSyntaxUID
        if not syntax.is_transfer_syntax:
            return None, NOT_WALKED  # an unknown encoding: pydicom's reading is all we have
        implicit, little, deflated = syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated
    except (AttributeError, ValueError):
        return None, NOT_WALKED
    if Path(path).stat().st_size == 0:
        return "the file is empty", None
    try:
        return None, _walk_file(Path(path), implicit, little, deflated)
    except _Cut as e:
        return f"cut short or damaged: {e}", None
    except (struct.error, RecursionError):
        return "its encoding is damaged", None


def _pixel_bytes(ds) -> int | None:
    """Rows x Columns x SamplesPerPixel x NumberOfFrames x BitsAllocated / 8 (native encoding); None if unknown."""
    try:
        values = [int(ds.get(k, default) or default) for k, default in
                  (("Rows", 0), ("Columns", 0), ("SamplesPerPixel", 1), ("NumberOfFrames", 1), ("BitsAllocated", 0))]
    except (TypeError, ValueError):
        return None
    rows, cols, samples, frames, bits = values
    if min(rows, cols, samples, frames, bits) <= 0 or str(ds.get("PhotometricInterpretation", "")) == "YBR_FULL_422":
        return None
    return (rows * cols * samples * frames * bits + 7) // 8


def _article(kind: str) -> str:
    return "an" if kind.startswith("RT") else "a"


def file_damage(path: str | Path, ds, kind: str) -> str | None:
    """Why the DICOM file at `path` (header `ds`, read without pixel data) is damaged, or None.

    `kind` is "CT", "RTSTRUCT", "RTDOSE" or "RTPLAN" (other files: None, they are not read).
    The message names the file and the fix. Reads the file's element headers (values of
    defined length are skipped; pixel data is never decoded).
    """
    if kind not in ("CT", "RTSTRUCT", "RTDOSE", "RTPLAN"):
        return None
    missing = [k for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if not str(ds.get(k, "")).strip()]
    if kind == "RTSTRUCT":
        missing += [k for k in RTSTRUCT_SEQUENCES if k not in ds]
    if missing:
        return (f"{path}: {_article(kind)} {kind} file without {', '.join(missing)} (required by DICOM PS3.3): "
                f"cut short or damaged; {FIX}")
    why, pixel_length = _encoding_cut(Path(path), ds)
    if why is None and kind in ("CT", "RTDOSE"):
        if pixel_length is None:
            if (kind == "CT" or "Rows" in ds) and not any(t in ds for t in OTHER_PIXEL_DATA):
                why = "its header describes an image but the file holds no PixelData (cut short)"
        elif pixel_length not in (UNDEFINED, NOT_WALKED):
            expected = _pixel_bytes(ds)
            if expected is not None and pixel_length < expected:
                why = (f"PixelData holds {pixel_length} bytes, Rows x Columns x SamplesPerPixel x NumberOfFrames "
                       f"x BitsAllocated/8 = {expected}")
    return None if why is None else f"{path}: a damaged {kind} file ({why}); {FIX}"


def damaged_among(damaged: Sequence[tuple[str, str]], files: Iterable | None = None) -> list[tuple[str, str]]:
    """The damaged files (path, why) that concern `files` (objects with `.path`): those in their folders.

    `files=None`: every damaged file (a reader given one plan's paths).
    """
    if files is None:
        return list(damaged)
    folders = {Path(f.path).parent for f in files if f is not None}
    return [(p, why) for p, why in damaged if Path(p).parent in folders]


def plan_damage(damaged: Sequence[tuple[str, str]], files: Iterable | None = None,
                where: str = "beside the plan") -> str | None:
    """The problem that stops a plan (or a patient) because of damaged files, or None.

    `damaged`: (path, why) of `flaxdose.dicom.files.scan`; `files`: the plan's (or patient's)
    files: the damaged files in their folders count (None: all of `damaged`). A damaged
    RTSTRUCT, RTPLAN or CT slice would otherwise go unnoticed or be misdiagnosed (a structure
    set cut short reads as ROIs without their names' types, a cut CT as a missing slice).
    `where` says where they lie, for the message.
    """
    here = damaged_among(damaged, files)
    if not here:
        return None
    names = [Path(p).name for p, _ in here]
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return f"damaged DICOM file(s) {where}: {', '.join(names[:5])}{more} ({here[0][1]})"
