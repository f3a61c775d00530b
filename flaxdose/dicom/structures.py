"""Structure-name aliases: map the ROI names of a clinical RTSTRUCT onto the model's structures.

Names are compared after normalization: Unicode NFKC (macOS writes "ü" as "u" + U+0308, most
planning systems as one character; full-width letters and ligatures fold too), case-folded,
without invisible format characters (U+200B), with spaces, underscores, hyphens and dots
removed, so ``"Femur Head L"``, ``"femur_head_l"`` and ``"FEMUR-HEAD-L"`` are one name.

Matching one canonical structure against the ROIs of a structure set, in order:
1. user aliases (from ``--aliases FILE``), exact normalized names;
2. built-in aliases (TG-263 names plus common variants), exact normalized names;
3. built-in prefixes (``PTV...``: any ROI whose name starts with "PTV", except helper
   structures such as rings or optimization volumes);
4. for the body only: the one ROI whose RTROIInterpretedType is EXTERNAL.
The first rule that finds exactly one ROI wins; a rule that finds several is an ambiguity
and raises a `FlaxdoseError` naming them. A structure that no rule finds is an error too.
Every error lists the ROI names found and how to map them.

The user file is JSON: ``{"Bladder": ["Blase", "BL_ohne_PTV"], "PTV": ["PTV_7920"]}`` maps
each canonical name to extra ROI names (user aliases are tried before the built-in ones).
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from flaxdose.errors import FlaxdoseError


def normalize(name: str) -> str:
    """Unicode-form-, case-, space- and separator-insensitive form of an ROI name (NFKC: NFC, and
    full-width letters and ligatures folded; invisible format characters such as U+200B dropped)."""
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", str(name)).casefold())
    visible = "".join(ch for ch in folded if unicodedata.category(ch) != "Cf")
    return re.sub(r"[\s_\-.]+", "", visible)


def _femur(side_words: Sequence[str]) -> list[str]:
    bases = ("femurhead", "femoralhead", "femur", "headoffemur", "hip", "femheads", "femhead", "fh")
    out = []
    for base in bases:
        for side in side_words:
            out += [base + side, side + base]
    return out


# Canonical name -> normalized built-in aliases (TG-263 first, then common variants).
BUILTIN_ALIASES: dict[str, tuple[str, ...]] = {
    "PTV": ("ptv", "ptvprostate", "ptvp", "ptvhigh", "ptv1"),
    "Bladder": ("bladder", "urinarybladder", "blase", "vessie", "vejiga", "bladderwhole", "blad", "bladdero"),
    "Rectum": ("rectum", "rect", "rectal", "rectumo", "rektum", "rectumwhole"),
    "Femur_Head_L": tuple(normalize(n) for n in _femur(("l", "lt", "left", "links", "gauche"))),
    "Femur_Head_R": tuple(normalize(n) for n in _femur(("r", "rt", "right", "rechts", "droite"))),
    "Body": ("body", "external", "skin", "outline", "patient", "bodycontour", "externalcontour", "aussenkontur"),
}
# Canonical name -> normalized name prefixes, tried after the exact aliases.
BUILTIN_PREFIXES: dict[str, tuple[str, ...]] = {"PTV": ("ptv",)}
# A prefix match containing one of these words is a helper structure, not the target.
_HELPER_WORDS = ("ring", "opt", "shell", "avoid", "minus", "exp", "crop", "eval", "margin", "nos", "dose", "sub")
# The structure found through RTROIInterpretedType when no name matches.
INTERPRETED_TYPES: dict[str, str] = {"Body": "EXTERNAL"}


@dataclass(frozen=True)
class Roi:
    """One ROI of a structure set: its number, name, RTROIInterpretedType and the frame of
    reference its contours are on (ReferencedFrameOfReferenceUID); the last two may be ''."""

    number: int
    name: str
    interpreted_type: str = ""
    for_uid: str = ""


def is_body(structure: str, roi: Roi | None = None) -> bool:
    """Whether `structure` is the patient's outline: a built-in body name, or an ROI of type EXTERNAL."""
    names = {normalize(n) for n in ("Body", *BUILTIN_ALIASES["Body"])}
    return normalize(structure) in names or (roi is not None and roi.interpreted_type.upper() == "EXTERNAL")


