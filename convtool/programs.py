"""Conv layers of scripted and exported programs, and the `.pt2` *mirror* (no file I/O).

- TorchScript: conv hyperparameters are read from the scripted modules' attributes (no Python
  source needed). Script modules take no hooks, so shapes are recorded at the dispatcher
  (:mod:`convtool.inventory`).
- export (.pt2): :func:`export_mirror` turns `ExportedProgram.module()` into a GraphModule with
  every conv call rewritten as a call to a real `nn.Conv*d` module that shares the program's
  weights, so hooks, shape capture and conversion work as for an eager model. A
  reflect/replicate/circular pad feeding a conv (which is how `nn.Conv*d` computes those modes)
  is folded back into the module. Input shapes come from the graph's fake tensors
  (`node.meta['val']`); nothing is run. Conv calls are named as :mod:`convtool.inventory` names
  an eager model's: a conv module's own call by its path ('stem'), any other call
  'owner.F.conv2d#0' from the node's `nn_module_stack` (the module whose forward made it). A
  graph without that metadata, or a module class that is not imported (so whether it is a conv
  cannot be told without running code), keeps the older names ('body_0_filters_conv', 'head').

The readers that produce these objects from files live in :mod:`convtool.io.checkpoints`;
:mod:`convtool.source` puts the two together.
"""

from __future__ import annotations

import contextlib
import sys
import types
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from convtool.errors import ConvtoolError
from convtool.inventory import ConvLayer
from convtool.spec import CONV_TYPES, ConvSpec, build_conv

