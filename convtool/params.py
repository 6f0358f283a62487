"""What each form of a conv layer costs, counted analytically: no matrix is ever built.

For one conv layer and one sample `x` of shape `(C_in, *spatial)` giving `(C_out, *out)`:

- **conv**: `weight + bias`, as PyTorch stores them.
- **LC** (locally connected): one kernel copy per output position,
  `prod(out) * C_out * C_in/groups * prod(kernel)`, plus a bias per output element
  `C_out * prod(out)` when the conv has a bias. A transposed conv has no LC form (`None`).
- **FC dense**: every entry of `T`, `rows * cols` with `rows = C_out * prod(out)` and
  `cols = C_in * prod(spatial)`, plus a bias per output element when the conv has one.
- **FC nonzero**: the structural non-zeros of `T` (taps reading zero padding removed, taps that
  a reflect/replicate/circular padding puts on one column merged), plus the bias.

Memory is `count * itemsize` of the layer's dtype; sparse FC memory is CSR with int64 indices:
`nnz * (itemsize + 8) + (rows + 1) * 8`, plus the bias.

Multiply-adds per sample (bias additions are not counted):

- conv and LC: one per (output element, input channel of its group, kernel tap) whose tap reads
  a real input value. Taps that land on *zero* padding are not counted (they multiply a constant
  zero), so for zero padding this equals the structural nnz of `T`. Taps that land on
  reflect/replicate/circular padding read a real (copied) value and are counted, so there it
  can exceed the nnz of `T`, where coinciding taps are merged into one entry.
  For a transposed conv: the (input element, tap) products that land inside the output.
- FC dense: `rows * cols`. FC sparse: `nnz` of `T`.

Model totals count tied weights once (tensors sharing storage) and keep non-conv parameters
separate, so that `original = conv + non-conv`, `lc = LC of the converted convs + the convs that
stay + non-conv`, and likewise for FC.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from convtool import sizes
from convtool.errors import ConvtoolError
from convtool.forms import Form
from convtool.inventory import ConvLayer, capture, module_layers, select
from convtool.sizes import structural_nnz, tap_count
from convtool.spec import ConvSpec, as_shape, is_conv

FORMS = (Form.CONV, Form.LC, Form.FC_DENSE, Form.FC_SPARSE)

NO_LC_TRANSPOSED = "no locally-connected form exists for a transposed conv"


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _ratio(num: int | None, den: int) -> float | None:
    return None if num is None or den == 0 else num / den


# ---------------------------------------------------------------------------- one layer
@dataclass(frozen=True)
class LayerCounts:
    """Parameters, memory and multiply-adds of one conv layer in each form.

    Counts that need the input shape are None when it is unknown; `lc_*` are None for a
    transposed conv. `notes` says why a count is missing.

    Attributes:
        name: module path ('features.0') or kernel file stem.
        type: PyTorch class name, e.g. 'Conv2d'.
        spec: the layer's hyperparameters, e.g. 'Conv2d(3, 16, kernel_size=(3, 3), ...)'.
        dtype / itemsize: the dtype of the weight, and bytes per element.
        input_shape / output_shape: one sample `(C_in, *spatial)` / `(C_out, *out)`.
        matrix_shape: `(rows, cols)` of `T`.
        conv_params / lc_params / fc_params / fc_nonzero: see the module docstring; bias included.
        conv_macs / lc_macs / fc_dense_macs / fc_sparse_macs: multiply-adds per sample.
        has_bias: whether the layer (and so its LC/FC forms) has a bias.
        shared_with: name of an earlier entry that is this very module (counted once).
        tied_to: name of an earlier layer whose weight this layer's weight shares.
        notes: why some counts are missing, and anything else worth knowing.
    """

    name: str
    type: str
    spec: str
    dtype: str
    itemsize: int
    has_bias: bool
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    matrix_shape: tuple[int, int] | None
    conv_params: int
    lc_params: int | None
    fc_params: int | None
    fc_nonzero: int | None
    conv_macs: int | None
    lc_macs: int | None
    fc_dense_macs: int | None
    fc_sparse_macs: int | None
    shared_with: str | None = None
    tied_to: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def lc_ratio(self) -> float | None:
        """LC parameters / conv parameters."""
        return _ratio(self.lc_params, self.conv_params)

    @property
    def fc_ratio(self) -> float | None:
        """Dense FC parameters / conv parameters."""
        return _ratio(self.fc_params, self.conv_params)

    @property
    def fc_nonzero_ratio(self) -> float | None:
        """FC nonzeros / conv parameters."""
        return _ratio(self.fc_nonzero, self.conv_params)

    @property
    def bias_elements(self) -> int | None:
        """Bias entries of the LC/FC forms: `C_out * prod(out)`, 0 without a bias."""
        if self.matrix_shape is None:
            return None
        return self.matrix_shape[0] if self.has_bias else 0

    @property
    def conv_bytes(self) -> int:
        return self.conv_params * self.itemsize

    @property
    def lc_bytes(self) -> int | None:
        return None if self.lc_params is None else self.lc_params * self.itemsize

    @property
    def fc_dense_bytes(self) -> int | None:
        return None if self.fc_params is None else self.fc_params * self.itemsize

    @property
    def fc_sparse_bytes(self) -> int | None:
        """CSR values + int64 column indices + int64 row pointers, plus the dense bias."""
        if self.matrix_shape is None or self.fc_sparse_macs is None:
            return None
        nnz, rows = self.fc_sparse_macs, self.matrix_shape[0]
        bias = self.bias_elements or 0
        return sizes.csr_bytes(nnz, rows, self.itemsize) + bias * self.itemsize

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict: exact integers, shapes as lists, None for unknown."""
        return {
            "name": self.name,
            "type": self.type,
            "spec": self.spec,
            "dtype": self.dtype,
            "input_shape": _list(self.input_shape),
            "output_shape": _list(self.output_shape),
            "matrix_shape": _list(self.matrix_shape),
            "bias": self.has_bias,
            "conv_params": self.conv_params,
            "lc_params": self.lc_params,
            "fc_params": self.fc_params,
            "fc_nonzero": self.fc_nonzero,
            "lc_ratio": self.lc_ratio,
            "fc_ratio": self.fc_ratio,
            "fc_nonzero_ratio": self.fc_nonzero_ratio,
            "conv_bytes": self.conv_bytes,
            "lc_bytes": self.lc_bytes,
            "fc_dense_bytes": self.fc_dense_bytes,
            "fc_sparse_bytes": self.fc_sparse_bytes,
            "conv_macs": self.conv_macs,
            "lc_macs": self.lc_macs,
            "fc_dense_macs": self.fc_dense_macs,
            "fc_sparse_macs": self.fc_sparse_macs,
            "shared_with": self.shared_with,
            "tied_to": self.tied_to,
            "notes": list(self.notes),
        }


