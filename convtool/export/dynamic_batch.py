"""A fixed-batch torch.export program re-exported with a dynamic batch, when that is exact.

A `.pt2` saved at one batch size gives an ONNX graph of that batch only. Its unlifted module
often computes nothing batch-specific (convs, pools, `flatten(1)`, Linear), so it can be traced
again with the batch symbolic. That is accepted only when the new program, on a batch of two
example-sized halves, gives exactly what the original program gives on each half: a graph
with the batch baked in (`reshape(1, -1)`, batch statistics) fails the trace or the check and
keeps its fixed batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree


def guard_free(gm: nn.Module) -> nn.Module | None:
    """A twin of an unlifted torch.export module without its input guards, or None.

    `ExportedProgram.module()` checks every call's shapes (a `_guards_fn` node and a pre-hook),
    so it cannot be traced with another batch. The twin shares the parameters (no copy).
    """
    if not isinstance(gm, torch.fx.GraphModule) or not hasattr(gm, "_guards_fn"):
        return None
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            graph.erase_node(node)
    free = torch.fx.GraphModule(gm, graph)
    free.eval()
    return free


def dynamic_batch_mirror(
    reference: Callable[[Tensor], Any], free: nn.Module, example_shape: Sequence[int]
) -> Any | None:
    """`free` exported with a dynamic batch dim, or None where that is not exact.

    Args:
        reference: the fixed-batch model (guards on), run on example-sized halves.
        free: the same graph without input guards (see :func:`guard_free`).
        example_shape: the input shape `reference` takes, `(N, *sample)`.

    Returns:
        An ExportedProgram, or None (a graph that fails the trace, mixes samples, or has
        outputs that do not split along the batch).
    """
    shape = tuple(int(s) for s in example_shape)
    param = next((p for p in free.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.float32
    generator = torch.Generator().manual_seed(0)
    halves = [torch.randn(shape, generator=generator).to(dtype) for _ in range(2)]
    try:
        with torch.no_grad():
            mirror = torch.export.export(
                free, (torch.cat(halves),), dynamic_shapes=({0: torch.export.Dim("batch")},)
            )
            got = pytree.tree_leaves(mirror.module()(torch.cat(halves)))
            parts = [pytree.tree_leaves(reference(h)) for h in halves]
    except Exception:  # a baked-in batch: keep the fixed one
        return None
    if not got or len(got) != len(parts[0]):
        return None
    for i, leaf in enumerate(got):
        pieces = [p[i] for p in parts]
        if not all(isinstance(t, Tensor) and t.dim() > 0 for t in [leaf, *pieces]):
            return None
        expected = torch.cat(pieces)
        if leaf.shape != expected.shape or not torch.allclose(leaf, expected, rtol=1e-5, atol=1e-6):
            return None
    return mirror
