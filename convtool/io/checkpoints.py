"""Model checkpoints as sources: a state_dict with its architecture, a TorchScript archive, a
torch.export program, or (only on explicit opt-in) a pickled module.

Every loader returns a :class:`~convtool.io.source.Source` whose `layers` are the model's convs,
named by module path as in `model.named_modules()` ('features.0'), and whose `model` can be run:

- state_dict / pickle: the eager model; conv layers are its `nn.Conv*` modules.
- export (.pt2): a *mirror* of the program, `ExportedProgram.module()` with every conv call
  rewritten as a call to a real `nn.Conv*d` module that shares the program's weights, so hooks,
  shape capture and conversion work as for an eager model. A reflect/replicate/circular pad
  feeding a conv (which is how `nn.Conv*d` computes those modes) is folded back into the module.
  Input shapes come from the graph's fake tensors (`node.meta['val']`); nothing is run.
- TorchScript: the `RecursiveScriptModule`; conv hyperparameters are read from the scripted
  modules' attributes (no Python source needed). Script modules take no hooks, so shapes are
  recorded at the dispatcher (:mod:`convtool.models`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import os
import sys
import types
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from convtool.errors import ConvtoolError
from convtool.io.export_archive import load_program
from convtool.io.source import ConvLayer, Source, SourceOptions, module_layers
from convtool.io.tensors import read_bytes, read_tensors, tensors_from_object, torch_load
from convtool.io.untrusted_ops import audit_script_module, check_script_code
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
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_PAD_OPS = {
    "aten::pad",
    *(f"aten::{kind}_pad{n}d" for kind in ("reflection", "replication") for n in (1, 2, 3)),
}


# ---------------------------------------------------------------------------------- format
def detect_format(path: Path) -> str:
    """'numpy', 'safetensors', 'export', 'torchscript', 'torch' (what torch.load reads) or
    'unknown' (a file that is none of these by its extension or content).

    `.pt2` is a torch.export program; other zip archives are told apart by their content:
    TorchScript archives have a `code/` folder and `constants.pkl`, export archives a
    `models/*.json` and `archive_format`.
    """
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        return "numpy"
    if suffix == ".safetensors":
        return "safetensors"
    if suffix == ".pt2":
        return "export"
    try:
        with zipfile.ZipFile(path) as archive:
            inner = {name.split("/", 1)[-1] for name in archive.namelist()}
    except (zipfile.BadZipFile, OSError, ValueError):
        # legacy torch.save files are not zips: trust the extension only
        return "torch" if suffix in TORCH_SUFFIXES else "unknown"
    if "archive_format" in inner or any(n.startswith("models/") for n in inner):
        return "export"
    if "constants.pkl" in inner or any(n.startswith("code/") for n in inner):
        return "torchscript"
    return "torch"


# ---------------------------------------------------------------------------------- --model
def _kwargs(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConvtoolError(
            f"`model_kwargs` must be a JSON object like '{{\"num_classes\": 10}}', got {text!r} "
            f"({exc.msg})",
            params=("model_kwargs",),
        ) from None
    if not isinstance(value, dict):
        raise ConvtoolError(
            f"`model_kwargs` must be a JSON object like '{{\"num_classes\": 10}}', got {text!r}",
            params=("model_kwargs",),
        )
    return value


def _import(module_name: str, target: str) -> Any:
    cwd = os.getcwd()
    if cwd not in sys.path:  # like uvicorn: MODULE is importable from the current folder
        sys.path.insert(0, cwd)
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise ConvtoolError(
                    f"model={target!r}: the file {module_name!r} does not exist",
                    params=("model",),
                )
            spec = importlib.util.spec_from_file_location(file.stem, file)
            if spec is None or spec.loader is None:
                raise ConvtoolError(
                    f"model={target!r}: cannot import {module_name!r}",
                    params=("model",),
                )
            module = importlib.util.module_from_spec(spec)
            sys.modules[file.stem] = module
            spec.loader.exec_module(module)
            return module
        return importlib.import_module(module_name)
    except ConvtoolError:
        raise
    except ModuleNotFoundError as exc:
        raise ConvtoolError(
            f"model={target!r}: cannot import {module_name!r} ({exc}); run convtool from the "
            f"folder that holds it or add that folder to PYTHONPATH",
            params=("model",),
        ) from None
    except Exception as exc:
        raise ConvtoolError(
            f"model={target!r}: importing {module_name!r} failed: {type(exc).__name__}: "
            f"{_first_line(exc)}",
            params=("model",),
        ) from None


def import_model(target: str, kwargs_json: str | None = None) -> nn.Module:
    """Build the architecture named by `model="MODULE:CALLABLE"` (and `model_kwargs`, JSON).

    MODULE is imported with the current folder on `sys.path` (or is a path to a .py file);
    CALLABLE may be dotted (`Net.small`) and must return an `nn.Module` (an `nn.Module` instance
    is used as it is).
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name.strip() or not attr.strip():
        raise ConvtoolError(
            f"`model` must be MODULE:CALLABLE, e.g. mypackage.models:make_model, got {target!r}",
            params=("model",),
        )
    kwargs = _kwargs(kwargs_json)
    obj = _import(module_name.strip(), target)
    for part in attr.strip().split("."):
        if not hasattr(obj, part):
            raise ConvtoolError(
                f"model={target!r}: {module_name!r} has no attribute {part!r}",
                params=("model",),
            )
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        if kwargs:
            raise ConvtoolError(
                f"model={target!r} is a module instance; drop `model_kwargs`",
                params=("model", "model_kwargs"),
            )
        return obj
    if not callable(obj):
        raise ConvtoolError(
            f"model={target!r} is a {type(obj).__name__}, not a callable",
            params=("model",),
        )
    try:
        model = obj(**kwargs)
    except Exception as exc:
        raise ConvtoolError(
            f"model={target!r}: calling it with {kwargs or 'no arguments'} failed: "
            f"{type(exc).__name__}: {_first_line(exc)}",
            params=("model",),
        ) from None
    if not isinstance(model, nn.Module):
        raise ConvtoolError(
            f"model={target!r} returned a {type(model).__name__}, not a torch.nn.Module",
            params=("model",),
        )
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _listing(keys: list[str], limit: int = 6) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _align_prefix(tensors: dict[str, Tensor], expected: Mapping[str, Any]) -> dict[str, Tensor]:
    """Drop a wrapper prefix ('model.', 'net.') when that makes the keys match exactly."""
    if set(tensors) == set(expected):
        return tensors
    heads = {k.split(".", 1)[0] for k in tensors}
    if len(heads) == 1 and all("." in k for k in tensors):
        cut = len(next(iter(heads))) + 1
        stripped = {k[cut:]: v for k, v in tensors.items()}
        if set(stripped) == set(expected):
            return stripped
    return tensors


