"""The NNet text format (the ACAS Xu networks; read by Reluplex, Marabou, NNV, nnenum ...).

Line by line, every value line ending with a comma:

1. header lines starting with ``//``;
2. ``numLayers,inputSize,outputSize,maxLayerSize,`` (numLayers counts weight matrices);
3. the layer sizes, input size first, then each layer's output size;
4. a flag no reader uses (``0,``);
5. / 6. the minimum / maximum of every input (readers clip inputs to them);
7. / 8. the mean / range of every input, then one mean / range for all outputs (readers
   compute ``(x - mean) / range`` and ``y * range + mean``);
9. per layer: the weight matrix row by row (one line per output), then the bias, one value a
   line.

All layers but the last are followed by a ReLU; the last is not.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from convtool.errors import ConvtoolError

_F32_MAX = float(np.finfo(np.float32).max)


def _line(values: Sequence[float] | np.ndarray) -> str:
    # %.9g round-trips float32 exactly; %.17g would for float64 but doubles the file.
    return ",".join(f"{float(v):.9g}" for v in values) + ",\n"


def nnet_bytes(sizes: Sequence[int]) -> int:
    """About how many bytes a .nnet file with these layer sizes takes (16 a value)."""
    values = sum(o * (i + 1) for i, o in itertools.pairwise(sizes))
    return 16 * (values + 4 * sizes[0])


def write_nnet(
    path: Path,
    weights: Sequence[np.ndarray],
    biases: Sequence[np.ndarray],
    *,
    input_min: float | Sequence[float] | None = None,
    input_max: float | Sequence[float] | None = None,
    header: Sequence[str] = (),
) -> None:
    """Write dense layers `(out, in)` and biases `(out,)` as an NNet file.

    Inputs are not normalised (means 0, ranges 1, also for the outputs). Input bounds default to
    the float32 range, as onnx2nnet writes them: set them to the real domain before verifying.
    """
    if not weights or len(weights) != len(biases):
        raise ConvtoolError("an NNet file needs one weight matrix and one bias per layer")
    sizes = [int(weights[0].shape[1])]
    for w, b in zip(weights, biases, strict=True):
        if w.ndim != 2 or w.shape[1] != sizes[-1] or b.shape != (w.shape[0],):
            raise ConvtoolError(
                f"NNet layers must chain: got a {w.shape} matrix after size "
                f"{sizes[-1]} with bias {b.shape}"
            )
        sizes.append(int(w.shape[0]))
    n_in = sizes[0]
    lo = np.broadcast_to(np.asarray(-_F32_MAX if input_min is None else input_min, float), n_in)
    hi = np.broadcast_to(np.asarray(_F32_MAX if input_max is None else input_max, float), n_in)
    with open(path, "w", encoding="ascii") as f:
        for text in header:
            f.write(f"// {text}\n")
        f.write(f"{len(weights)},{n_in},{sizes[-1]},{max(sizes)},\n")
        f.write(",".join(str(s) for s in sizes) + ",\n")
        f.write("0,\n")
        f.write(_line(lo))
        f.write(_line(hi))
        f.write(_line(np.zeros(n_in + 1)))
        f.write(_line(np.ones(n_in + 1)))
        for w, b in zip(weights, biases, strict=True):
            for row in np.asarray(w):
                f.write(_line(row))
            for v in np.asarray(b):
                f.write(f"{float(v):.9g},\n")