SCRIPT_CONV_NAMES = {cls.__name__: key for cls, key in CONV_TYPES.items()}
# aten ops that are a convolution; their arguments are read by schema name.
_ATEN_CONVS = {
    f"aten::{name}"
    for name in (
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "convolution",
        "_convolution",
    )
}
_PAD_OPS = {
    "aten::pad",
    *(f"aten::{kind}_pad{n}d" for kind in ("reflection", "replication") for n in (1, 2, 3)),
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def script_layers(model: nn.Module, path: Path | None = None) -> list[ConvLayer]:
    """Conv layers of a scripted model, read from the scripted modules' attributes."""
    where = f" in {str(path)!r}" if path is not None else ""
    layers = []
    for name, sub in model.named_modules():
        key = SCRIPT_CONV_NAMES.get(getattr(sub, "original_name", ""))
        if key is None:
            continue
        params = dict(sub.named_parameters(recurse=False))
        weight, bias = params.get("weight"), params.get("bias")
        if weight is None:
            continue
        try:
            s: Any = sub
            spec = ConvSpec.create(
                ndim=key[0],
                in_channels=int(s.in_channels),
                out_channels=int(s.out_channels),
                kernel_size=tuple(s.kernel_size),
                stride=tuple(s.stride),
                padding=s.padding if isinstance(s.padding, str) else tuple(s.padding),
                dilation=tuple(s.dilation),
                groups=int(s.groups),
                padding_mode=str(s.padding_mode),
                transposed=key[1],
                output_padding=tuple(s.output_padding) if key[1] else 0,
                bias=bias is not None,
            )
        except (AttributeError, RuntimeError) as exc:
            raise ConvtoolError(
                f"cannot read the hyperparameters of conv {name!r}{where}: {_first_line(exc)}"
            ) from None
        layers.append(
            ConvLayer(
                name,
                spec,
                weight.detach(),
                bias.detach() if bias is not None else None,
                module=sub,
            )
        )
    return layers


def script_to_program(model: Any, example: Tensor) -> Any:
    """A TorchScript model as a torch.export program, so it can be rewritten and re-exported."""
    try:
        from torch._export.converter import TS2EPConverter
    except ImportError:  # pragma: no cover - torch < 2.4
        raise ConvtoolError(
            "this torch cannot turn a TorchScript archive into an editable graph; save the "
            "model's state_dict (and pass `model`) or a torch.export .pt2 instead",
            params=("model",),
        ) from None
    try:
        with quiet():
            return TS2EPConverter(model, (example,)).convert()
    except Exception as exc:
        raise ConvtoolError(
            f"cannot rebuild the TorchScript model as a torch.export graph: {_first_line(exc)}; "
            f"save its state_dict (and pass `model`) or a torch.export .pt2 instead",
            params=("model",),
        ) from None


@contextlib.contextmanager
def quiet() -> Any:
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("torch._export", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _schema_args(node: Any) -> dict[str, Any]:
    schema = node.target._schema
    values: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            values[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            values[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            values[arg.name] = arg.default_value
    return values


def _op_name(node: Any) -> str | None:
    if node.op != "call_function":
        return None
    schema = getattr(node.target, "_schema", None)
    return schema.name if schema is not None else None


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _as_tuple(value: Any, ndim: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * ndim
    items = tuple(int(v) for v in value)
    return items * ndim if len(items) == 1 else items


def _conv_spec(args: dict[str, Any], weight: Tensor, name: str) -> ConvSpec:
    ndim = weight.dim() - 2
    op_transposed = bool(args.get("transposed", False))
    padding = args.get("padding", 0)
    return ConvSpec.from_weight(
        tuple(weight.shape),
        stride=_as_tuple(args.get("stride", 1), ndim),
        padding=padding if isinstance(padding, str) else _as_tuple(padding, ndim),
        dilation=_as_tuple(args.get("dilation", 1), ndim),
        groups=int(args.get("groups", 1)),
        transposed=op_transposed or "transpose" in name,
        output_padding=_as_tuple(args.get("output_padding", 0), ndim),
        bias=args.get("bias") is not None,
    )


def _fold_pad(node: Any, spec: ConvSpec) -> tuple[Any, ConvSpec] | None:
    """(pad input, spec with padding_mode) when `node` is a symmetric non-zero-mode pad."""
    if _op_name(node) not in _PAD_OPS or len(node.users) != 1 or spec.transposed:
        return None
    if isinstance(spec.padding, str) or any(spec.padding):
        return None
    args = _schema_args(node)
    op = _op_name(node)
    assert op is not None
    mode = args.get("mode", "constant") if op == "aten::pad" else op[6:].split("_")[0]
    mode = {"reflection": "reflect", "replication": "replicate"}.get(mode, mode)
    pads = list(args.get("pad", args.get("padding", [])))
    if mode not in ("reflect", "replicate", "circular") or len(pads) != 2 * spec.ndim:
        return None
    if any(pads[2 * i] != pads[2 * i + 1] for i in range(spec.ndim)):
        return None
    padding = tuple(pads[2 * (spec.ndim - 1 - d)] for d in range(spec.ndim))
    folded = ConvSpec.create(
        spec.ndim,
        spec.in_channels,
        spec.out_channels,
        spec.kernel_size,
        stride=spec.stride,
        padding=padding,
        dilation=spec.dilation,
        groups=spec.groups,
        padding_mode=mode,
        bias=spec.bias,
    )
    return node.args[0], folded


def _sample_shape(node: Any, ndim: int) -> tuple[int, ...] | None:
    val = node.meta.get("val") if hasattr(node, "meta") else None
    if not isinstance(val, Tensor):
        return None
    try:
        shape = tuple(int(s) for s in val.shape)
    except (TypeError, ValueError):  # symbolic (dynamic) sizes
        return None
    return shape[1:] if len(shape) == ndim + 2 else shape


def _module_name(gm: nn.Module, weight_target: str, used: set[str]) -> tuple[str, bool]:
    """(name, replace_owner): the owner's path when the conv can take its place."""
    base, _, leaf = weight_target.rpartition(".")
    if leaf == "weight" and base and base not in used:
        owner = gm.get_submodule(base)
        own = {n for n, _ in owner.named_parameters(recurse=False)}
        own |= {n for n, _ in owner.named_buffers(recurse=False)}
        if own <= {"weight", "bias"} and not any(True for _ in owner.children()):
            return base, True
    stem = (base if leaf == "weight" and base else weight_target).replace(".", "_")
    name, i = f"{stem}_conv", 1
    while hasattr(gm, name) or name in used:
        i += 1
        name = f"{stem}_conv{i}"
    return name, False


def _stack_owner(node: Any) -> tuple[str, str, str] | None:
    """(key, module path, type name) of the innermost module whose forward made `node`'s call,
    from torch.export's `nn_module_stack` metadata; None when the graph does not record it."""
    stack = node.meta.get("nn_module_stack") if hasattr(node, "meta") else None
    if not stack:
        return None
    key, value = list(stack.items())[-1]
    try:
        path, kind = value[0], value[1]
    except (TypeError, IndexError):
        return None
    if not isinstance(path, str):
        return None
    kind = kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"
    return str(key), path, kind


def _is_conv_type(kind: str) -> bool | None:
    """Whether the class named `kind` ('torch.nn.modules.conv.Conv2d') is a conv module; None
    when it is not importable without running code (only already-imported modules are read)."""
    module_name, _, qualname = kind.rpartition(".")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split(".") if obj is not None else ():
        obj = getattr(obj, part, None)
    if not isinstance(obj, type):
        return None
    return issubclass(obj, tuple(CONV_TYPES))


def _functional_name(
    gm: nn.Module, owner: str, function: str, index: int, used: set[str]
) -> str | None:
    """`owner.F.conv2d#0`, the name :mod:`convtool.inventory` gives a functional call, when the
    mirror can hold a module at that path (the owner exists and has no other `F`)."""
    try:
        parent = gm.get_submodule(owner) if owner else gm
    except AttributeError:
        return None
    holder = getattr(parent, "F", None)
    if holder is None:
        holder = _Calls()
        parent.add_module("F", holder)
    elif not isinstance(holder, _Calls):
        return None
    leaf = f"{function}#{index}"
    name = f"{owner}.F.{leaf}" if owner else f"F.{leaf}"
    return None if hasattr(holder, leaf) or name in used else name


class _Calls(nn.Module):
    """The `F` holder of a mirror's functional-call convs (`owner.F.conv2d#0`)."""


def _call_name(
    gm: nn.Module,
    node: Any,
    op: str,
    weight_target: str,
    used: set[str],
    counters: dict[tuple[str, str], int],
) -> tuple[str, bool]:
    """(name, replace_owner) of a conv call, named as :mod:`convtool.inventory` names calls.

    A conv module calling with its own weight is named after the module (which the new conv
    replaces); any other call is `owner.F.function#index`, `owner` being the innermost module
    of the node's `nn_module_stack`, counted per function within that module's forward. Where
    the graph records no stack (or the path cannot hold a module), the fallback is
    :func:`_module_name`.
    """
    found = _stack_owner(node)
    if found is None:
        return _module_name(gm, weight_target, used)
    key, owner, kind = found
    base, _, leaf = weight_target.rpartition(".")
    if owner == base and leaf == "weight" and _is_conv_type(kind) is not False:
        name, replace = _module_name(gm, weight_target, used)
        if replace:
            return name, True
    function = op.split("::")[-1].lstrip("_")
    index = counters.get((key, function), 0)
    counters[(key, function)] = index + 1
    called = _functional_name(gm, owner, function, index, used)
    return (called, False) if called is not None else _module_name(gm, weight_target, used)


def _fixed_mode(self: nn.Module, mode: bool = False) -> nn.Module:
    return self


def export_mirror(program: Any) -> tuple[Any, list[ConvLayer], list[str]]:
    """(GraphModule, conv layers, notes) for an ExportedProgram (see module docstring)."""
    with quiet():
        gm = program.module()
    graph = gm.graph
    layers: list[ConvLayer] = []
    notes: list[str] = []
    used: set[str] = set()
    counters: dict[tuple[str, str], int] = {}
    for node in list(graph.nodes):
        op = _op_name(node)
        if op not in _ATEN_CONVS:
            continue
        args = _schema_args(node)
        weight_node: Any = args.get("weight")
        bias_node: Any = args.get("bias")
        if getattr(weight_node, "op", None) != "get_attr" or (
            bias_node is not None and getattr(bias_node, "op", None) != "get_attr"
        ):
            notes.append(
                f"conv call {node.name!r} computes its weight in the graph; it is left as it is"
            )
            continue
        weight = _fetch(gm, weight_node.target)
        bias = _fetch(gm, bias_node.target) if bias_node is not None else None
        spec = _conv_spec(args, weight, op)
        source_node = args["input"]
        folded = _fold_pad(source_node, spec)
        if folded is not None:
            source_node, spec = folded
        name, replace_owner = _call_name(gm, node, op, weight_node.target, used, counters)
        used.add(name)
        conv: Any = build_conv(spec, weight, bias)
        if replace_owner:
            parent, _, leaf = name.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, leaf, conv)
        else:
            gm.add_submodule(name, conv)
        with graph.inserting_before(node):
            call = graph.call_module(name, (source_node,))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        pad_node = args["input"] if folded is not None else None
        graph.erase_node(node)
        if pad_node is not None:
            graph.erase_node(pad_node)
        layers.append(
            ConvLayer(
                name,
                spec,
                conv.weight.detach(),
                conv.bias.detach() if conv.bias is not None else None,
                input_shape=_sample_shape(source_node, spec.ndim),
                module=conv,
            )
        )
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    gm.recompile()
    # The training flags of an exported graph were fixed when it was exported; the unlifted
    # module's train()/eval() raise, which would break every caller that calls .eval().
    gm.train = types.MethodType(_fixed_mode, gm)
    gm.eval = types.MethodType(_fixed_mode, gm)
    return gm, layers, notes
