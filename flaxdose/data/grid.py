"""The one voxel grid of flaxdose, and the model's grid (the paper's).

A `Grid` is axis-aligned in the DICOM patient system (LPS) and indexed [x, y, z] like every
saved volume (see `flaxdose.data.case`): x runs right->left, y anterior->posterior, z
inferior->superior. `origin_mm` is the patient coordinate of the centre of voxel [0, 0, 0].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# The paper's input grid, 120 x 120 x 64 voxels, and our voxel size for it: 480 x 480 x 192 mm
# holds a large male pelvis with the whole femoral heads and 6-10 cm above and below the PTV.
MODEL_SHAPE = (120, 120, 64)
MODEL_SPACING_MM = (4.0, 4.0, 3.0)


@dataclasses.dataclass(frozen=True)
class Grid:
    """An axis-aligned LPS voxel grid.

    origin_mm: (x, y, z) mm, the centre of voxel [0, 0, 0]; spacing_mm: (x, y, z) voxel size
    in mm (positive); shape: (X, Y, Z) voxels. Fields are stored as tuples of float / int, so
    two grids compare equal when their numbers do.
    """

    origin_mm: tuple[float, float, float]
    spacing_mm: tuple[float, float, float]
    shape: tuple[int, int, int]

    def __post_init__(self):
        object.__setattr__(self, "origin_mm", tuple(float(v) for v in self.origin_mm))
        object.__setattr__(self, "spacing_mm", tuple(float(v) for v in self.spacing_mm))
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))

    @classmethod
    def centred(cls, shape: Sequence[int], spacing_mm: Sequence[float],
                centre_mm: Sequence[float] = (0.0, 0.0, 0.0)) -> Grid:
        """The grid of `shape` x `spacing_mm` whose centre (middle of the voxel block) is `centre_mm`."""
        origin = tuple(float(c) - (int(n) - 1) / 2 * float(d) for c, n, d in zip(centre_mm, shape, spacing_mm))
        return cls(origin, tuple(spacing_mm), tuple(shape))

    def coords(self, axis: int) -> np.ndarray:
        """float64 (shape[axis],): patient coordinate (mm) of the voxel centres along `axis` (0=x, 1=y, 2=z)."""
        return self.origin_mm[axis] + self.spacing_mm[axis] * np.arange(self.shape[axis], dtype=np.float64)

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The three coordinate arrays (x, y, z) of the voxel centres, float32 mm."""
        return tuple(self.coords(a).astype(np.float32) for a in range(3))

    def as_dict(self) -> dict:
        """JSON-ready {"origin_mm", "spacing_mm", "shape"} (origin rounded to 0.1 um)."""
        return {
            "origin_mm": [round(float(v), 4) for v in self.origin_mm],
            "spacing_mm": [round(float(v), 6) for v in self.spacing_mm],
            "shape": [int(v) for v in self.shape],
        }
