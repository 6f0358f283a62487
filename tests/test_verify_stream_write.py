"""The streaming .safetensors writer of converted models: what `safetensors` itself reads back
(dense of every dtype, CSR and COO as indices/values) equals what was written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from convtool.io.model_files import read_converted, write_state_dict

META = {"format": "convtool-converted-model", "to": "fc", "sparse": True, "layers": []}


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(6, 5, generator=g)
    dense[dense.abs() < 0.8] = 0
    return {
        "w32": torch.randn(3, 4, generator=g),
        "w64": torch.randn(2, dtype=torch.float64, generator=g),
        "count": torch.tensor(7),
        "empty": torch.zeros(0, 3),
        "half": torch.randn(5, generator=g).to(torch.bfloat16),
        "csr": dense.to_sparse_csr(),
        "coo": dense.t().to_sparse_coo().coalesce(),
    }


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"m{suffix}"
    state = _state()
    write_state_dict(path, state, META)
    back, meta = read_converted(path)
    assert meta["to"] == "fc" and set(back) == set(state)
    for key, t in state.items():
        assert back[key].layout == t.layout and back[key].dtype == t.dtype, key
        assert torch.equal(back[key].to_dense(), t.to_dense()), key


def test_safetensors_library_reads_the_streamed_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    state = _state()
    write_state_dict(path, state, META)
    flat = load_file(str(path))
    assert torch.equal(flat["w32"], state["w32"]) and torch.equal(flat["count"], state["count"])
    coo = state["csr"].to_sparse_coo().coalesce()
    assert torch.equal(flat["csr.__indices__"], coo.indices())
    assert torch.equal(flat["csr.__values__"], coo.values())
    with safe_open(str(path), framework="pt") as f:
        assert "convtool" in (f.metadata() or {})
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert header % 8 == 0  # tensor data starts aligned
