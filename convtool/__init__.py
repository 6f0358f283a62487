"""convtool: the exact linear-algebra equivalents of PyTorch convolution layers.

Every form is the same linear map `y = T x + b` for one sample `x` of shape `(C_in, *spatial)`
flattened in C order. See README.md.
"""

from convtool.errors import ConvtoolError
from convtool.spec import ConvSpec
from convtool.toeplitz import bias_vector, toeplitz, toeplitz_from_weight

__version__ = "0.1.0"

__all__ = [
    "ConvSpec",
    "ConvtoolError",
    "__version__",
    "bias_vector",
    "toeplitz",
    "toeplitz_from_weight",
]
