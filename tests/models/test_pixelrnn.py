"""PixelRNN (Row LSTM): exact normalisation, causality, no blind spot with the default kernels,
the fast recurrence against a plain reference, sampling, checkpoints."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from models.base import SamplePart
from models.checkpoint import load_checkpoint, save_checkpoint
from models.layers import RowLSTMLayer, lstm_cell
from models.pixelrnn import PixelRNN, PixelRNNConfig
from models.sampling.cached import run_parts
from models.sampling.pixelrnn import sample_parts_cached
from tests.models.test_pixelcnn import all_images, dependence
from tests.models.test_sampling import stand_in_recorder


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(seed: int = 0, **overrides: Any) -> PixelRNN:
    """A tiny Row LSTM in eval mode with random weights (biases too, so nothing is trivially zero)."""
    cfg: dict[str, Any] = {
        "in_channels": 1, "height": 2, "width": 2, "levels": 3, "hidden": 5, "n_layers": 2, "out_hidden": 8,
    }  # fmt: skip
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = PixelRNN(PixelRNNConfig(**cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
            elif "cond" not in name:
                p.mul_(2.0)
    return model.eval()


# -- normalisation -------------------------------------------------------------------------------


@pytest.mark.parametrize(("c", "h", "w", "levels"), [(1, 2, 2, 3), (2, 1, 2, 3), (3, 1, 1, 4)])
def test_probabilities_of_all_images_sum_to_one(c: int, h: int, w: int, levels: int) -> None:
    model = tiny(in_channels=c, height=h, width=w, levels=levels)
    with torch.no_grad():
        total = model.log_prob(all_images(c, h, w, levels)).double().exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-4)


def test_conditional_probabilities_sum_to_one_for_every_class() -> None:
    model = tiny(n_classes=3)
    x = all_images(1, 2, 2, 3)
    with torch.no_grad():
        for label in range(3):
            y = torch.full((len(x),), label, dtype=torch.long)
            assert model.log_prob(x, y).double().exp().sum().item() == pytest.approx(1.0, abs=1e-4)


def test_pixel_log_probs_sum_to_log_prob() -> None:
    model = tiny(height=3, width=3, levels=5)
    x = torch.randint(0, 5, (4, 1, 3, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.no_grad():
        per_pixel = model.pixel_log_prob(x)
        assert per_pixel.shape == (4, 1, 3, 3) and (per_pixel <= 0).all()
        torch.testing.assert_close(model.log_prob(x), per_pixel.flatten(1).sum(1))


# -- causality -----------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_each_sub_pixel_sees_exactly_the_earlier_ones(channels: int) -> None:
    """Default (full-width) kernels: causal and no blind spot."""
    # Enough units per colour group that no input is cut off by chance by ReLUs dead at every trial.
    model = tiny(in_channels=channels, height=3, width=4, levels=4, hidden=15, out_hidden=30)
    dep = dependence(model, n_trials=6)
    later_or_self = torch.ones(model.dims, model.dims, dtype=torch.bool).triu()
    assert not (dep & later_or_self).any(), "a logit depends on its own or a later sub-pixel"
    missing = torch.nonzero(~later_or_self & ~dep).tolist()
    assert not missing, f"blind spot: (output, input) pairs in AR order with no influence: {missing[:10]}"


def test_paper_kernels_are_causal() -> None:
    """The paper's k=3 kernels see a triangle above (a blind spot is expected) but nothing later."""
    model = tiny(height=4, width=7, levels=4, input_kernel=3, state_kernel=3, n_layers=2)
    dep = dependence(model)
    later_or_self = torch.ones(model.dims, model.dims, dtype=torch.bool).triu()
    assert not (dep & later_or_self).any()
    assert (~later_or_self & ~dep).any(), "k=3 kernels leave a blind spot (the paper's triangle)"


# -- the recurrence ------------------------------------------------------------------------------


