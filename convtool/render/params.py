"""`convtool count-params` output: rich tables, JSON and CSV of a ParamReport. No counting here.

Four tables: parameters, memory, multiply-adds (one row per layer) and the model totals. Each
fits the console's width by leaving out columns in the orders PARAMS_DROP / TOTALS_DROP, then
wrapping layer names at '.'; numbers are never cut or split from their units.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from convtool.params import LayerCounts, ParamReport, Totals
from convtool.render.common import (
    Col,
    dropped_note,
    emit_json,
    fitted_table,
    human_bytes,
    human_count,
    print_fitted,
    stdout,
)

# At a narrow width, columns go in these orders (README: "Tables at 80 columns").
PARAMS_DROP = ("Type", "Input", "Output", "FC nonzero")
TOTALS_DROP = ("x original",)

MISSING = "-"
NOT_APPLICABLE = "n/a"

# CSV columns: every per-layer JSON field except the nested/derived ones, in a stable order.
CSV_FIELDS = (
    "name",
    "type",
    "spec",
    "dtype",
    "input_shape",
    "output_shape",
    "matrix_shape",
    "bias",
    "conv_params",
    "lc_params",
    "fc_params",
    "fc_nonzero",
    "lc_ratio",
    "fc_ratio",
    "conv_bytes",
    "lc_bytes",
    "fc_dense_bytes",
    "fc_sparse_bytes",
    "conv_macs",
    "lc_macs",
    "fc_dense_macs",
    "fc_sparse_macs",
    "shared_with",
    "tied_to",
    "notes",
)


def _count(n: int | None, *, transposed_lc: bool = False) -> str:
    if n is None:
        return NOT_APPLICABLE if transposed_lc else MISSING
    return human_count(n)


def _bytes(n: int | None, *, transposed_lc: bool = False) -> str:
    if n is None:
        return NOT_APPLICABLE if transposed_lc else MISSING
    return human_bytes(n)


def _ratio(r: float | None) -> str:
    if r is None:
        return ""
    return f"{human_count(round(r))}x" if r >= 1000 else f"{r:.3g}x"


def _with_ratio(n: int | None, r: float | None, *, transposed_lc: bool = False) -> str:
    text = _count(n, transposed_lc=transposed_lc)
    return f"{text} ({_ratio(r)})" if n is not None and r is not None else text


def _shape(shape: Sequence[int] | None) -> str:
    return MISSING if shape is None else "(" + ", ".join(str(s) for s in shape) + ")"


def _no_lc(layer: LayerCounts) -> bool:
    """True when the LC form does not exist (rather than being unknown)."""
    return layer.type.startswith("ConvTranspose")


def _name(layer: LayerCounts) -> str:
    return layer.name + ("*" if layer.shared_with or layer.tied_to else "")


def _layer_col() -> Col:
    return Col("Layer", name=True)


def params_table(report: ParamReport, width: int = 160) -> tuple[Table, list[str]]:
    """Parameters of each listed layer in each form, with the blow-up over the conv."""
    cols = [
        _layer_col(),
        Col("Type"),
        Col("Input"),
        Col("Output"),
        Col("Conv", right=True),
        Col("LC (x conv)", right=True),
        Col("FC dense (x conv)", right=True),
        Col("FC nonzero", right=True),
    ]
    rows = [
        [
            _name(layer),
            layer.type,
            _shape(layer.input_shape),
            _shape(layer.output_shape),
            human_count(layer.conv_params),
            _with_ratio(layer.lc_params, layer.lc_ratio, transposed_lc=_no_lc(layer)),
            _with_ratio(layer.fc_params, layer.fc_ratio),
            _count(layer.fc_nonzero),
        ]
        for layer in report.layers
    ]
    return fitted_table(
        cols, rows, width, PARAMS_DROP, title="Parameters per layer (bias included)"
    )


def memory_table(report: ParamReport, width: int = 160) -> tuple[Table, list[str]]:
    """Memory of each form in the layer's dtype."""
    dtypes = sorted({layer.dtype for layer in report.layers})
    title = f"Memory ({', '.join(dtypes)}; sparse = CSR, int64 indices)"
    cols = [_layer_col()] + [Col(h, right=True) for h in ("Conv", "LC", "FC dense", "FC sparse")]
    rows = [
        [
            _name(layer),
            human_bytes(layer.conv_bytes),
            _bytes(layer.lc_bytes, transposed_lc=_no_lc(layer)),
            _bytes(layer.fc_dense_bytes),
            _bytes(layer.fc_sparse_bytes),
        ]
        for layer in report.layers
    ]
    return fitted_table(cols, rows, width, title=title)


def macs_table(report: ParamReport, width: int = 160) -> tuple[Table, list[str]]:
    """Multiply-adds per sample of each form (the LC form does as many as the conv)."""
    cols = [_layer_col()] + [Col(h, right=True) for h in ("Conv / LC", "FC dense", "FC sparse")]
    rows = [
        [
            _name(layer),
            _count(layer.conv_macs),
            _count(layer.fc_dense_macs),
            _count(layer.fc_sparse_macs),
        ]
        for layer in report.layers
    ]
    return fitted_table(cols, rows, width, title="Multiply-adds per sample")