def _list(shape: Sequence[int] | None) -> list[int] | None:
    return None if shape is None else [int(s) for s in shape]


def layer_counts(
    spec: ConvSpec,
    input_shape: Sequence[int] | None = None,
    *,
    name: str = "conv",
    dtype: torch.dtype = torch.float32,
    missing: str | None = None,
) -> LayerCounts:
    """Count every form of one conv layer (O(sum of out_size * kernel_size) work).

    Args:
        spec: the layer's hyperparameters (`spec.bias` says whether it has a bias).
        input_shape: one sample `(C_in, *spatial)` (a leading batch is accepted), or None to
            count the conv only.
        name: how the layer is called in the report.
        dtype: the weight's dtype, for the byte counts.
        missing: the note to attach when `input_shape` is None (default: a generic one).

    Returns:
        The counts; shape-dependent ones are None without `input_shape`.

    Raises:
        ConvtoolError: the input shape does not fit the layer.
    """
    weight = math.prod(spec.weight_shape)
    bias = spec.out_channels if spec.bias else 0
    notes: list[str] = []
    if spec.transposed:
        notes.append(NO_LC_TRANSPOSED)
    base: dict[str, Any] = {
        "name": name,
        "type": spec.kind,
        "spec": spec.describe(),
        "dtype": _dtype_name(dtype),
        "itemsize": _itemsize(dtype),
        "has_bias": spec.bias,
        "conv_params": weight + bias,
    }
    if input_shape is None:
        notes.insert(0, missing or "input shape unknown: only the conv form is counted")
        return LayerCounts(
            **base,
            input_shape=None,
            output_shape=None,
            matrix_shape=None,
            lc_params=None,
            fc_params=None,
            fc_nonzero=None,
            conv_macs=None,
            lc_macs=None,
            fc_dense_macs=None,
            fc_sparse_macs=None,
            notes=tuple(notes),
        )
    sample = spec.sample_shape(input_shape)
    out = spec.output_shape(sample)
    rows, cols = math.prod(out), math.prod(sample)
    positions = math.prod(out[1:])
    out_bias = rows if spec.bias else 0
    nnz = structural_nnz(spec, sample)
    macs = tap_count(spec, sample)
    lc = None if spec.transposed else positions * weight + out_bias
    return LayerCounts(
        **base,
        input_shape=sample,
        output_shape=out,
        matrix_shape=(rows, cols),
        lc_params=lc,
        fc_params=rows * cols + out_bias,
        fc_nonzero=nnz + out_bias,
        conv_macs=macs,
        lc_macs=None if spec.transposed else macs,
        fc_dense_macs=rows * cols,
        fc_sparse_macs=nnz,
        notes=tuple(notes),
    )


