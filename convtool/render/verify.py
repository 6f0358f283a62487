"""The `convtool verify` table and its final PASSED/FAILED line (columns drop in DROP_ORDER)."""

from __future__ import annotations

import math

from rich.console import Console

from convtool.compare import Comparison
from convtool.render.common import Col, dropped_note, fitted_table, print_fitted, shape_str, stdout
from convtool.verification import FAILED, NOT_APPLICABLE, PASSED, SKIPPED, FormCheck, VerifyReport

# At a narrow width, columns go in this order (README: "Tables at 80 columns").
DROP_ORDER = ("median abs", "mean abs", "atol needed", "err/bound", "max rel")

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


def _last(c: Comparison) -> float:
    """err/bound for a bound comparison, else the atol needed at the rtol used."""
    return c.bound_ratio if c.bound_ratio is not None else c.atol_needed


def _row(check: FormCheck, name: str) -> list[str]:
    c = check.comparison
    errors = (
        [c.max_abs_error, c.mean_abs_error, c.median_abs_error, c.max_rel_error, _last(c)]
        if c is not None
        else [None] * 5
    )
    status = _STATUS[check.status] + (" [yellow](part)[/yellow]" if check.partial else "")
    return [name, check.form, *(_err(e) for e in errors), status]


def _label(check: FormCheck, repeated: set[str]) -> str:
    """The layer name, with its input shape when the layer is checked at several."""
    return (
        f"{check.name} @ {shape_str(check.input_shape)}" if check.name in repeated else check.name
    )


def _where(report: VerifyReport) -> str:
    tol = report.tolerance
    if tol.arithmetic:
        return f"{report.dtype}, within the rounding-error bound"
    return f"{report.dtype}, rtol={tol.rtol:g}, atol={tol.atol:g}"


def _unchecked(report: VerifyReport) -> str:
    """'; not checked: 2 skipped (a/fc-dense, b/fc-dense: over the memory budget ...)'."""
    skipped = [c for c in report.unchecked if c.status == SKIPPED]
    partial = [c for c in report.unchecked if c.status != SKIPPED]
    parts = []
    for what, checks in (("skipped", skipped), ("checked in part", partial)):
        if not checks:
            continue
        names = ", ".join(f"{c.name}/{c.form}" for c in checks[:4])
        names += ", ..." if len(checks) > 4 else ""
        parts.append(f"{len(checks)} {what} ({names}: {_reason(checks)})")
    strict = " [strict: a failure]" if report.strict and parts else ""
    return f"; not checked: {'; '.join(parts)}{strict}" if parts else ""


def _reason(checks: list[FormCheck]) -> str:
    """Why the first of `checks` was skipped or partial, in a few words."""
    first = checks[0]
    text = first.partial or first.note
    why = text.split(";")[0]
    if "the memory budget" in text:
        why = "over " + text[text.index("the memory budget") :].split(";")[0]
    if first.partial:
        what = first.partial.split(":")[0]
        if why.startswith("over") and "budget" not in what:
            return f"{what}, the whole form {why}"
        return what
    return why


def summary_line(report: VerifyReport) -> str:
    """'PASSED: ...' or 'FAILED: ...' with the counts and what was not checked and why (plain
    text, no markup)."""
    ran = report.count(PASSED) + report.count(FAILED)
    na = report.count(NOT_APPLICABLE)
    tail = (f" ({na} not applicable)" if na else "") + _unchecked(report)
    where = _where(report)
    if report.passed:
        return f"PASSED: {ran} of {ran} comparisons within tolerance ({where}){tail}"
    if not report.failures and ran:
        return f"FAILED (--strict): {ran} of {ran} comparisons within tolerance ({where}){tail}"
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
    if tol.arithmetic:
        rule = (
            f"each element against a float64 reference, within the {tol.source}. Max abs = "
            f"tightest atol at rtol=0; max rel = tightest rtol at atol=0; err/bound = largest "
            f"ratio of error to bound (passes <= 1)."
        )
    else:
        rule = (
            f"tolerance rtol={tol.rtol:g} atol={tol.atol:g} ({tol.source}) against a float64 "
            f"reference. Max abs = tightest atol at rtol=0; max rel = tightest rtol at atol=0; "
            f"atol needed = tightest atol at rtol={tol.rtol:g}."
        )
    last = "err/bound" if tol.arithmetic else "atol needed"
    cols = [
        Col("layer", name=True),
        Col("form"),
        *(Col(h, right=True) for h in ("max abs", "mean abs", "median abs", "max rel", last)),
        Col("result", markup=True),
    ]
    shapes: dict[str, set[tuple[int, ...]]] = {}
    for check in report.checks:
        shapes.setdefault(check.name, set()).add(check.input_shape)
    repeated = {name for name, seen in shapes.items() if len(seen) > 1}
    rows = [_row(check, _label(check, repeated)) for check in report.checks]
    rows += [_row(check, check.name) for check in report.end_to_end]
    table, dropped = fitted_table(
        cols,
        rows,
        console.width,
        DROP_ORDER,
        sections=[len(report.checks)] if report.end_to_end else [],
        title=f"convtool verify{': ' + source if source else ''} ({report.dtype})",
    )
    table.caption = f"inputs: {inputs}; {rule}" + (f"\n{dropped_note(dropped)}" if dropped else "")
    table.caption_justify = "left"
    print_fitted(console, table)
    for check in report.all_checks:
        if check.note:
            console.print(
                f"  {_label(check, repeated)}/{check.form}: {check.note}",
                markup=False,
                soft_wrap=False,
            )
    for check in report.end_to_end:
        if check.comparison is not None and check.comparison.bound_source:
            console.print(
                f"  end to end bound: {check.comparison.bound_source}",
                markup=False,
                soft_wrap=False,
            )
            break
    ran = [c for c in report.end_to_end if c.comparison is not None]
    if ran:
        check = ran[0]
        console.print(
            f"  end to end: the whole model on inputs of shape {shape_str(check.input_shape)} "
            f"({check.output_shape[0]} output values each)",
            markup=False,
            soft_wrap=False,
        )
    for note in report.notes:
        console.print(f"  {note}", markup=False, soft_wrap=False)
    line = summary_line(report)
    style = "bold green" if report.passed else "bold red"
    console.print(line, style=style, markup=False, highlight=False, soft_wrap=False)
