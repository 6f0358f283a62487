"""Record the input shape every conv of a model sees, by running it once on a zero input."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from convtool.errors import ConvtoolError
from convtool.spec import ConvSpec, is_conv


def conv_input_shapes(
    model: nn.Module, example_input: torch.Tensor | Sequence[int]
) -> dict[str, tuple[int, ...]]:
    """`{module name: one-sample input shape (C_in, *spatial)}` for every conv `model` calls.

    Hooks see what the conv really receives, so pads, pooling and reshapes done between layers
    (functional or not) are accounted for. A conv called several times must see one shape.

    Args:
        model: any module; it is run once in eval mode under `torch.no_grad()` and its
            train/eval state is restored.
        example_input: a tensor `(N, C, *spatial)`, or its shape (a zero tensor is used).
    """
    if isinstance(example_input, torch.Tensor):
        x = example_input
    else:
        shape = tuple(int(s) for s in example_input)
        if not shape or any(s <= 0 for s in shape):
            raise ConvtoolError(f"example input shape must be positive ints, got {shape}")
        param = next(model.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        x = torch.zeros(shape, dtype=dtype)
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            t = args[0]
            batched = t.dim() == len(ConvSpec.from_module(module).weight_shape)
            sample = tuple(t.shape[1:]) if batched else tuple(t.shape)
            previous = shapes.setdefault(name, sample)
            if previous != sample:
                raise ConvtoolError(
                    f"conv {name!r} is called with different input shapes {previous} and "
                    f"{sample}; its matrix is not unique"
                )

        return hook

    for name, module in model.named_modules():
        if is_conv(module):
            handles.append(module.register_forward_pre_hook(record(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    except ConvtoolError:
        raise
    except Exception as exc:
        raise ConvtoolError(
            f"running the model on an input of shape {tuple(x.shape)} failed: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return shapes
