"""The `convtool toeplitz` summary."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from convtool.render.common import human_bytes, human_count, shape_str, stdout


def render_matrix_summary(result: dict[str, Any]) -> None:
    """A two-column table of the matrix's shapes and sizes (`result` as printed by --json)."""
    rows, cols = result["matrix_shape"]
    table = Table(title="Toeplitz matrix", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("layer", f"{result['name']}: {result['layer']}")
    table.add_row("input shape", shape_str(result["input_shape"]))
    table.add_row("output shape", shape_str(result["output_shape"]))
    table.add_row("matrix shape", f"{rows} x {cols} ({human_count(rows * cols)} entries)")
    table.add_row("nonzeros", f"{result['nnz']} ({human_count(result['nnz'])})")
    table.add_row("density", f"{result['density']:.3%}")
    table.add_row("dtype", result["dtype"])
    table.add_row("dense bytes", human_bytes(result["dense_bytes"]))
    table.add_row("sparse bytes (CSR)", human_bytes(result["sparse_bytes"]))
    if result.get("outputs"):
        written = ", ".join(result["outputs"])
        table.add_row("written", f"{written} ({result['format']}, {result['seconds']:.2f} s)")
    else:
        table.add_row("written", "nothing (no -o/--output given)")
    stdout().print(table)
