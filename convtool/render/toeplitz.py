"""The `convtool toeplitz` summary, from a :class:`~convtool.describe.ToeplitzResult`.

Two columns (what, value); a value longer than the width wraps at its spaces, which never fall
inside a number and its unit or inside a tuple.
"""

from __future__ import annotations

import re

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from convtool.describe import ToeplitzResult
from convtool.render.common import human_bytes, human_count, shape_str, stdout


def render_matrix_summary(result: ToeplitzResult, console: Console | None = None) -> None:
    """A two-column table of the matrix's shapes and sizes."""
    out = console or stdout()
    info = result.info
    rows, cols = info.shape
    table = Table(
        title="Toeplitz matrix",
        show_header=False,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )
    table.add_column("what", style="bold", no_wrap=True)
    table.add_column("value")
    table.add_row("layer", Text(result.name))
    # "(3, 3)" -> "(3,3)": a line may break between arguments, never inside a tuple
    table.add_row("conv", Text(re.sub(r",\s(?=-?\d)", ",", info.layer)))
    table.add_row("input shape", shape_str(info.input_shape))
    table.add_row("output shape", shape_str(info.output_shape))
    table.add_row("matrix shape", f"{rows} x {cols} ({human_count(rows * cols)} entries)")
    table.add_row("nonzeros", f"{info.nnz} ({human_count(info.nnz)})")
    table.add_row("density", f"{info.density:.3%}")
    table.add_row("dtype", info.dtype)
    table.add_row("dense bytes", human_bytes(info.dense_bytes))
    table.add_row("sparse bytes (CSR)", human_bytes(info.csr_bytes))
    if result.outputs:
        written = ", ".join(result.outputs)
        table.add_row("written", Text(f"{written} ({result.format}, {result.seconds:.2f} s)"))
    else:
        table.add_row("written", "nothing (no output file given)")
    out.print(table)
