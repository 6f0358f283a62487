"""The `convtool verify` table and its final PASSED/FAILED line (columns drop in DROP_ORDER)."""

from __future__ import annotations

import math

from rich.console import Console

from convtool.render.common import Col, dropped_note, fitted_table, print_fitted, shape_str, stdout
from convtool.verification import FAILED, NOT_APPLICABLE, PASSED, SKIPPED, FormCheck, VerifyReport

# At a narrow width, columns go in this order (README: "Tables at 80 columns").
DROP_ORDER = ("median abs", "mean abs", "atol needed", "max rel")

_STATUS = {
    PASSED: "[green]pass[/green]",
    FAILED: "[bold red]FAIL[/bold red]",
    SKIPPED: "[yellow]skipped[/yellow]",
    NOT_APPLICABLE: "[dim]n/a[/dim]",
}


def _err(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf"
    return "0" if value == 0 else f"{value:.2e}"


def _row(check: FormCheck) -> list[str]:
    c = check.comparison
    errors = (
        [c.max_abs_error, c.mean_abs_error, c.median_abs_error, c.max_rel_error, c.atol_needed]
        if c is not None
        else [None] * 5
    )
    return [check.name, check.form, *(_err(e) for e in errors), _STATUS[check.status]]


def summary_line(report: VerifyReport) -> str:
    """'PASSED: ...' or 'FAILED: ...' with the counts (plain text, no markup)."""
    ran = report.count(PASSED) + report.count(FAILED)
    extra = [f"{report.count(s)} {s}" for s in (SKIPPED, NOT_APPLICABLE) if report.count(s)]
    tail = f" ({', '.join(extra)})" if extra else ""
    tol = report.tolerance
    where = f"{report.dtype}, rtol={tol.rtol:g}, atol={tol.atol:g}"
    if report.passed:
        return f"PASSED: {ran} of {ran} comparisons within tolerance ({where}){tail}"
    if not report.failures:
        return f"FAILED: no comparison could run{tail}"
    names = ", ".join(f"{c.name}/{c.form}" for c in report.failures[:6])
    more = ", ..." if len(report.failures) > 6 else ""
    return (
        f"FAILED: {len(report.failures)} of {ran} comparisons out of tolerance ({where}): "
        f"{names}{more}{tail}"
    )


def render_verify_report(
    report: VerifyReport, source: str = "", console: Console | None = None
) -> None:
    """The comparisons as a table, their notes, and the final PASSED/FAILED line on stdout."""
    console = console or stdout()
    tol = report.tolerance
    inputs = f"{report.trials} random (seed {report.seed}), ones, zeros"
    cols = [
        Col("layer", name=True),
        Col("form"),
        *(Col(h, right=True) for h in ("max abs", "mean abs", "median abs", "max rel")),
        Col("atol needed", right=True),
        Col("result", markup=True),
    ]
    rows = [_row(check) for check in [*report.checks, *report.end_to_end]]
    caption = (
        f"inputs: {inputs}; tolerance rtol={tol.rtol:g} atol={tol.atol:g} "
        f"({tol.source}). Max abs = tightest atol at rtol=0; max rel = tightest rtol at atol=0; "
        f"atol needed = tightest atol at rtol={tol.rtol:g}."
    )
    table, dropped = fitted_table(
        cols,
        rows,
        console.width,
        DROP_ORDER,
        sections=[len(report.checks)] if report.end_to_end else [],
        title=f"convtool verify{': ' + source if source else ''} ({report.dtype})",
    )
    table.caption = caption + (f"\n{dropped_note(dropped)}" if dropped else "")
    table.caption_justify = "left"
    print_fitted(console, table)
    for check in report.all_checks:
        if check.note:
            console.print(
                f"  {check.name}/{check.form}: {check.note}", markup=False, soft_wrap=True
            )
    ran = [c for c in report.end_to_end if c.comparison is not None]
    if ran:
        check = ran[0]
        console.print(
            f"  end to end: the whole model on inputs of shape {shape_str(check.input_shape)} "
            f"({check.output_shape[0]} output values each)",
            markup=False,
            soft_wrap=True,
        )
    for note in report.notes:
        console.print(f"  {note}", markup=False, soft_wrap=True)
    line = summary_line(report)
    style = "bold green" if report.passed else "bold red"
    console.print(line, style=style, markup=False, highlight=False, soft_wrap=True)
