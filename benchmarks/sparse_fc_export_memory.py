"""Memory of the exportable sparse FullyConnected form: bytes per non-zero, COO and CSR.

Counts every distinct storage a sparse `FullyConnected` holds (the sparse `T` and the index
buffers its export path reads), divided by the number of non-zeros. Before the exportable form
a layer held `T` only; `.pt2` export then built a SparseLinearMap with its own copy of the
rows, columns and values (20 bytes per float32 non-zero, for the duration of the export).
CSR keeps one extra int32 row index per non-zero; COO buffers alias `T` (no extra bytes).

Run: `python benchmarks/sparse_fc_export_memory.py`
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from convtool.convert import to_fully_connected


def storages(t: Tensor) -> list[Tensor]:
    if t.layout == torch.sparse_coo:
        return [t.indices(), t.values()]
    if t.layout == torch.sparse_csr:
        return [t.crow_indices(), t.col_indices(), t.values()]
    return [t]


def nbytes(tensors: list[Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def main() -> None:
    conv = nn.Conv2d(16, 32, 3, padding=1)
    for layout in ("coo", "csr"):
        fc = to_fully_connected(conv, (16, 32, 32), sparse=True, layout=layout)  # type: ignore[arg-type]
        nnz = fc.weight.values().numel()
        own = storages(fc.weight)
        before = nbytes(own)
        after = nbytes([*own, fc._rows, fc._cols, fc._values])
        print(
            f"{layout}: nnz={nnz}  T alone {before / nnz:.2f} B/nnz  "
            f"T + export buffers {after / nnz:.2f} B/nnz  ratio {after / before:.3f}"
        )


if __name__ == "__main__":
    main()
