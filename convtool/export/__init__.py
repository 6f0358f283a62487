"""Converted models out of PyTorch: ONNX graphs, folded affine networks, NNet files.

- :mod:`convtool.export.onnx_forms`: the LC / dense FC / sparse FC forms as ONNX subgraphs
  built from standard ops only.
- :mod:`convtool.export.onnx_convs`: :func:`rewrite_onnx_convs`, every Conv node of any ONNX
  model replaced by one of those forms.
- :mod:`convtool.export.fold`: :func:`fold_onnx`, every linear stretch between ReLUs folded into
  one affine map `W x + b` (what verifiers read).
- :mod:`convtool.export.torch_onnx`: a PyTorch model (or one conv) as a plain ONNX graph.

The `onnx` package is needed only here (``pip install torch-convtool[onnx]``).
"""

from convtool.export.fold import AffineLayer, FoldedNetwork, fold_onnx, folded_to_onnx
from convtool.export.onnx_convs import rewrite_onnx_convs

__all__ = ["AffineLayer", "FoldedNetwork", "fold_onnx", "folded_to_onnx", "rewrite_onnx_convs"]
