"""convtool: the exact linear-algebra equivalents of PyTorch convolution layers.

Every form is the same linear map `y = T x + b` for one sample `x` of shape `(C_in, *spatial)`
flattened in C order:

- :func:`toeplitz` / :func:`toeplitz_from_weight`: the matrix `T` (dense or torch sparse), and
  :func:`bias_vector` for `b`;
- :func:`to_locally_connected` / :class:`LocallyConnected2d` (1d, 3d): one kernel per output
  position; :func:`to_fully_connected` / :class:`FullyConnected`: `T` as a layer;
- :func:`convert_model`: every conv of a model replaced; :func:`count_params`: what each form
  costs; :func:`verify`: numerical proof that each form equals the conv;
- :func:`toeplitz` with `rows=mask` / :func:`region_rows`: only chosen output positions' rows;
  :class:`RegionConv`: the conv computed only there; :func:`channel_sum_conv`.

Importing convtool does not import typer or rich (only the CLI does).
"""

from convtool.compare import Comparison, Tolerance, compare
from convtool.convert import to_fully_connected, to_locally_connected
from convtool.converted import load_converted
from convtool.errors import ConvtoolError
from convtool.forms import Form, ModelTarget, Target
from convtool.layers import (
    FullyConnected,
    LocallyConnected1d,
    LocallyConnected2d,
    LocallyConnected3d,
)
from convtool.matrices import bias_vector, toeplitz, toeplitz_from_weight
from convtool.models import FunctionalConvWarning, convert_model
from convtool.operators import ConvOperator, Spectrum, linear_operator, spectrum
from convtool.params import LayerCounts, ParamReport, Totals, count_params
from convtool.region import RegionConv, channel_sum_conv, region_rows
from convtool.spec import ConvSpec
from convtool.verification import FormCheck, VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "Comparison",
    "ConvOperator",
    "ConvSpec",
    "ConvtoolError",
    "Form",
    "FormCheck",
    "FullyConnected",
    "FunctionalConvWarning",
    "LayerCounts",
    "LocallyConnected1d",
    "LocallyConnected2d",
    "LocallyConnected3d",
    "ModelTarget",
    "ParamReport",
    "RegionConv",
    "Spectrum",
    "Target",
    "Tolerance",
    "Totals",
    "VerifyReport",
    "__version__",
    "bias_vector",
    "channel_sum_conv",
    "compare",
    "convert_model",
    "count_params",
    "linear_operator",
    "load_converted",
    "region_rows",
    "spectrum",
    "to_fully_connected",
    "to_locally_connected",
    "toeplitz",
    "toeplitz_from_weight",
    "verify",
]
