"""Adapt the source model to the `internal_c` planning style (paper recipe; pass --source=SOURCE_WORKDIR)."""

from configs._transfer import target_config


def get_config():
    return target_config("internal_c")