def fit_state_dict(model: nn.Module, tensors: dict[str, Tensor], path: Path, target: str) -> None:
    """`model.load_state_dict(tensors, strict=True)`, or one line listing every difference."""
    expected = model.state_dict()
    tensors = _align_prefix(tensors, expected)
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    shapes = [
        f"{k} {tuple(v.shape)} in the file vs {tuple(expected[k].shape)} in the model"
        for k, v in tensors.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_listing(shapes, 3)}")
    if problems:
        raise ConvtoolError(
            f"the state_dict in {str(path)!r} does not fit model={target!r}: {'; '.join(problems)}",
            params=("model",),
        )
    floats = {v.dtype for v in tensors.values() if v.is_floating_point()}
    if len(floats) == 1:  # keep the checkpoint's precision (a float64 file stays float64)
        model.to(floats.pop())
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ConvtoolError(
            f"the state_dict in {str(path)!r} does not fit model={target!r}: {_first_line(exc)}",
            params=("model",),
        ) from None


def eager_source(path: Path, model: nn.Module, kind: str) -> Source:
    """A source for an eager model (state_dict + architecture, or an unpickled module)."""
    model.eval()
    return Source(path, kind, module_layers(model), model=model)


def load_state_dict_source(path: Path, options: SourceOptions, fmt: str) -> Source:
    """A state_dict (.pt/.pth/.safetensors/.npz) loaded into `model`'s architecture."""
    assert options.model is not None
    if fmt == "torch":
        obj = torch_load(path, allow_pickle=options.allow_pickle)
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        contents = tensors_from_object(_find_module(obj) or obj, path)
    else:
        contents = read_tensors(path)
    if isinstance(contents, Tensor):
        raise ConvtoolError(
            f"{str(path)!r} holds a single tensor, not a state_dict; drop `model` to use it as a "
            f"kernel",
            params=("model",),
        )
    model = import_model(options.model, options.model_kwargs)
    fit_state_dict(model, contents, path, options.model)
    return eager_source(path, model, "state_dict")


