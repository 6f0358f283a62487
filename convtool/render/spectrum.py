"""`convtool spectrum` output: a per-layer table and the Lipschitz bound, or JSON."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from convtool.operators import LIPSCHITZ_NOTE, LayerSpectrum, SpectrumReport
from convtool.render.common import emit_json, name_width, stdout


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if x == float("inf"):
        return "inf"
    return f"{x:.6g}"


def _sigma_max(layer: LayerSpectrum) -> str:
    top = layer.largest
    if not top.exact:
        return f"<= {_num(top.upper_bound)}"
    return _num(layer.sigma_max)


def _seconds(s: float) -> str:
    return f"{s:.2f} s" if s >= 0.01 else f"{s * 1000:.1f} ms"


def spectrum_table(report: SpectrumReport, smallest: bool) -> Table:
    """One row per layer: sigma_max, sigma_min and condition number (when known), method, time."""
    table = Table(title="Singular values of each conv layer's matrix T", title_justify="left")
    names = [layer.name for layer in report.layers]
    table.add_column("Layer", overflow="fold", min_width=name_width(names, cap=20))
    table.add_column("Matrix", no_wrap=True)
    table.add_column("sigma_max", justify="right", no_wrap=True)
    if smallest:
        table.add_column("sigma_min", justify="right", no_wrap=True)
        table.add_column("Condition", justify="right", no_wrap=True)
    table.add_column("Method", no_wrap=True)
    table.add_column("Time", justify="right", no_wrap=True)
    for layer in report.layers:
        rows, cols = layer.largest.shape
        cells = [layer.name, f"{rows}x{cols}", _sigma_max(layer)]
        if smallest:
            cells += [_num(layer.sigma_min), _num(layer.condition)]
        cells += [layer.largest.method, _seconds(layer.seconds)]
        table.add_row(*cells)
    return table


def _notes(report: SpectrumReport) -> list[str]:
    lines = list(report.notes)
    for layer in report.layers:
        top = layer.largest
        if not top.exact and top.lower_bound is not None and top.upper_bound is not None:
            lines.append(
                f"{layer.name}: {top.note}; sigma_max is between {_num(top.lower_bound)} and "
                f"{_num(top.upper_bound)} (ratio {top.upper_bound / top.lower_bound:.4f})"
            )
        elif top.method == "svds":
            lines.append(
                f"{layer.name}: Lanczos; each value is within {top.tolerance:.1e} of a singular "
                f"value ({top.matvecs} products)"
            )
    return lines


def render_spectrum(report: SpectrumReport, smallest: bool, console: Console | None = None) -> None:
    """Print the table, the model-level bound and the notes (`console`: default stdout)."""
    out = console or stdout()
    out.print(spectrum_table(report, smallest))
    bound = report.lipschitz_bound
    if bound is not None and len(report.layers) > 1:
        out.print(Text(f"Lipschitz upper bound (product of the layers' norms): {_num(bound)}"))
        out.print(Text(f"  ({LIPSCHITZ_NOTE})"))
    elif bound is not None:
        out.print(Text(f"Lipschitz constant of the layer (its sigma_max): {_num(bound)} (bound)"))
    notes = _notes(report)
    if notes:
        out.print(Text("Notes:"))
        for line in notes:
            out.print(Text(f"  - {line}"))


def spectrum_json(report: SpectrumReport, source: str) -> None:
    payload: dict[str, Any] = {"source": source, **report.to_dict()}
    emit_json(payload)
