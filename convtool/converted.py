"""Reloading a converted model written by `convtool convert` (.pt / .safetensors state_dict).

The file is read by :mod:`convtool.io.model_files`; the model is rebuilt by
:func:`convtool.models.rebuild_converted`. This module is the only place the two meet.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from convtool.io.model_files import read_converted
from convtool.models import rebuild_converted

__all__ = ["load_converted"]


def load_converted(model: nn.Module, path: str | Path) -> nn.Module:
    """Rebuild a converted model saved as a state_dict (.pt / .safetensors by `convtool convert`).

    `model` is the *original* architecture (its weights do not matter); each call listed in the
    file's metadata gets its LC/FC form at the recorded input shape and spec (nothing is run),
    then the converted weights are loaded strictly. `model` itself is left untouched.

    Example::

        model = load_converted(make_model(), "digits_lc.safetensors")
    """
    state, meta = read_converted(Path(path))
    return rebuild_converted(model, state, meta, path)