# ---------------------------------------------------------------------------- many layers
class ConvLike(Protocol):
    """What :func:`count_layers` needs of a layer (`convtool.source.ConvLayer` fits)."""

    @property
    def name(self) -> str: ...

    @property
    def spec(self) -> ConvSpec: ...

    @property
    def weight(self) -> Tensor: ...

    @property
    def bias(self) -> Tensor | None: ...

    @property
    def input_shape(self) -> tuple[int, ...] | None: ...

    @property
    def module(self) -> nn.Module | None: ...


@dataclass(frozen=True)
class Totals:
    """Model totals in each form; tied weights count once.

    `original_params = conv_params + non_conv_params`. The other `*_params` are the totals of
    the model after converting the listed layers (all of them unless a pattern picked some):
    `lc_params` = their LC parameters + the conv layers that stay (unlisted ones, and transposed
    ones, which have no LC form) + the non-conv parameters; `fc_params` with dense FC layers;
    `fc_nonzero` with sparse FC layers (stored nonzeros). `*_bytes` likewise, in each tensor's
    dtype. `*_macs` are the conv layers' multiply-adds per sample in that model (other
    operations are not counted). A value is None when some count it needs is unknown.
    """

    layers: int
    converted: int
    conv_params: int
    non_conv_params: int | None
    original_params: int | None
    lc_params: int | None
    fc_params: int | None
    fc_nonzero: int | None
    original_bytes: int | None
    lc_bytes: int | None
    fc_dense_bytes: int | None
    fc_sparse_bytes: int | None
    conv_macs: int | None
    lc_macs: int | None
    fc_dense_macs: int | None
    fc_sparse_macs: int | None

    @property
    def lc_ratio(self) -> float | None:
        return (
            None if self.original_params is None else _ratio(self.lc_params, self.original_params)
        )

    @property
    def fc_ratio(self) -> float | None:
        return (
            None if self.original_params is None else _ratio(self.fc_params, self.original_params)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "converted": self.converted,
            "conv_params": self.conv_params,
            "non_conv_params": self.non_conv_params,
            "original_params": self.original_params,
            "lc_params": self.lc_params,
            "fc_params": self.fc_params,
            "fc_nonzero": self.fc_nonzero,
            "lc_ratio": self.lc_ratio,
            "fc_ratio": self.fc_ratio,
            "original_bytes": self.original_bytes,
            "lc_bytes": self.lc_bytes,
            "fc_dense_bytes": self.fc_dense_bytes,
            "fc_sparse_bytes": self.fc_sparse_bytes,
            "conv_macs": self.conv_macs,
            "lc_macs": self.lc_macs,
            "fc_dense_macs": self.fc_dense_macs,
            "fc_sparse_macs": self.fc_sparse_macs,
        }


@dataclass(frozen=True)
class ParamReport:
    """Counts of every listed conv layer and of the whole model, in each form.

    Attributes:
        layers: the listed layers, in model order.
        total: model totals (see :class:`Totals`).
        example_input_shape: the input the shapes were traced with (None if not traced).
        notes: report-wide remarks (missing shapes, layers not called by forward, ...).
    """

    layers: tuple[LayerCounts, ...]
    total: Totals
    example_input_shape: tuple[int, ...] | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "example_input_shape": _list(self.example_input_shape),
            "layers": [layer.to_dict() for layer in self.layers],
            "total": self.total.to_dict(),
            "notes": list(self.notes),
        }


def _key(t: Tensor) -> Hashable:
    """Identity of a tensor's memory: equal for tied weights (same storage, offset and view)."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        ptr = 0
    if ptr == 0:  # meta or empty tensors have no memory to share; fall back to the object
        return ("id", id(t))
    return (t.device.type, ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def _tensors(layer: ConvLike) -> list[Tensor]:
    """The tensors a conv layer holds: its module's own parameters, else weight and bias."""
    owner = _owner(layer)
    if owner is not None:
        own: list[Tensor] = list(owner.parameters(recurse=False))
        if own:
            return own
    return [t for t in (layer.weight, layer.bias) if t is not None]


