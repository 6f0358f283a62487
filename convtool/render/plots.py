"""PNG pictures: singular values per layer, and the block structure of `T` (spy / density).

matplotlib is optional (`pip install 'torch-convtool[plot]'`); it is imported lazily with the
Agg backend, and :func:`require_matplotlib` refuses before any work when it is missing.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convtool.errors import ConvtoolError
from convtool.matrices import coo_entries, matrix_shape
from convtool.spec import ConvSpec

MISSING = "plotting needs matplotlib: pip install 'torch-convtool[plot]'"
SPY_PIXELS = 600  # up to this many rows/cols each entry is one pixel; beyond, a density image


def require_matplotlib() -> Any:
    """`matplotlib.pyplot` on the Agg backend, or a ConvtoolError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConvtoolError(MISSING) from None
    return plt


def plot_spectra(path: Path, layers: Sequence[tuple[str, Any]], title: str = "") -> None:
    """Singular values of each layer, descending, against their rank (log scale).

    Args:
        path: the PNG to write.
        layers: `(name, Spectrum)` pairs; all values are drawn when the method computed them,
            else the `k` computed ones as markers, and a bound as a dashed line.
    """
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for name, spec in layers:
        if spec.all_values is not None:
            vals = np.maximum(spec.all_values, 1e-300)
            ax.plot(np.arange(1, len(vals) + 1), vals, lw=1.5, label=f"{name} ({spec.method})")
        elif not spec.exact:
            ax.axhline(spec.values[0], ls="--", lw=1, label=f"{name}: bound on sigma_max")
        else:
            start = 1 if spec.which == "largest" else spec.count - len(spec.values) + 1
            ranks = np.arange(start, start + len(spec.values))
            ax.plot(ranks, spec.values, "o", ms=4, label=f"{name} ({spec.method})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rank i")
    ax.set_ylabel("singular value sigma_i")
    ax.set_title(title or "Singular values of each conv layer's matrix T")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _density(
    spec: ConvSpec, weight: torch.Tensor, shape: Sequence[int], bins: tuple[int, int]
) -> np.ndarray:
    """Non-zeros per image cell, streamed one output-channel block at a time from the index
    arrays (the matrix itself is never built)."""
    rows, cols = matrix_shape(spec, shape)
    out = np.zeros(bins[0] * bins[1], dtype=np.float64)
    fwd_out = spec.in_channels if spec.transposed else spec.out_channels
    step = max(1, fwd_out // 16)
    for c0 in range(0, fwd_out, step):
        r, c, _ = coo_entries(spec, weight, shape, slice(c0, min(fwd_out, c0 + step)))
        if spec.transposed:
            r, c = c, r
        key = (r * bins[0] // rows) * bins[1] + (c * bins[1] // cols)
        out += np.bincount(key.numpy(), minlength=out.size)
    return out.reshape(bins)


def plot_matrix(
    path: Path,
    spec: ConvSpec,
    weight: torch.Tensor,
    shape: Sequence[int],
    title: str = "",
) -> str:
    """A picture of `T`: its entries (signed colours) when small, else a density image.

    Channel blocks are outlined (rows: output channels, columns: input channels), so groups
    (block-diagonal), padding modes (wrapped or folded taps at block edges), stride and dilation
    show. Returns 'entries' or 'density', what was drawn.
    """
    plt = require_matplotlib()
    rows, cols = matrix_shape(spec, shape)
    out_shape = spec.output_shape(shape)
    p_out, p_in = math.prod(out_shape[1:]), math.prod(shape[1:])
    fig, ax = plt.subplots(figsize=(6.4, 6.4 * min(1.5, max(0.6, rows / cols))), dpi=100)
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    if rows <= SPY_PIXELS and cols <= SPY_PIXELS:
        kind = "entries"
        img = np.full((rows, cols), np.nan)
        r, c, v = coo_entries(spec, w, shape)
        if spec.transposed:
            r, c = c, r
        img[r.numpy(), c.numpy()] = v.numpy()
        lim = float(np.nanmax(np.abs(img))) if np.isfinite(img).any() else 1.0
        cmap = plt.get_cmap("RdBu_r").with_extremes(bad="white")
        im = ax.imshow(img, cmap=cmap, vmin=-lim, vmax=lim, interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.7, label="entry of T")
    else:
        kind = "density"
        bins = (min(rows, SPY_PIXELS), min(cols, SPY_PIXELS))
        dens = _density(spec, w, shape, bins)
        cell = (rows / bins[0]) * (cols / bins[1])
        img = np.where(dens > 0, dens / cell, np.nan)
        cmap = plt.get_cmap("viridis").with_extremes(bad="white")
        im = ax.imshow(
            img,
            cmap=cmap,
            extent=(0, cols, rows, 0),
            interpolation="nearest",
            norm=plt.matplotlib.colors.LogNorm(),
        )
        ax.set_aspect("auto")
        fig.colorbar(im, ax=ax, shrink=0.7, label="fraction of non-zeros per cell")
    # channel block boundaries, when they are few enough to see
    offset = 0.0 if kind == "density" else -0.5  # pixel centres sit on integers
    if spec.out_channels <= 64:
        for i in range(1, spec.out_channels):
            ax.axhline(i * p_out + offset, color="0.6", lw=0.5)
    if spec.in_channels <= 64:
        for j in range(1, spec.in_channels):
            ax.axvline(j * p_in + offset, color="0.6", lw=0.5)
    ax.set_xlabel(f"column: (c_in, position), {spec.in_channels} x {p_in}")
    ax.set_ylabel(f"row: (c_out, position), {spec.out_channels} x {p_out}")
    ax.set_title(textwrap.fill(title or f"T: {rows} x {cols}", 70), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return kind
