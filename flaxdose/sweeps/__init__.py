"""Sweeps: many small trainings as one job (`runner`) and their learning-curve report (`report`)."""
