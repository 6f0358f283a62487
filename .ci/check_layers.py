#!/usr/bin/env python3
"""Layering of convtool, checked on the source (no imports run): exit 1 and one line per breach.

Every module of the package belongs to one layer; a layer may import only the layers listed in
ALLOWED_LAYERS. ruff's banned-api (pyproject.toml) keeps typer/rich out of everything but cli/
and render/; this script adds what ruff cannot say per package:

    face     convtool/__init__.py, __main__.py: the package's manifest and entry point
    core     the math and the library API (spec, sizes, matrices, layers, convert, models, params,
             verification, ...): never imports io, cli or render
    io       convtool/io: bytes in and out; imports only errors (and other io modules)
    service  describe, matrix_output, model_output, source, converted: assemble results from
             io and the core for the commands (the only place io and the core meet)
    render   rich tables / JSON from result objects: never cli or io
    cli      parse -> call -> render -> exit code: may import anything

KNOWN lists the breaches that exist today, each with the reason; remove an entry when its
breach is fixed (a stale entry is itself an error, so the list can only shrink).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "convtool"
SERVICE = {
    "convtool.model_output",
    "convtool.describe",
    "convtool.matrix_output",
    "convtool.source",
    "convtool.converted",
}
ERRORS = "convtool.errors"

ALLOWED_LAYERS = {
    "face": {"face", "core", "service", "cli"},
    "core": {"core"},
    "io": {"io"},
    "service": {"core", "io", "service"},
    "render": {"core", "service", "render"},
    "cli": {"face", "core", "io", "service", "render", "cli"},
}
UI_PACKAGES = {"typer", "rich", "click"}  # third-party front-end libraries: cli/render only

# (importing file, imported module): breaches that exist today. Issue 11 moved every io -> core
# import out of io: convtool/source.py (service) assembles a SOURCE from the io readers and the core
# interpreters (inventory, programs, onnx_graph); convtool/converted.py reads a converted model and
# hands it to models.rebuild_converted.
KNOWN: dict[tuple[str, str], str] = {}


def layer_of(module: str) -> str:
    if module == "convtool" or module in ("convtool.__main__",):
        return "face"
    for name in ("cli", "render", "io"):
        if module == f"convtool.{name}" or module.startswith(f"convtool.{name}."):
            return name
    return "service" if module in SERVICE else "core"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, package: str) -> set[str]:
    """Absolute names of every module imported anywhere in the file (function bodies too)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            for alias in node.names:  # `from convtool import sizes` imports a module
                sub = f"{base}.{alias.name}"
                is_module = (ROOT / Path(*sub.split("."))).with_suffix(".py").exists() or (
                    ROOT / Path(*sub.split("."))
                ).is_dir()
                found.add(sub if base.startswith("convtool") and is_module else base)
    return found


def check() -> tuple[list[str], set[tuple[str, str]]]:
    errors: list[str] = []
    used: set[tuple[str, str]] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        name = module_name(path)
        layer = layer_of(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for target in sorted(imported(ast.parse(path.read_text(), rel), package)):
            top = target.split(".")[0]
            if top in UI_PACKAGES and layer not in ("cli", "render"):
                errors.append(f"{rel}: imports {target}; only convtool/cli and render may")
                continue
            if top != "convtool" or target in (ERRORS, name):
                continue
            if layer_of(target) in ALLOWED_LAYERS[layer]:
                continue
            if (rel, target) in KNOWN:
                used.add((rel, target))
                continue
            errors.append(
                f"{rel} ({layer}) imports {target} ({layer_of(target)}); {layer} may import "
                f"only {', '.join(sorted(ALLOWED_LAYERS[layer]))} and convtool.errors"
            )
    for key in sorted(set(KNOWN) - used):
        errors.append(f"KNOWN breach {key} no longer happens: remove it from .ci/check_layers.py")
    return errors, used


def main() -> int:
    errors, used = check()
    for line in errors:
        print(line, file=sys.stderr)
    if not errors:
        print(f"layering ok ({len(used)} known breach(es) left in KNOWN)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