def reference_layer(layer: RowLSTMLayer, x: torch.Tensor) -> torch.Tensor:
    """The Row LSTM layer written plainly: conv1d over the row above, (B, 4h, W) per row."""
    pre = layer.input_conv(x)
    if layer.above_conv is not None:
        pre = pre + layer.above_conv(F.pad(x, (0, 0, 1, 0))[:, :, :-1])
    b, _, height, width = x.shape
    h_prev = x.new_zeros(b, layer.hidden, width)
    c_prev = x.new_zeros(b, layer.hidden, width)
    rows = []
    for i in range(height):
        k = layer.state_conv.weight.shape[-1]
        gates = pre[:, :, i] + F.conv1d(h_prev, layer.state_conv.weight, padding=k // 2)
        h_prev, c_prev = lstm_cell(gates, c_prev)
        rows.append(h_prev)
    return torch.stack(rows, dim=2)


@pytest.mark.parametrize("state_kernel", [None, 3])
def test_matrix_recurrence_equals_the_convolution(state_kernel: int | None) -> None:
    model = tiny(height=5, width=6, hidden=7, state_kernel=state_kernel)
    x = torch.rand(3, 1, 5, 6) * 2 - 1
    with torch.no_grad():
        for n, layer in enumerate(model.layers):
            inp = x if n == 0 else torch.rand(3, 7, 5, 6)
            torch.testing.assert_close(layer(inp, None), reference_layer(layer, inp), atol=1e-5, rtol=1e-5)


def test_gradients_flow_through_every_row() -> None:
    model = tiny(height=4, width=3).train()
    x = torch.randint(0, 3, (2, 1, 4, 3), dtype=torch.uint8)
    model.training_step(x).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.layers[0].state_conv.weight.grad is not None
    assert model.layers[0].state_conv.weight.grad.abs().sum() > 0


# -- sampling and checkpoints ----------------------------------------------------------------------


def test_sampling_is_reproducible_and_reports_the_model_log_prob() -> None:
    model = tiny(in_channels=2, height=2, width=3, levels=4)
    a = model.sample(6, generator=torch.Generator().manual_seed(7))
    b = model.sample(6, generator=torch.Generator().manual_seed(7))
    assert a.images.shape == (6, 2, 2, 3) and a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images)
    assert a.log_prob is not None
    with torch.no_grad():
        torch.testing.assert_close(a.log_prob, model.log_prob(a.images), rtol=0, atol=1e-4)


def test_sample_frequencies_match_the_model_probabilities() -> None:
    model = tiny(height=1, width=2, levels=3)
    n = 6000
    out = model.sample(n, generator=torch.Generator().manual_seed(0))
    codes = (out.images.view(n, 2).long() * torch.tensor([3, 1])).sum(1)
    freq = torch.bincount(codes, minlength=9).double() / n
    with torch.no_grad():
        probs = model.log_prob(all_images(1, 1, 2, 3)).double().exp()
    assert (freq - probs).abs().max() < 0.025, (freq, probs)


RNN_CASES = [
    {"in_channels": 1},
    {"in_channels": 3},
    {"in_channels": 1, "n_classes": 3},
    {"in_channels": 2, "n_classes": 4, "input_kernel": 2, "state_kernel": 3},  # the paper's narrow kernels
]


