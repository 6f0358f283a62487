"""Refuse model programs that would touch files (or the network) when loaded or run.

A TorchScript archive or a torch.export program is code: loading a TorchScript archive runs its
`__setstate__` methods, and convtool runs a model's forward once to record each conv's input
shape. Both are TorchScript/aten operators, not Python, but a few operators have effects outside
tensors: `aten::save` writes a file, `aten::from_file` maps one (writable when `shared=True`),
`debugprims::load_tensor` reads one, and the collective namespaces talk to other processes.
A model file that calls any of them is refused before it is loaded (TorchScript: its code text
is scanned) and again before it is run (the loaded graphs, inlined, are audited node by node).
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from convtool.errors import ConvtoolError

DENIED_OPS = frozenset({"aten::save", "aten::from_file"})
DENIED_NAMESPACES = frozenset(
    {"debugprims", "c10d", "_c10d_functional", "_c10d_functional_autograd", "symm_mem"}
)
# In serialized TorchScript code the ops read `torch.save(...)`, `ops.aten.from_file(...)`,
# `ops.debugprims.load_tensor(...)`.
_CODE_PATTERN = re.compile(
    r"[\w.]*\.\s*(save|from_file|load_tensor)\s*\(|\bops\s*\.\s*("
    + "|".join(sorted(DENIED_NAMESPACES))
    + r")\s*\."
)
_MAX_CODE_BYTES = 64 * 1024 * 1024


def _refuse(path: Path, what: str) -> ConvtoolError:
    return ConvtoolError(
        f"{str(path)!r} {what}, which reads or writes files (or the network) when the model is "
        f"loaded or run; convtool did not load it. If you trust the file, pass allow_pickle=True",
        params=("allow_pickle",),
    )


def check_script_code(data: bytes, path: Path) -> None:
    """Scan a TorchScript archive's code for denied operators before `torch.jit.load` runs it.

    Args:
        data: the archive's bytes.
        path: its name, for messages.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a zip: torch.jit.load will refuse it
    with archive:
        for info in archive.infolist():
            parts = info.filename.split("/")
            if "code" not in parts[:-1] or not info.filename.endswith(".py"):
                continue
            if info.file_size > _MAX_CODE_BYTES:
                raise _refuse(path, f"holds an implausibly large code member {info.filename!r}")
            try:
                text = archive.read(info).decode("utf-8", errors="replace")
            except (zipfile.BadZipFile, OSError, ValueError, RuntimeError, EOFError):
                continue  # torch.jit.load reports the damage
            match = _CODE_PATTERN.search(text)
            if match:
                call = match.group(0).strip(" (.")
                raise _refuse(path, f"calls {call!r} in {info.filename!r}")


def _denied(kind: str) -> bool:
    return kind in DENIED_OPS or kind.split("::", 1)[0] in DENIED_NAMESPACES


def _script_nodes(block: Any) -> Iterator[Any]:
    for node in block.nodes():
        yield node
        for inner in node.blocks():
            yield from _script_nodes(inner)


def audit_script_module(model: Any, path: Path) -> None:
    """Refuse a loaded TorchScript module any of whose methods calls a denied operator."""
    import torch

    for name, module in model.named_modules():
        c_module = getattr(module, "_c", None)
        if c_module is None:
            continue
        for method_name in c_module._method_names():
            graph = c_module._get_method(method_name).graph.copy()
            torch._C._jit_pass_inline(graph)
            for node in _script_nodes(graph):
                if _denied(node.kind()):
                    where = f"{name}.{method_name}" if name else method_name
                    raise _refuse(path, f"calls {node.kind()!r} in {where!r}")


def audit_program(program: Any, path: Path) -> None:
    """Refuse an ExportedProgram whose graphs (subgraphs included) call a denied operator."""
    root = program.graph_module
    for module in root.modules():
        graph = getattr(module, "graph", None)
        if graph is None:
            continue
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            schema = getattr(node.target, "_schema", None)
            kind = schema.name if schema is not None else ""
            if kind and _denied(kind):
                raise _refuse(path, f"calls {kind!r} in its graph")