def _find_module(obj: Any) -> Any:
    """A module's state_dict when a checkpoint holds the module itself (or in a wrapper)."""
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        for value in obj.values():
            if isinstance(value, nn.Module):
                return value.state_dict()
    return None


def load_torch_file(path: Path, options: SourceOptions) -> Source | Any:
    """A pickled-module source, or what `torch.load` returned (tensors) for the kernel loader."""
    obj = torch_load(path, allow_pickle=options.allow_pickle)
    module = obj if isinstance(obj, nn.Module) else None
    if module is None and isinstance(obj, Mapping):
        module = next((v for v in obj.values() if isinstance(v, nn.Module)), None)
    if module is None:
        return obj
    if isinstance(module, torch.jit.ScriptModule):
        return script_source(path, module)
    return eager_source(path, module, "pickle")


# ---------------------------------------------------------------------------------- TorchScript
def load_torchscript(path: Path, *, allow_pickle: bool = False) -> Source:
    """A TorchScript archive (`torch.jit.save`).

    Loading runs the archive's `__setstate__` code and convtool later runs its forward, so unless
    the user trusts the file (`allow_pickle`), code that calls file-touching operators is refused
    before loading and the loaded graphs are audited (:mod:`convtool.io.untrusted_ops`). The
    bytes checked are the bytes loaded.
    """
    data = read_bytes(path)
    if not allow_pickle:
        check_script_code(data, path)
    try:
        with quiet():  # torch's deprecation notice for TorchScript is not the user's problem
            model = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as exc:
        raise ConvtoolError(
            f"cannot read {str(path)!r} as a TorchScript archive (truncated?): {_first_line(exc)}"
        ) from None
    if not allow_pickle:
        audit_script_module(model, path)
    return script_source(path, model)


def script_source(path: Path, model: torch.jit.ScriptModule) -> Source:
    """A source for a scripted model."""
    model.eval()
    return Source(path, "torchscript", script_layers(model, path), model=model)


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


# ---------------------------------------------------------------------------------- export
def load_export(path: Path, *, allow_pickle: bool = False) -> Source:
    """A torch.export program (`torch.export.save`, .pt2), loaded without unpickling anything
    beyond `weights_only=True` unless `allow_pickle` (see :mod:`convtool.io.export_archive`)."""
    program = load_program(path, allow_pickle=allow_pickle)
    return program_source(path, program, "export")


def program_source(path: Path, program: Any, kind: str) -> Source:
    """A source whose model is the mirror of an ExportedProgram (see module docstring)."""
    mirror, layers, notes = export_mirror(program)
    source = Source(path, kind, layers, model=mirror, notes=notes, program=program)
    shapes = [
        tuple(n.meta["val"].shape)
        for n in program.graph.nodes
        if n.op == "placeholder"
        and n.name in program.graph_signature.user_inputs
        and isinstance(n.meta.get("val"), Tensor)
    ]
    if len(shapes) == 1:
        source.example_shape = shapes[0]
        source.traced_shape = shapes[0]
    return source


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
        name, replace_owner = _module_name(gm, weight_node.target, used)
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