@pytest.mark.parametrize("overrides", RNN_CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_sampler_draws_the_same_images_as_naive(overrides: dict[str, Any], seed: int) -> None:
    model = tiny(height=4, width=5, levels=6, **overrides)
    n_classes = overrides.get("n_classes")
    y = torch.tensor([0, 1, 2]) % n_classes if n_classes else None
    naive = model.sample_naive(3, generator=torch.Generator().manual_seed(seed), y=y)
    cached = model.sample(3, generator=torch.Generator().manual_seed(seed), y=y)
    assert torch.equal(naive.images, cached.images)
    assert naive.log_prob is not None and cached.log_prob is not None
    torch.testing.assert_close(naive.log_prob, cached.log_prob, rtol=0, atol=1e-4)


@pytest.mark.parametrize("overrides", RNN_CASES)
def test_cached_logits_match_the_full_forward_pass_at_every_step(overrides: dict[str, Any]) -> None:
    model = tiny(seed=3, height=4, width=5, levels=6, **overrides)
    n_classes = overrides.get("n_classes")
    y = torch.tensor([0, 1]) % n_classes if n_classes else None
    steps: list[tuple[int, int, int, torch.Tensor]] = []
    part = SamplePart(2, torch.Generator().manual_seed(4), labels=y)
    out = sample_parts_cached(model, [part], on_logits=lambda i, j, c, lg: steps.append((i, j, c, lg)))[0]
    assert out is not None
    with torch.no_grad():  # causality: the full pass over the finished images gives every step's logits
        full = model.logits(out.images, y)  # (B, C, L, H, W)
    assert len(steps) == model.config.in_channels * 4 * 5
    worst = max(float((lg - full[:, c, :, i, j]).abs().max()) for i, j, c, lg in steps)
    assert worst < 1e-4


def test_batched_parts_match_solo_runs_and_a_cancelled_part_leaves() -> None:
    model = tiny(height=4, width=3, levels=5, n_classes=2)
    solo = [
        model.sample(2, generator=torch.Generator().manual_seed(s), temperature=t, y=torch.tensor([s % 2, 1]))
        for s, t in ((5, 1.0), (6, 0.6))
    ]
    polls = {"n": 0}

    def cancel_after_one_row() -> bool:
        polls["n"] += 1
        return polls["n"] > 1

    parts = [
        SamplePart(2, torch.Generator().manual_seed(5), 1.0, torch.tensor([1, 1])),
        SamplePart(3, torch.Generator().manual_seed(9), 1.0, torch.tensor([0, 0, 0]), cancelled=cancel_after_one_row),
        SamplePart(2, torch.Generator().manual_seed(6), 0.6, torch.tensor([0, 1])),
    ]
    results = model.sample_parts(parts)
    assert results[1] is None and polls["n"] == 2
    for got, want in zip([results[0], results[2]], solo, strict=True):
        assert got is not None and torch.equal(got.images, want.images)


def test_graph_replay_control_flow_gives_the_plain_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stepper's CUDA-graph bookkeeping on CPU, with the stand-in recorder of test_sampling:
    fixed input columns copied in, hidden and cell states copied out, graphs captured again after a
    part leaves the batch."""
    import models.sampling.cached as cached_sampling
    import models.sampling.pixelrnn as sampler

    captures: list[int] = []
    monkeypatch.setattr(cached_sampling, "capture_cuda_graph", stand_in_recorder(captures))
    model = tiny(height=4, width=5, levels=6, in_channels=3, n_classes=3, input_kernel=2, state_kernel=3)
    rows = {"n": 0}

    def cancel() -> bool:
        rows["n"] += 1
        return rows["n"] > 2

    def parts() -> list[SamplePart]:
        rows["n"] = 0
        return [
            SamplePart(2, torch.Generator().manual_seed(1), 1.0, torch.tensor([0, 2])),
            SamplePart(2, torch.Generator().manual_seed(2), 0.8, torch.tensor([1, 1]), cancelled=cancel),
        ]

    plain = run_parts(model, parts(), lambda n, y: sampler._RowLSTMStepper(model, n, y))
    graphs = run_parts(model, parts(), lambda n, y: sampler._RowLSTMStepper(model, n, y, cuda_graphs=True))
    assert captures == [4, 4, 2, 2]  # both graphs for the batch of 4, again for the 2 left
    assert plain[1] is None and graphs[1] is None
    assert plain[0] is not None and graphs[0] is not None
    assert torch.equal(plain[0].images, graphs[0].images)
    torch.testing.assert_close(plain[0].log_prob, graphs[0].log_prob)


def test_cuda_graphs_are_refused_off_cuda_and_ignored_by_cpu_preparation() -> None:
    model = tiny(height=3, width=3)
    with pytest.raises(ValueError, match="CUDA device"):
        sample_parts_cached(model, [SamplePart(1, torch.Generator())], cuda_graphs=True)
    model.prepare_for_inference(cuda_graphs=True)
    assert model.sample_cuda_graphs is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("overrides", RNN_CASES)
def test_cuda_graph_steps_draw_the_same_images(overrides: dict[str, Any]) -> None:
    model = tiny(height=4, width=5, levels=6, **overrides).cuda()
    n_classes = overrides.get("n_classes")
    y = (torch.tensor([0, 1, 2]) % n_classes).cuda() if n_classes else None

    def sample(graphs: bool) -> Any:
        part = SamplePart(3, torch.Generator("cuda").manual_seed(7), labels=y)
        return sample_parts_cached(model, [part], cuda_graphs=graphs)[0]

    plain, graphs = sample(False), sample(True)
    assert torch.equal(plain.images, graphs.images)
    torch.testing.assert_close(plain.log_prob, graphs.log_prob, rtol=0, atol=1e-4)
    model.prepare_for_inference(cuda_graphs=True)
    again = model.sample(3, generator=torch.Generator("cuda").manual_seed(7), y=y)
    assert model.sample_cuda_graphs is True and torch.equal(again.images, plain.images)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = tiny(height=3, width=3, n_classes=2)
    dataset = {"name": "tiny", "shape": [1, 3, 3], "levels": 3, "classes": ["a", "b"]}
    save_checkpoint(model, tmp_path / "rnn", dataset=dataset)
    loaded, meta = load_checkpoint(tmp_path / "rnn")
    assert meta["architecture"] == "row_lstm" and isinstance(loaded, PixelRNN)
    x = torch.randint(0, 3, (4, 1, 3, 3), dtype=torch.uint8)
    y = torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        assert torch.equal(model.log_prob(x, y), loaded.log_prob(x, y))