def _unique_sum(tensors: Iterable[Tensor], exclude: set[Hashable] | None = None) -> tuple[int, int]:
    """(elements, bytes) of the distinct tensors, skipping keys in `exclude`."""
    seen: set[Hashable] = set(exclude or ())
    count = nbytes = 0
    for t in tensors:
        key = _key(t)
        if key in seen:
            continue
        seen.add(key)
        count += t.numel()
        nbytes += t.numel() * t.element_size()
    return count, nbytes


def _picked(names: Sequence[str], pattern: str | None) -> list[bool]:
    """Which names a layer pattern picks (:func:`convtool.inventory.select`)."""
    chosen = set(select(names, pattern))
    return [n in chosen for n in names]


def _owner(layer: ConvLike) -> nn.Module | None:
    """The conv module whose own parameters are the layer's (None for a functional call)."""
    return layer.module if getattr(layer, "call", "module") in ("module", "script") else None


def _sum(values: Iterable[int | None]) -> int | None:
    total = 0
    for v in values:
        if v is None:
            return None
        total += v
    return total


def count_layers(
    layers: Sequence[ConvLike],
    *,
    model: nn.Module | None = None,
    input_shapes: Mapping[str, tuple[int, ...] | None] | None = None,
    pattern: str | None = None,
    non_conv_known: bool = True,
    example_input_shape: Sequence[int] | None = None,
    missing: Mapping[str, str] | None = None,
    notes: Sequence[str] = (),
) -> ParamReport:
    """Count every form of `layers` and the model they belong to.

    Args:
        layers: the model's conv layers in order (all of them, also when `pattern` lists some).
        model: the model, for its non-conv parameters; None when there is none (a kernel).
        input_shapes: one-sample input shape per layer name, overriding `layer.input_shape`.
        pattern: `--layers` globs: the layers listed and converted in the totals.
        non_conv_known: False when the layers come from a model that is not available, so the
            non-conv parameters (and the model totals) are unknown.
        example_input_shape: the example input the shapes came from, for the report.
        missing: per layer name, why its input shape is unknown (the note to show).
        notes: report-wide notes to carry.

    Returns:
        The report; tied weights count once in the totals.
    """
    picked = _picked([layer.name for layer in layers], pattern)
    shapes = dict(input_shapes or {})
    first_module: dict[int, str] = {}
    first_key: dict[Hashable, str] = {}
    counts: list[LayerCounts] = []
    for layer in layers:
        shape = shapes.get(layer.name, layer.input_shape)
        c = layer_counts(
            layer.spec,
            shape,
            name=layer.name,
            dtype=layer.weight.dtype,
            missing=(missing or {}).get(layer.name),
        )
        owner = _owner(layer)
        shared = first_module.get(id(owner)) if owner is not None else None
        tied = None if shared else first_key.get(_key(layer.weight))
        extra = []
        if shared:
            extra.append(f"same module as {shared!r}: counted once in the totals")
        if tied:
            extra.append(f"weight tied to {tied!r}: its conv parameters count once in the totals")
        if shared or tied:
            c = replace(c, shared_with=shared, tied_to=tied, notes=(*c.notes, *extra))
        if owner is not None:
            first_module.setdefault(id(owner), layer.name)
        first_key.setdefault(_key(layer.weight), layer.name)
        counts.append(c)
    total = _totals(layers, counts, picked, model, non_conv_known)
    listed = tuple(c for c, p in zip(counts, picked, strict=True) if p)
    report_notes = list(notes)
    unknown = sum(1 for c in listed if c.input_shape is None)
    if unknown:
        report_notes.append(
            f"{unknown} of {len(listed)} layer(s) have no input shape: their LC/FC counts and "
            f"the totals that need them are unknown"
        )
    transposed = sum(1 for c in listed if c.type.startswith("ConvTranspose"))
    if transposed:
        report_notes.append(
            f"{transposed} transposed conv(s) have no LC form: the LC model total keeps them as "
            f"convs (leave them out when converting a model to LC)"
        )
    if not non_conv_known:
        report_notes.append("the model itself is not available: non-conv parameters are unknown")
    return ParamReport(
        layers=listed,
        total=total,
        example_input_shape=None if example_input_shape is None else tuple(example_input_shape),
        notes=tuple(report_notes),
    )


