"""The package's layering (.ci/check_layers.py): the real tree passes, and breaches are caught.

typer/rich stay out of the core by ruff's banned-api (pyproject.toml, checked by `ruff check` in
.ci/run); this file checks the per-package rules ruff cannot express.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).parents[1] / ".ci" / "check_layers.py"


def _checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_layers", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_package_keeps_its_layers() -> None:
    errors, _ = _checker().check()
    assert errors == []


def _tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / "convtool" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("spec.py", "from convtool.io import tensors\n", "spec.py (core) imports convtool.io"),
        ("spec.py", "def f():\n    import convtool.cli\n", "imports convtool.cli (cli)"),
        ("spec.py", "from convtool import render\n", "imports convtool.render (render)"),
        ("spec.py", "import rich.table\n", "imports rich.table; only convtool/cli"),
        ("io/tensors.py", "from convtool.matrices import x\n", "io/tensors.py (io) imports"),
        ("io/tensors.py", "from ..sizes import x\n", "imports convtool.sizes (core)"),
        ("render/t.py", "from convtool.cli import app\n", "render/t.py (render) imports"),
        ("describe.py", "import typer\n", "imports typer; only convtool/cli"),
    ],
)
def test_breaches_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, text: str, expected: str
) -> None:
    checker = _checker()
    _tree(
        tmp_path,
        {
            "__init__.py": "",
            "errors.py": "",
            "sizes.py": "",
            "matrices.py": "",
            "io/__init__.py": "",
            "io/tensors.py": "from convtool.errors import ConvtoolError\n",
            "cli/__init__.py": "import typer\nfrom convtool.io import tensors\n",
            "render/__init__.py": "import rich\n",
        },
    )
    _tree(tmp_path, {name: text})
    monkeypatch.setattr(checker, "ROOT", tmp_path)
    monkeypatch.setattr(checker, "PACKAGE", tmp_path / "convtool")
    monkeypatch.setattr(checker, "KNOWN", {})
    errors, _ = checker.check()
    assert any(expected in e for e in errors), errors
    assert len(errors) == 1, errors  # cli/ and render/ may use typer, rich and io


def test_a_fixed_breach_must_leave_the_known_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checker = _checker()
    _tree(tmp_path, {"__init__.py": "", "models.py": "import torch\n"})
    monkeypatch.setattr(checker, "ROOT", tmp_path)
    monkeypatch.setattr(checker, "PACKAGE", tmp_path / "convtool")
    monkeypatch.setattr(checker, "KNOWN", {("convtool/models.py", "convtool.io.x"): "gone"})
    errors, _ = checker.check()
    assert errors == [
        "KNOWN breach ('convtool/models.py', 'convtool.io.x') no longer happens: remove it from "
        ".ci/check_layers.py"
    ]