class AliasTable:
    """Canonical structure name -> accepted ROI names (built-in plus user additions)."""

    def __init__(self, user: Mapping[str, Iterable[str]] | None = None, source: str = ""):
        self.user = {str(k): tuple(normalize(n) for n in v) for k, v in (user or {}).items()}
        self.source = source

    @classmethod
    def from_file(cls, path: str | os.PathLike | None) -> AliasTable:
        """Built-in aliases extended by a JSON file ``{"Canonical": ["alias", ...], ...}``."""
        if path is None:
            return cls()
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FlaxdoseError(f"alias file {path} does not exist; check the --aliases path") from None
        except (OSError, ValueError) as e:
            raise FlaxdoseError(
                f"cannot read alias file {path} ({e}); it must be JSON like "
                '{"Bladder": ["Blase"], "PTV": ["PTV_7920"]}'
            ) from None
        if not isinstance(data, dict) or not all(
            isinstance(v, list) and all(isinstance(s, str) for s in v) for v in data.values()
        ):
            raise FlaxdoseError(
                f"alias file {path} must map each structure name to a list of ROI names, e.g. "
                '{"Bladder": ["Blase"], "PTV": ["PTV_7920"]}'
            )
        return cls(data, source=str(path))

    def match(self, structures: Sequence[str], rois: Sequence[Roi]) -> dict[str, Roi]:
        """Find the ROI of every structure; raises `FlaxdoseError` on a missing or ambiguous one."""
        found: dict[str, Roi] = {}
        problems = []
        for structure in structures:
            try:
                found[structure] = self._match_one(structure, rois)
            except _NoMatch as e:
                problems.append(str(e))
        used: dict[int, list[str]] = {}
        for structure, roi in found.items():
            used.setdefault(roi.number, []).append(structure)
        for number, names in used.items():
            if len(names) > 1:
                problems.append(f"ROI {found[names[0]].name!r} matches several structures {names}")
        if problems:
            raise FlaxdoseError(self._explain(problems, rois))
        return found

    def _match_one(self, structure: str, rois: Sequence[Roi]) -> Roi:
        key = normalize(structure)
        rules = [
            ("user alias", set(self.user.get(structure, ())), None),
            ("name", {key, *BUILTIN_ALIASES.get(structure, ())}, None),
            ("name prefix", None, BUILTIN_PREFIXES.get(structure, ())),
        ]
        for rule, names, prefixes in rules:
            if names is not None:
                hits = [r for r in rois if normalize(r.name) in names]
            elif prefixes:
                hits = [
                    r for r in rois
                    if normalize(r.name).startswith(prefixes)
                    and not any(w in normalize(r.name)[3:] for w in _HELPER_WORDS)
                ]
            else:
                hits = []
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise _NoMatch(f"{structure}: several ROIs match by {rule}: {[r.name for r in hits]}")
        interpreted = INTERPRETED_TYPES.get(structure)
        if interpreted:
            hits = [r for r in rois if r.interpreted_type.upper() == interpreted]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise _NoMatch(
                    f"{structure}: several ROIs are of type {interpreted}: {[r.name for r in hits]}"
                )
        raise _NoMatch(f"{structure}: no ROI matches")

    def _explain(self, problems: Sequence[str], rois: Sequence[Roi]) -> str:
        names = [r.name for r in rois]
        example = {p.split(":")[0]: ["<ROI name in your export>"] for p in problems if ":" in p}
        return (
            "cannot map the structure set's ROIs onto the model's structures: "
            + "; ".join(problems)
            + f". ROIs found: {names}. Fix: name the ROI for each structure in a JSON alias file, "
            f"e.g. {json.dumps(example)}, and pass it with --aliases FILE "
            "(or aliases=AliasTable.from_file(FILE))"
        )


class _NoMatch(Exception):
    pass
