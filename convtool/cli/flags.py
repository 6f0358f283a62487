"""The library speaks in parameters; this says its messages in command-line flags.

A :class:`~convtool.errors.ConvtoolError` names parameters the way a Python caller writes them
(`max_memory=`, `sparse=True`, `to='lc'`, `` `layers` ``). The CLI's one error mapper
(:mod:`convtool.cli.app`) passes each message through :func:`cli_message`, which rewrites the
parameters that are options of some subcommand into their flags (`--max-memory`, `--sparse`,
`--to lc`, `--layers`) and leaves every other word alone. Long-flag names come from the Typer app
itself, so a new option needs no entry here.
"""

from __future__ import annotations

import functools
import re

import typer

from convtool.errors import ConvtoolError

# Library parameter names whose CLI option has another name.
ALIASES = {
    "example_input": "--input-shape",
    "example_shape": "--input-shape",
    "memory_limit": "--max-memory",
}
_VALUE = r"[\w.:,\-/]+"  # a value safe to show unquoted on a command line (no glob)


@functools.cache
def flags() -> dict[str, str]:
    """Parameter name -> long flag, for every option of every subcommand (plus ALIASES)."""
    from convtool.cli.app import app

    group = typer.main.get_command(app)
    found: dict[str, str] = {}
    for command in getattr(group, "commands", {}).values():
        for param in command.params:
            longs = [o for o in getattr(param, "opts", []) if o.startswith("--")]
            if param.name and longs:
                found.setdefault(param.name, longs[0])
    return {**found, **ALIASES}


def _rewrite(text: str, name: str, flag: str, assignments: bool) -> str:
    word = rf"(?<![\w.]){re.escape(name)}"
    text = re.sub(rf"`{word}(=True)?`", flag, text)
    if assignments:  # only for declared params: `groups=2` inside torch's own text stays
        text = re.sub(rf"{word}=True\b", flag, text)
        text = re.sub(rf"{word}=(['\"])({_VALUE})\1", rf"{flag} \2", text)
        text = re.sub(rf"{word}=", f"{flag} ", text)
    return text


def cli_text(text: str) -> str:
    """Library text shown by the CLI (notes, warnings): backticked parameters and
    `name=value` examples said as flags (`` `input_shape` `` -> `--input-shape`)."""
    for name, flag in flags().items():
        if name in text:
            text = _rewrite(text, name, flag, assignments=True)
    return text


def cli_message(exc: ConvtoolError) -> str:
    """`exc`'s message with its parameters spelled as flags.

    Backticked names (`` `layers` ``) are always rewritten; assignments (`max_memory=`,
    `to='lc'`, `sparse=True`) only for the parameters the error declares in `exc.params`, so a
    quoted torch message (`groups=1`) is left alone. Flags of declared parameters that the
    message does not spell out are added in parentheses.
    """
    text = str(exc)
    table = flags()
    declared = set(getattr(exc, "params", ()))
    for name, flag in table.items():
        if name in text:
            text = _rewrite(text, name, flag, name in declared)
    missing = [table[p] for p in declared if p in table]
    missing = [f for f in dict.fromkeys(sorted(missing)) if not re.search(rf"{f}(?![\w-])", text)]
    return f"{text} ({', '.join(missing)})" if missing else text
