"""Train the digits CNN on synthetic digits and write the `digits_cnn.*` samples.

Digits are 5x7 glyph bitmaps, scaled to 10x14, placed at a random offset in a 16x16 image,
with random pixel flips and Gaussian noise. A few hundred Adam steps (about 10 s on one CPU
core) reach ~99% accuracy on fresh samples. Deterministic: fixed seeds, one thread.

Run from the repository root: `python samples/make_digits_cnn.py` (writes into samples/).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from digits_model import INPUT_SHAPE, make_model  # noqa: E402

GLYPHS = [
    ["01110", "10001", "10011", "10101", "11001", "10001", "01110"],
    ["00100", "01100", "00100", "00100", "00100", "00100", "01110"],
    ["01110", "10001", "00001", "00010", "00100", "01000", "11111"],
    ["11111", "00010", "00100", "00010", "00001", "10001", "01110"],
    ["00010", "00110", "01010", "10010", "11111", "00010", "00010"],
    ["11111", "10000", "11110", "00001", "00001", "10001", "01110"],
    ["00110", "01000", "10000", "11110", "10001", "10001", "01110"],
    ["11111", "00001", "00010", "00100", "01000", "01000", "01000"],
    ["01110", "10001", "10001", "01110", "10001", "10001", "01110"],
    ["01110", "10001", "10001", "01111", "00001", "00010", "01100"],
]
BITMAPS = torch.tensor([[[int(c) for c in row] for row in g] for g in GLYPHS], dtype=torch.float32)
BIG = BITMAPS.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # (10, 14, 10)


def digits(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` noisy digit images `(n, 1, 16, 16)` in [about -1, 2] and their labels `(n,)`."""
    labels = torch.randint(0, 10, (n,), generator=generator)
    images = torch.zeros(n, 1, 16, 16)
    dy = torch.randint(0, 3, (n,), generator=generator)
    dx = torch.randint(0, 7, (n,), generator=generator)
    for i in range(n):
        y, x = int(dy[i]), int(dx[i])
        images[i, 0, y : y + 14, x : x + 10] = BIG[labels[i]]
    flips = torch.rand(images.shape, generator=generator) < 0.05
    images = torch.where(flips, 1 - images, images)
    images = images + 0.3 * torch.randn(images.shape, generator=generator)
    return images, labels


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    started = time.perf_counter()
    model.train()
    for step in range(300):
        x, y = digits(64, g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    model.eval()
    x, y = digits(1000, torch.Generator().manual_seed(1))
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    print(
        f"trained in {time.perf_counter() - started:.1f} s; accuracy on 1000 fresh digits: "
        f"{accuracy:.1%}"
    )

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, HERE / "digits_cnn.pt")
    save_file(state, str(HERE / "digits_cnn.safetensors"))
    torch.jit.script(model).save(str(HERE / "digits_cnn.torchscript.pt"))
    example = torch.zeros(INPUT_SHAPE)
    torch.export.save(torch.export.export(model, (example,)), str(HERE / "digits_cnn.pt2"))
    for name in (
        "digits_cnn.pt",
        "digits_cnn.safetensors",
        "digits_cnn.torchscript.pt",
        "digits_cnn.pt2",
    ):
        print(f"wrote samples/{name} ({(HERE / name).stat().st_size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
