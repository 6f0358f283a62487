"""The one vocabulary for the forms convtool builds, compares and counts.

A *target* is what a caller asks for (`to='lc'`); a *form* is one concrete representation that a
report names (`fc_sparse`). Both are `StrEnum`s, so a member equals its string value
(`Form.FC_SPARSE == 'fc_sparse'`), JSON writes the plain string, and the CLI lists the values in
`--help`. Per-form JSON fields of `count-params` are `<form>_<what>` (`fc_sparse_bytes`).
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

from convtool.errors import ConvtoolError

__all__ = ["Form", "ModelTarget", "Target", "fc_form", "forms_of", "model_forms_of", "parse"]


class Target(StrEnum):
    """What `verify(to=...)` checks: the product `T @ x + b`, the LC or FC module, or all."""

    TOEPLITZ = "toeplitz"
    LC = "lc"
    FC = "fc"
    ALL = "all"


class ModelTarget(StrEnum):
    """What a model's convs can be converted to (`convert_model(to=...)`): a subset of Target."""

    LC = "lc"
    FC = "fc"


class Form(StrEnum):
    """One concrete representation of a conv layer."""

    CONV = "conv"
    ONNX_NODE = "onnx_node"  # an ONNX node run alone by onnxruntime (an ONNX source's oracle)
    TOEPLITZ_DENSE = "toeplitz_dense"
    TOEPLITZ_SPARSE = "toeplitz_sparse"
    TOEPLITZ_SAMPLED = "toeplitz_sampled"  # chosen rows of T, when all of T is too big
    LC = "lc"
    FC_DENSE = "fc_dense"
    FC_SPARSE = "fc_sparse"


_FORMS: dict[str, tuple[Form, ...]] = {
    Target.TOEPLITZ: (Form.TOEPLITZ_DENSE, Form.TOEPLITZ_SPARSE),
    Target.LC: (Form.LC,),
    Target.FC: (Form.FC_DENSE, Form.FC_SPARSE),
}


E = TypeVar("E", bound=StrEnum)


def parse(value: str | E, kind: type[E], param: str = "to") -> E:
    """`value` as a member of `kind` (case-insensitive), or a ConvtoolError naming `param`."""
    if isinstance(value, kind):
        return value
    text = str(value).strip().lower()
    try:
        return kind(text)
    except ValueError:
        names = [repr(m.value) for m in kind]
        allowed = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
        raise ConvtoolError(
            f"`{param}` must be {allowed}, got {value!r}", params=(param,)
        ) from None


def forms_of(to: str | Target) -> tuple[Form, ...]:
    """Per-layer forms that `to` covers, in report order."""
    target = parse(to, Target)
    chosen = (Target.TOEPLITZ, Target.LC, Target.FC) if target is Target.ALL else (target,)
    return tuple(f for t in chosen for f in _FORMS[t])


def model_forms_of(to: str | Target) -> tuple[Form, ...]:
    """Whole-model forms that `to` covers (a model has no single product `T @ x`)."""
    return tuple(f for f in forms_of(to) if f in (Form.LC, Form.FC_DENSE, Form.FC_SPARSE))


def model_target(to: str | ModelTarget, sparse: bool) -> ModelTarget:
    """`to` for a model conversion, checked against `sparse` (only the FC form is sparse)."""
    target = parse(to, ModelTarget)
    if sparse and target is not ModelTarget.FC:
        raise ConvtoolError(
            "sparse=True applies to the fully-connected form: use to='fc'", params=("sparse", "to")
        )
    return target


def fc_form(sparse: bool) -> Form:
    """The FC form stored dense or sparse."""
    return Form.FC_SPARSE if sparse else Form.FC_DENSE