def _totals(
    layers: Sequence[ConvLike],
    counts: Sequence[LayerCounts],
    picked: Sequence[bool],
    model: nn.Module | None,
    non_conv_known: bool,
) -> Totals:
    conv_tensors = [t for layer in layers for t in _tensors(layer)]
    conv_params, conv_bytes = _unique_sum(conv_tensors)
    non_conv: int | None = 0
    non_conv_bytes: int | None = 0
    if model is not None:
        conv_keys = {_key(t) for t in conv_tensors}
        # named_parameters already drops repeats of one Parameter; _unique_sum drops tied storage
        non_conv, non_conv_bytes = _unique_sum(model.parameters(), exclude=conv_keys)
    elif not non_conv_known:
        non_conv = non_conv_bytes = None

    # Distinct modules only: a module listed twice is converted once.
    distinct = [c.shared_with is None for c in counts]

    def model_total(form: Form) -> tuple[int | None, int | None, int | None]:
        """(params, bytes, macs) of the model with the listed layers in `form`."""
        stay: list[Tensor] = []
        params: list[int | None] = []
        nbytes: list[int | None] = []
        macs: list[int | None] = []
        for layer, c, p, d in zip(layers, counts, picked, distinct, strict=True):
            converts = p and d and not (form == Form.LC and layer.spec.transposed)
            if not converts:
                if d:
                    stay.extend(_tensors(layer))
                if p and d:
                    macs.append(c.conv_macs)
                continue
            if form == Form.LC:
                params.append(c.lc_params)
                nbytes.append(c.lc_bytes)
                macs.append(c.lc_macs)
            elif form == Form.FC_DENSE:
                params.append(c.fc_params)
                nbytes.append(c.fc_dense_bytes)
                macs.append(c.fc_dense_macs)
            else:
                params.append(c.fc_nonzero)
                nbytes.append(c.fc_sparse_bytes)
                macs.append(c.fc_sparse_macs)
        kept, kept_bytes = _unique_sum(stay)
        p_sum, b_sum = _sum(params), _sum(nbytes)
        total_p = None if p_sum is None or non_conv is None else p_sum + kept + non_conv
        total_b = (
            None if b_sum is None or non_conv_bytes is None else b_sum + kept_bytes + non_conv_bytes
        )
        return total_p, total_b, _sum(macs)

    lc_p, lc_b, lc_m = model_total(Form.LC)
    fc_p, fc_b, fc_m = model_total(Form.FC_DENSE)
    sp_p, sp_b, sp_m = model_total(Form.FC_SPARSE)
    orig_macs = _sum(
        c.conv_macs for c, p, d in zip(counts, picked, distinct, strict=True) if p and d
    )
    return Totals(
        layers=sum(picked),
        converted=sum(1 for p, d in zip(picked, distinct, strict=True) if p and d),
        conv_params=conv_params,
        non_conv_params=non_conv,
        original_params=None if non_conv is None else conv_params + non_conv,
        lc_params=lc_p,
        fc_params=fc_p,
        fc_nonzero=sp_p,
        original_bytes=None if non_conv_bytes is None else conv_bytes + non_conv_bytes,
        lc_bytes=lc_b,
        fc_dense_bytes=fc_b,
        fc_sparse_bytes=sp_b,
        conv_macs=orig_macs,
        lc_macs=lc_m,
        fc_dense_macs=fc_m,
        fc_sparse_macs=sp_m,
    )


