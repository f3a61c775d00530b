"""flaxdose: 3D UNet dose prediction for prostate VMAT, with transfer learning across planning styles."""

from flaxdose.errors import FlaxdoseError

__version__ = "0.1.0"
__all__ = ["FlaxdoseError", "__version__"]
