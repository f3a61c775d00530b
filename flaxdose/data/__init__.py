"""Data: the Case record and datasets, built-in data, importers, and the grain input pipeline."""

from flaxdose.data.case import PROSTATE_STRUCTURES, Case, Dataset, write_dataset

__all__ = ["PROSTATE_STRUCTURES", "Case", "Dataset", "write_dataset"]