# ---------------------------------------------------------------------------- Python API
def count_params(
    model_or_conv: nn.Module,
    example_input_shape: Sequence[int] | Tensor | None = None,
    *,
    layers: str | None = None,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> ParamReport:
    """What each conv of a model (or one conv) costs as conv, LC and FC layers; builds nothing.

    Args:
        model_or_conv: a conv module (`nn.Conv*d` / `nn.ConvTranspose*d`) or any model.
        example_input_shape: for a conv, one sample `(C_in, *spatial)` (a leading batch is
            accepted); for a model, the full example input `(N, C, *spatial)` or a tensor. The
            model is run once on zeros of that shape (on the device of its parameters, so a
            model on the meta device costs nothing) to learn each conv's input shape. None
            counts the conv form only.
        layers: shell globs (comma-separated) naming the conv layers to list and convert.
        forward_kwargs: further keyword arguments of the model's forward.

    Returns:
        A :class:`ParamReport`; `report.to_dict()` is its JSON form.

    Example:
        >>> report = count_params(nn.Conv2d(3, 2, 3, bias=False), (3, 24, 24))
        >>> report.layers[0].lc_params
        26136
    """
    if not isinstance(model_or_conv, nn.Module):
        raise ConvtoolError(
            f"count_params expects an nn.Module, got {type(model_or_conv).__name__}"
        )
    if is_conv(model_or_conv):
        spec = ConvSpec.from_module(model_or_conv)
        m: Any = model_or_conv
        name = type(model_or_conv).__name__
        shape = None
        if isinstance(example_input_shape, Tensor):
            shape = tuple(example_input_shape.shape)
        elif example_input_shape is not None:
            shape = as_shape(example_input_shape)
        layer = ConvLayer(name, spec, m.weight, m.bias, shape, model_or_conv)
        return count_layers([layer], model=model_or_conv, pattern=layers)
    found = module_layers(model_or_conv)
    shapes: dict[str, tuple[int, ...] | None] = {}
    missing: dict[str, str] = {}
    example: tuple[int, ...] | None = None
    if example_input_shape is not None:
        if isinstance(example_input_shape, Tensor):
            x = example_input_shape
        else:
            example_shape = as_shape(example_input_shape, "the example input shape")
            param = next(model_or_conv.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            dtype = param.dtype if param is not None and param.is_floating_point() else None
            if not example_shape or any(s <= 0 for s in example_shape):
                raise ConvtoolError(
                    f"example input shape must be positive ints, got {example_shape}"
                )
            x = torch.zeros(example_shape, dtype=dtype or torch.float32, device=device)
        example = tuple(x.shape)
        inv = capture(model_or_conv, x, forward_kwargs)
        found = list(inv.layers)
        for layer in found:
            if layer.conflict:
                missing[layer.name] = "called with several input shapes: its matrix is not unique"
            elif layer.input_shape is None:
                missing[layer.name] = "not called by forward on the example input"
            else:
                shapes[layer.name] = layer.input_shape
    else:
        for layer in found:
            missing[layer.name] = "no example input: only the conv form is counted"
    if not found:
        raise ConvtoolError(
            f"{type(model_or_conv).__name__} has no conv layers to count (functional conv "
            f"calls are found by running it: give example_input_shape=)"
        )
    return count_layers(
        found,
        model=model_or_conv,
        input_shapes=shapes,
        pattern=layers,
        example_input_shape=example,
        missing=missing,
    )


# ---------------------------------------------------------------------------- regions
@dataclass(frozen=True)
class RegionCounts:
    """The region form of one conv: the rows of `T` at chosen output positions only.

    Counted from per-axis tables summed over the mask (see :func:`convtool.region.region_counts`):
    no matrix is built.

    Attributes:
        positions / total_positions: selected and all output positions.
        rows / cols: shape of the region matrix (`C_out * positions`, `C_in * prod(spatial)`).
        nnz: its structural non-zeros; macs: multiply-adds of one sample at the region (taps
            reading a real value), against `full_macs` for the whole conv.
        itemsize: bytes per value of the layer's dtype.
    """

    name: str
    positions: int
    total_positions: int
    rows: int
    cols: int
    nnz: int
    macs: int
    full_macs: int
    itemsize: int

    @property
    def dense_bytes(self) -> int:
        return sizes.dense_bytes(self.rows, self.cols, self.itemsize)

    @property
    def csr_bytes(self) -> int:
        return sizes.csr_bytes(self.nnz, self.rows, self.itemsize)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "positions": self.positions,
            "total_positions": self.total_positions,
            "matrix_shape": [self.rows, self.cols],
            "nnz": self.nnz,
            "dense_bytes": self.dense_bytes,
            "sparse_bytes": self.csr_bytes,
            "macs": self.macs,
            "full_macs": self.full_macs,
        }


def region_form_counts(
    name: str, spec: ConvSpec, input_shape: Sequence[int], mask: Any, dtype: torch.dtype
) -> RegionCounts:
    """:class:`RegionCounts` of a conv for one sample `(C_in, *spatial)` and an output mask."""
    from convtool.region import region_counts

    counts = region_counts(spec, input_shape, mask)
    out = spec.output_shape(spec.sample_shape(input_shape))
    return RegionCounts(
        name=name,
        positions=counts["positions"],
        total_positions=math.prod(out[1:]),
        rows=counts["rows"],
        cols=counts["cols"],
        nnz=counts["nnz"],
        macs=counts["macs"],
        full_macs=tap_count(spec, input_shape),
        itemsize=_itemsize(dtype),
    )
