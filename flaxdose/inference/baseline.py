"""A non-learned reference dose predictor: each voxel's dose from its distance to the nearest target.

The yardstick a network must beat: fitted on the training cases in seconds, no learning,
no anatomy beyond the target contours. For a voxel v and each target k (structures named
PTV...) with dose level D_k (Gy):

    d_k(v)  signed Euclidean distance in mm from v to target k: the distance to the nearest
            voxel of k when v lies outside it, minus the distance to the nearest voxel
            outside k when v lies inside (voxel centres, scipy.ndimage.distance_transform_edt
            with the case's spacing);
    k*(v)   the target of highest D_k that contains v, else the nearest target (ties: the
            higher D_k);
    dose(v) = D_k* * g(d_k*(v))

g is a step function of distance (bins of `bin_mm` mm, distances clipped to
[`min_mm`, `max_mm`]): in each bin, the median of dose / D_k* over every training voxel in
that bin (the median minimizes the mean absolute error, which the OpenKBP dose score
measures). Empty bins take the value of the nearest filled bin. Only voxels where dose is
scored take part: the possible-dose mask when a case has one, else the Body, else all.

D_k defaults to each case's prescription for every target; pass `target_doses` (e.g. the
OpenKBP levels PTV56 -> 56 Gy, PTV63 -> 63 Gy, PTV70 -> 70 Gy) for plans with several
dose levels. `predict(cases) -> cases` matches `flaxdose.inference.Model`, so one scoring
code path scores both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from flaxdose.data.case import Case
from flaxdose.data.pipeline import signed_distance_mm
from flaxdose.errors import FlaxdoseError
from flaxdose.io import atomic_write_text


def scored_region(case: Case) -> np.ndarray:
    """Where dose counts: `Case.dose_region` (possible-dose mask, else body), else the whole grid."""
    region = case.dose_region()
    return np.ones(case.shape, bool) if region is None else region


class DistanceBaseline:
    """The distance-to-target reference model; build it with `fit` or `load`."""

    def __init__(self, edges_mm: np.ndarray, relative_dose: np.ndarray,
                 target_doses: Mapping[str, float] | None = None, name: str = "distance-to-target reference"):
        self.edges_mm = np.asarray(edges_mm, np.float64)
        self.relative_dose = np.asarray(relative_dose, np.float64)
        if self.edges_mm.ndim != 1 or self.relative_dose.shape != (self.edges_mm.size - 1,):
            raise FlaxdoseError("a DistanceBaseline needs n + 1 bin edges for n relative doses")
        self.target_doses = dict(target_doses or {})
        self.name = name

    # ------------------------------------------------------------ geometry
    def _nearest_target(self, case: Case) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray]:
        """(box, D_k* in Gy, d_k* in mm): the last two per voxel of the box, which holds the scored
        region and every target with a margin of one voxel (so distances are those of the whole grid)."""
        names = [s for s in case.targets if case.mask(s).any()]
        if not names:
            raise FlaxdoseError(f"case {case.case_id!r} has no non-empty target (PTV...); the reference needs one")
        points = np.argwhere(scored_region(case) | np.any([case.mask(s) for s in names], axis=0))
        box = tuple(slice(max(lo - 1, 0), hi + 2) for lo, hi in zip(points.min(0), points.max(0)))
        levels = np.array([self._dose_level(case, s) for s in names])
        distance = np.stack([signed_distance_mm(case.mask(s)[box], case.spacing_mm) for s in names])
        # inside targets rank first, highest level first; outside, nearest first, ties to the higher level
        rank = np.where(distance < 0, -1e9 - levels[:, None, None, None], distance - 1e-6 * levels[:, None, None, None])
        k = np.argmin(rank, axis=0)
        return box, levels[k], np.take_along_axis(distance, k[None], axis=0)[0]

    def _dose_level(self, case: Case, target: str) -> float:
        level = float(self.target_doses.get(target, case.prescription_gy))
        if not level > 0:
            raise FlaxdoseError(f"case {case.case_id!r}: no dose level for {target}; set prescription_gy or target_doses")
        return level

    def _bins(self, distance: np.ndarray) -> np.ndarray:
        inner = np.clip(distance, self.edges_mm[0], self.edges_mm[-1] - 1e-9)
        return np.searchsorted(self.edges_mm, inner, side="right") - 1

    # ------------------------------------------------------------ fit, predict
    @classmethod
    def fit(cls, cases: Sequence[Case], target_doses: Mapping[str, float] | None = None, bin_mm: float = 2.5,
            min_mm: float = -40.0, max_mm: float = 200.0) -> DistanceBaseline:
        """Fit g on `cases` (each with a dose); raises FlaxdoseError without cases or targets."""
        if not cases:
            raise FlaxdoseError("the distance-to-target reference needs training cases with doses")
        edges = np.arange(min_mm, max_mm + bin_mm / 2, bin_mm)
        model = cls(edges, np.zeros(edges.size - 1), target_doses)
        bins, ratios = [], []
        for case in cases:
            if case.dose is None:
                raise FlaxdoseError(f"case {case.case_id!r} has no dose; fit the reference on planned cases")
            box, level, distance = model._nearest_target(case)
            region = scored_region(case)[box]
            bins.append(model._bins(distance[region]))
            ratios.append(case.dose[box][region] / level[region])
        bins, ratios = np.concatenate(bins), np.concatenate(ratios)
        order = np.argsort(bins, kind="stable")
        bins, ratios = bins[order], ratios[order]
        filled = np.unique(bins)
        starts = np.searchsorted(bins, filled, side="left")
        stops = np.searchsorted(bins, filled, side="right")
        medians = np.array([np.median(ratios[a:b]) for a, b in zip(starts, stops)])
        centres = (edges[:-1] + edges[1:]) / 2
        # empty bins: the value of the nearest filled bin
        nearest = np.abs(centres[:, None] - centres[filled][None, :]).argmin(axis=1)
        model.relative_dose = medians[nearest]
        return model

    def predict_dose(self, case: Case) -> np.ndarray:
        """Predicted dose (Gy, float32 (X, Y, Z)), zero outside the scored region."""
        box, level, distance = self._nearest_target(case)
        dose = np.zeros(case.shape, np.float32)
        dose[box] = np.where(scored_region(case)[box], level * self.relative_dose[self._bins(distance)], 0.0)
        return dose

    def predict(self, cases: Sequence[Case], batch_size: int = 1, progress: bool = False) -> list[Case]:
        """Copies of `cases` whose dose is this reference's prediction (same interface as inference.Model)."""
        del batch_size, progress  # no batches, and it takes well under a second per case
        return [c.replace(dose=self.predict_dose(c), meta={**c.meta, "predicted_by": self.name}) for c in cases]

    # ------------------------------------------------------------ storage
    def to_json(self) -> str:
        return json.dumps({"format": "flaxdose-distance-baseline-v1", "name": self.name,
                           "edges_mm": self.edges_mm.tolist(), "relative_dose": self.relative_dose.tolist(),
                           "target_doses": self.target_doses}, indent=1) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> DistanceBaseline:
        try:
            data = json.loads(Path(path).read_text())
            if data.get("format") != "flaxdose-distance-baseline-v1":
                raise ValueError("not a flaxdose distance baseline")
            return cls(data["edges_mm"], data["relative_dose"], data["target_doses"], data["name"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FlaxdoseError(f"cannot read the distance-to-target reference {path}: {e}") from None