def totals_table(total: Totals, width: int = 160) -> tuple[Table, list[str]]:
    """The whole model in each form; tied weights once, non-conv parameters in every row."""
    what = "all" if total.converted == total.layers else f"the {total.converted} listed"
    orig = total.original_params
    data: list[tuple[str, int | None, int | None, int | None]] = [
        ("original (conv)", orig, total.original_bytes, total.conv_macs),
        ("locally connected", total.lc_params, total.lc_bytes, total.lc_macs),
        ("fully connected, dense", total.fc_params, total.fc_dense_bytes, total.fc_dense_macs),
        ("fully connected, sparse", total.fc_nonzero, total.fc_sparse_bytes, total.fc_sparse_macs),
    ]
    rows = []
    for label, params, nbytes, macs in data:
        ratio = None if params is None or not orig else params / orig
        rows.append([label, _count(params), _ratio(ratio), _bytes(nbytes), _count(macs)])
    cols = [
        Col("Model"),
        Col("Parameters", right=True),
        Col("x original", right=True),
        Col("Memory", right=True),
        Col("Conv MACs / sample", right=True),
    ]
    return fitted_table(
        cols,
        rows,
        width,
        TOTALS_DROP,
        title=f"Model totals (tied weights counted once; {what} conv layers converted)",
    )


def _notes(report: ParamReport) -> list[str]:
    """Report notes, then per-layer notes grouped by text so a repeated note shows once."""
    lines = list(report.notes)
    groups: dict[str, list[str]] = {}
    for layer in report.layers:
        for note in layer.notes:
            groups.setdefault(note, []).append(layer.name)
    total = len(report.layers)
    for note, names in groups.items():
        if len(names) == total and total > 1:
            who = "all layers"
        else:
            who = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        lines.append(f"{who}: {note}")
    return lines


def _exact(n: int) -> str:
    """'41.0 K (40986)', or just '940' when the short form is already exact."""
    short = human_count(n)
    return short if short == str(n) else f"{short} ({n})"


def _summary(total: Totals) -> str:
    conv = _exact(total.conv_params)
    if total.non_conv_params is None:
        return f"conv parameters: {conv}; non-conv parameters: unknown"
    return (
        f"conv parameters: {conv}; non-conv parameters: {_exact(total.non_conv_params)}, "
        f"included in every model total"
    )


def render_report(report: ParamReport, console: Console | None = None) -> None:
    """Print the four tables and the notes (`console`: default stdout)."""
    out = console or stdout()
    dropped: list[str] = []
    for build in (params_table, memory_table, macs_table):
        table, gone = build(report, out.width)
        print_fitted(out, table)
        dropped += gone
    table, gone = totals_table(report.total, out.width)
    print_fitted(out, table)
    dropped += gone
    out.print(Text(_summary(report.total)))
    notes = _notes(report)
    if any(layer.shared_with or layer.tied_to for layer in report.layers):
        notes.append("* shares its module or weight with an earlier layer (see its note)")
    if dropped:
        notes.append(dropped_note(list(dict.fromkeys(dropped))))
    if notes:
        out.print(Text("Notes:"))
        for line in notes:
            out.print(Text(f"  - {line}"))


def report_json(report: ParamReport, source: str | None = None) -> None:
    """The report as JSON on stdout."""
    payload: dict[str, Any] = {"source": source} if source is not None else {}
    payload.update(report.to_dict())
    emit_json(payload)


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list):
        return (
            "x".join(str(v) for v in value)
            if all(isinstance(v, int) for v in value)
            else ("; ".join(str(v) for v in value))
        )
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def report_csv(report: ParamReport) -> str:
    """One row per listed layer (shapes as 3x24x24, unknown as empty), then a `TOTAL` row.

    The TOTAL row (type `model`) holds the model totals in the same columns: conv_params is the
    original model's parameter count, lc_params / fc_params / fc_nonzero those of the converted
    models, and the bytes and MACs columns likewise.
    """
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for layer in report.layers:
        row = layer.to_dict()
        writer.writerow({k: _cell(row[k]) for k in CSV_FIELDS})
    t = report.total
    total_row: dict[str, Any] = {
        "name": "TOTAL",
        "type": "model",
        "conv_params": t.original_params,
        "lc_params": t.lc_params,
        "fc_params": t.fc_params,
        "fc_nonzero": t.fc_nonzero,
        "lc_ratio": t.lc_ratio,
        "fc_ratio": t.fc_ratio,
        "conv_bytes": t.original_bytes,
        "lc_bytes": t.lc_bytes,
        "fc_dense_bytes": t.fc_dense_bytes,
        "fc_sparse_bytes": t.fc_sparse_bytes,
        "conv_macs": t.conv_macs,
        "lc_macs": t.lc_macs,
        "fc_dense_macs": t.fc_dense_macs,
        "fc_sparse_macs": t.fc_sparse_macs,
        "notes": list(report.notes),
    }
    writer.writerow({k: _cell(total_row.get(k)) for k in CSV_FIELDS})
    return buf.getvalue()
