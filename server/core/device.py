"""Which torch device a setting names: one rule for the server's selection pass and the lab's offline runs."""

from __future__ import annotations

import torch


def resolve_device(setting: str, what: str = "device") -> str:
    """`auto` is the GPU when torch sees one, else the CPU; an explicit device torch cannot use is refused now,
    naming the setting `what`, rather than failing later on the first tensor moved there."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=setting)
    except (RuntimeError, AssertionError) as error:
        raise ValueError(f"{what} {setting!r} is not usable here: {error}") from error
    return setting
