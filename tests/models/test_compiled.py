"""The compiled exact likelihood (models/compiled.py): padding, equality with eager, when it is used."""

from __future__ import annotations

import pytest
import torch

from models.compiled import CompiledLogProb, padded_size, padded_sizes
from models.pixelcnn import PixelCNN, PixelCNNConfig


def tiny_model(n_classes: int | None = None) -> PixelCNN:
    torch.manual_seed(0)
    cfg = PixelCNNConfig(
        in_channels=1, height=4, width=5, levels=8, hidden=4, n_blocks=1, first_kernel=3, kernel=3, out_hidden=8,
        n_classes=n_classes,
    )  # fmt: skip
    model = PixelCNN(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # biases too: nothing trivially zero
    return model.eval()


def test_batches_pad_to_the_next_power_of_two() -> None:
    assert [padded_size(n) for n in (1, 2, 3, 4, 5, 31, 32, 33)] == [1, 2, 4, 4, 8, 32, 32, 64]
    assert padded_sizes(1) == [1]
    assert padded_sizes(5) == [1, 2, 4, 8]
    assert padded_sizes(32) == [1, 2, 4, 8, 16, 32]


def test_padding_drops_the_padded_rows_and_passes_labels() -> None:
    seen: list[tuple[int, ...]] = []

    def fn(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        seen.append((x.shape[0], -1 if y is None else int(y.shape[0])))
        return x.float() + (0 if y is None else y.view(-1, 1, 1, 1).float())

    compiled = CompiledLogProb(fn)
    compiled.compiled = fn  # the padding alone, without compiling
    x = torch.arange(3 * 2 * 2, dtype=torch.uint8).view(3, 1, 2, 2)
    out = compiled(x, torch.tensor([1, 2, 3]))
    assert seen == [(4, 4)]
    assert torch.equal(out, x.float() + torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1))
    assert compiled.sizes_run == {4}
    assert compiled(x[:0]).shape == (0, 1, 2, 2)


@pytest.mark.parametrize("n_classes", [None, 3])
def test_compiled_likelihood_equals_eager_and_is_used_only_for_inference(n_classes: int | None) -> None:
    model = tiny_model(n_classes)
    x = torch.randint(0, 8, (3, 1, 4, 5), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    y = torch.tensor([0, 2, 1]) if n_classes else None
    with torch.no_grad():
        eager = model.pixel_log_prob(x, y)
    model.prepare_for_inference(compile=True)
    assert model.fast is None  # compile replaces the CPU fast forward
    compiled = model.compiled_log_prob
    assert compiled is not None
    assert model.warmup_batch_sizes(5) == [1, 2, 4, 8]
    with torch.no_grad():
        out = model.pixel_log_prob(x, y)
    assert compiled.sizes_run == {4}
    assert out.shape == eager.shape
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    model.pixel_log_prob(x, y).sum()  # with gradients: the eager module, not the graph
    model.train()
    with torch.no_grad():
        model.pixel_log_prob(x[:1], y[:1] if y is not None else None)
    assert compiled.sizes_run == {4}


def test_without_compile_one_warmup_pass_and_no_graph() -> None:
    model = tiny_model()
    model.prepare_for_inference()
    assert model.compiled_log_prob is None
    assert model.warmup_batch_sizes(32) == [1]
