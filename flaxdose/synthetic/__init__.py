"""Synthetic prostate VMAT plans: seeded anatomy, a VMAT-like dose optimizer, the paper's five planning styles."""
