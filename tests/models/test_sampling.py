"""The cached PixelCNN sampler against the reference (naive) sampler, and batched sampling parts."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from models.base import SamplePart
from models.pixelcnn import PixelCNN, PixelCNNConfig
from models.sampling.pixelcnn import sample_cached
from models.vae import VAE, VAEConfig


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def tiny(channels: int = 1, n_classes: int | None = None, seed: int = 0) -> PixelCNN:
    torch.manual_seed(seed)
    cfg = PixelCNNConfig(
        in_channels=channels, height=5, width=6, levels=8, hidden=8, n_blocks=2,
        first_kernel=5, kernel=3, out_hidden=16, n_classes=n_classes,
    )  # fmt: skip
    return PixelCNN(cfg).eval()


CASES = [(1, None), (3, None), (1, 3), (2, 4)]


@pytest.mark.parametrize(("channels", "n_classes"), CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_draws_the_same_images_as_naive(channels: int, n_classes: int | None, seed: int) -> None:
    model = tiny(channels, n_classes)
    y = torch.tensor([0, 1, 2]) % n_classes if n_classes else None
    naive = model.sample_naive(3, generator=torch.Generator().manual_seed(seed), y=y)
    cached = model.sample(3, generator=torch.Generator().manual_seed(seed), y=y)
    assert torch.equal(naive.images, cached.images)
    assert naive.log_prob is not None and cached.log_prob is not None
    assert torch.allclose(naive.log_prob, cached.log_prob, atol=1e-4)


@pytest.mark.parametrize(("channels", "n_classes"), CASES)
def test_cached_logits_match_the_full_forward_pass_at_every_step(channels: int, n_classes: int | None) -> None:
    model = tiny(channels, n_classes, seed=3)
    y = torch.tensor([0, 1]) % n_classes if n_classes else None
    steps: list[tuple[int, int, int, torch.Tensor]] = []
    out = sample_cached(
        model,
        2,
        generator=torch.Generator().manual_seed(4),
        y=y,
        on_logits=lambda i, j, c, lg: steps.append((i, j, c, lg)),
    )
    # Causality makes the full pass over the finished images give every step's logits.
    with torch.no_grad():
        full = model.logits(out.images, y)  # (B, C, L, H, W)
    assert len(steps) == channels * 5 * 6
    worst = max(float((lg - full[:, c, :, i, j]).abs().max()) for i, j, c, lg in steps)
    assert worst < 1e-4


def test_sample_log_prob_is_the_untempered_likelihood() -> None:
    model = tiny()
    cold = model.sample(4, generator=torch.Generator().manual_seed(0), temperature=0.05)
    hot = model.sample(4, generator=torch.Generator().manual_seed(0), temperature=1.0)
    assert not torch.equal(cold.images, hot.images)
    assert cold.log_prob is not None
    assert torch.allclose(cold.log_prob, model.log_prob(cold.images), atol=1e-4)


def test_on_row_reports_every_row_with_partial_images() -> None:
    model = tiny()
    seen: list[tuple[int, int]] = []

    def on_row(rows: int, images: torch.Tensor) -> None:
        # rows below the ones done are still zero
        assert images[:, :, rows:].sum() == 0
        seen.append((rows, images.shape[0]))

    model.sample(2, generator=torch.Generator().manual_seed(0), on_row=on_row)
    assert seen == [(r, 2) for r in range(1, 6)]


def test_batched_parts_match_solo_runs_and_cancelled_parts_leave() -> None:
    model = tiny(n_classes=3)
    specs = [(5, 1.0, [2, 1]), (6, 0.7, [0, 1]), (7, 1.3, [1, 1])]
    solo = [
        model.sample(2, generator=torch.Generator().manual_seed(s), temperature=t, y=torch.tensor(lab))
        for s, t, lab in specs
    ]
    polls = {"n": 0}

    def cancel_after_two_rows() -> bool:
        polls["n"] += 1
        return polls["n"] > 2

    progress: list[int] = []
    parts = [
        SamplePart(
            2, torch.Generator().manual_seed(5), 1.0, torch.tensor([2, 1]), on_row=lambda r, _: progress.append(r)
        ),
        SamplePart(3, torch.Generator().manual_seed(9), 1.0, torch.tensor([0, 0, 0]), cancelled=cancel_after_two_rows),
        SamplePart(2, torch.Generator().manual_seed(6), 0.7, torch.tensor([0, 1])),
        SamplePart(2, torch.Generator().manual_seed(7), 1.3, torch.tensor([1, 1])),
    ]
    results = model.sample_parts(parts)
    assert results[1] is None
    assert polls["n"] == 3  # polled after rows 1, 2 and 3; left the batch after row 3
    assert progress == [1, 2, 3, 4, 5]
    for got, want in zip([results[0], results[2], results[3]], solo, strict=True):
        assert got is not None and torch.equal(got.images, want.images)


def test_work_between_steps_runs_after_every_pixel_and_changes_no_image() -> None:
    """What a shared compute thread does between the pixels of a generation (another model's
    forward pass, here one that draws from the global generator) leaves the images as they were."""
    model, other = tiny(channels=3, n_classes=3), tiny(seed=1)
    specs = [(5, [2, 1]), (6, [0, 0, 1])]

    def parts() -> list[SamplePart]:
        return [SamplePart(len(lab), torch.Generator().manual_seed(s), 0.9, torch.tensor(lab)) for s, lab in specs]

    plain = model.sample_parts(parts())
    calls = {"n": 0}

    def other_work() -> None:
        calls["n"] += 1
        other.log_prob(torch.randint(0, 8, (2, 1, 5, 6)))

    busy = model.sample_parts(parts(), between_steps=other_work)
    assert calls["n"] == 5 * 6  # once per pixel, after all its sub-pixels
    for got, want in zip(busy, plain, strict=True):
        assert got is not None and want is not None
        assert torch.equal(got.images, want.images) and torch.allclose(got.log_prob, want.log_prob)


def test_all_parts_cancelled_returns_nothing() -> None:
    model = tiny()
    parts = [SamplePart(2, torch.Generator().manual_seed(0), cancelled=lambda: True)]
    assert model.sample_parts(parts) == [None]


def test_default_sample_parts_for_a_vae() -> None:
    torch.manual_seed(0)
    vae = VAE(VAEConfig(height=4, width=4, latent_dim=2, hidden=4, downsample=1, n_mixtures=2)).eval()
    solo = vae.sample(3, generator=torch.Generator().manual_seed(1))
    steps = {"n": 0}
    got = vae.sample_parts(
        [SamplePart(3, torch.Generator().manual_seed(1)), SamplePart(1, torch.Generator(), cancelled=lambda: True)],
        between_steps=lambda: steps.__setitem__("n", steps["n"] + 1),
    )
    assert got[0] is not None and torch.equal(got[0].images, solo.images)
    assert got[1] is None
    assert steps["n"] == 2  # once per reported row: a VAE decodes all rows at once, reported once per part


def test_cached_sampler_refuses_dropout_in_training_mode() -> None:
    cfg = PixelCNNConfig(height=3, width=3, levels=4, hidden=4, n_blocks=1, first_kernel=3, kernel=3, dropout=0.5)
    model = PixelCNN(cfg).train()
    with pytest.raises(RuntimeError, match="eval"):
        model.sample(1)


def test_a_block_free_pixelcnn_samples_like_the_naive_loop() -> None:
    """n_blocks=0: the first layer alone feeds the head (no hidden windows at all)."""
    torch.manual_seed(0)
    cfg = PixelCNNConfig(height=4, width=5, levels=6, hidden=4, n_blocks=0, first_kernel=5, kernel=3, out_hidden=8)
    model = PixelCNN(cfg).eval()
    naive = model.sample_naive(2, generator=torch.Generator().manual_seed(1))
    cached = model.sample(2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(naive.images, cached.images)


def test_cuda_graphs_are_refused_off_cuda_and_ignored_by_cpu_preparation() -> None:
    model = tiny()
    with pytest.raises(ValueError, match="CUDA device"):
        sample_cached(model, 1, cuda_graphs=True)
    model.prepare_for_inference(cuda_graphs=True)  # what a CPU worker does with GENSERVE_CUDA_GRAPHS=1
    assert model.sample_cuda_graphs is False
    a = model.sample(2, generator=torch.Generator().manual_seed(0))
    b = model.sample_naive(2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.images, b.images)


Recorder = Callable[[Callable[[], torch.Tensor], list[torch.Tensor]], tuple[Callable[[], None], torch.Tensor]]


def stand_in_recorder(captures: list[int]) -> Recorder:
    """A CPU stand-in for ``capture_cuda_graph``: like a CUDA graph, it keeps the captured step and
    each replay writes into the output tensor returned at capture; the state is left as it was.
    Appends the batch size of every capture to ``captures``."""

    def record(step: Callable[[], torch.Tensor], state: list[torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        saved = [t.clone() for t in state]
        out = step()  # a real capture runs nothing; the state is restored below either way
        for t, s in zip(state, saved, strict=True):
            t.copy_(s)
        captures.append(out.shape[0])
        return (lambda: out.copy_(step())), out

    return record


def test_graph_replay_control_flow_gives_the_plain_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stepper's graph bookkeeping, on CPU: a stand-in recorder that, like a CUDA graph, keeps
    the captured step and writes each replay into the output tensor it returned at capture. Two
    graphs (with and without the window shift), captured again after a part leaves the batch."""
    import models.sampling.cached as cached_sampling
    import models.sampling.pixelcnn as sampler
    from models.sampling.cached import run_parts

    captures: list[int] = []
    monkeypatch.setattr(cached_sampling, "capture_cuda_graph", stand_in_recorder(captures))
    model = tiny(channels=3, n_classes=3)

    def parts() -> list[SamplePart]:
        return [
            SamplePart(2, torch.Generator().manual_seed(1), 1.0, torch.tensor([0, 2]), cancelled=lambda: False),
            SamplePart(2, torch.Generator().manual_seed(2), 0.8, torch.tensor([1, 1]), cancelled=cancel),
        ]

    rows = {"n": 0}

    def cancel() -> bool:
        rows["n"] += 1
        return rows["n"] > 2

    plain = run_parts(model, parts(), lambda n, y: sampler._PixelCNNStepper(model, n, y))
    rows["n"] = 0
    graphs = run_parts(model, parts(), lambda n, y: sampler._PixelCNNStepper(model, n, y, cuda_graphs=True))
    assert captures == [4, 4, 2, 2]  # both graphs for the batch of 4, again for the 2 left
    assert plain[1] is None and graphs[1] is None
    assert plain[0] is not None and graphs[0] is not None
    assert torch.equal(plain[0].images, graphs[0].images)
    assert torch.allclose(plain[0].log_prob, graphs[0].log_prob)  # type: ignore[arg-type]


def test_a_failed_capture_falls_back_to_plain_steps(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    import models.sampling.cached as cached_sampling
    import models.sampling.pixelcnn as sampler
    from models.sampling.cached import run_parts

    calls: list[int] = []

    def refuse(step: Callable[[], torch.Tensor], state: list[torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        """A capture that fails after its warm-up steps; like the real one, it restores the state."""
        calls.append(1)
        saved = [t.clone() for t in state]
        step()
        for t, s in zip(state, saved, strict=True):
            t.copy_(s)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cached_sampling, "capture_cuda_graph", refuse)
    model = tiny(channels=3)
    part = [SamplePart(2, torch.Generator().manual_seed(3))]
    plain = run_parts(model, part, lambda n, y: sampler._PixelCNNStepper(model, n, y))[0]
    part = [SamplePart(2, torch.Generator().manual_seed(3))]
    with caplog.at_level("WARNING", logger="models.sampling.cached"):
        fallback = run_parts(model, part, lambda n, y: sampler._PixelCNNStepper(model, n, y, cuda_graphs=True))[0]
    assert plain is not None and fallback is not None and torch.equal(plain.images, fallback.images)
    assert calls == [1]  # tried once, then plain steps for the rest of the generation
    assert "CUDA graph capture failed" in caplog.text


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda_only
@pytest.mark.parametrize(("channels", "n_classes"), CASES)
def test_cuda_graph_steps_draw_the_same_images(channels: int, n_classes: int | None) -> None:
    y = (torch.tensor([0, 1, 2]) % n_classes).cuda() if n_classes else None
    model = tiny(channels, n_classes).cuda()
    for seed in (0, 1):
        plain = sample_cached(model, 3, generator=torch.Generator("cuda").manual_seed(seed), y=y)
        graphs = sample_cached(model, 3, generator=torch.Generator("cuda").manual_seed(seed), y=y, cuda_graphs=True)
        assert torch.equal(plain.images, graphs.images)
        assert plain.log_prob is not None and graphs.log_prob is not None
        assert torch.allclose(plain.log_prob, graphs.log_prob, atol=1e-4)
    # Every replayed step's logits against the full pass, in float64 (where no TF32 rounds the convolutions).
    model = model.double()
    steps: list[torch.Tensor] = []
    out = sample_cached(
        model,
        3,
        generator=torch.Generator("cuda").manual_seed(2),
        y=y,
        cuda_graphs=True,
        on_logits=lambda i, j, c, lg: steps.append(lg.clone()),  # a replay's output lives until the next
    )
    with torch.no_grad():
        full = model.logits(out.images, y)
    order = [(i, j, c) for i in range(5) for j in range(6) for c in range(channels)]
    worst = max(float((lg - full[:, c, :, i, j]).abs().max()) for (i, j, c), lg in zip(order, steps, strict=True))
    assert worst < 1e-4


@cuda_only
def test_cuda_graph_sampling_keeps_parts_apart_when_one_leaves() -> None:
    model = tiny(n_classes=3).cuda()
    model.prepare_for_inference(cuda_graphs=True)
    assert model.sample_cuda_graphs is True

    def gen(seed: int) -> torch.Generator:
        return torch.Generator("cuda").manual_seed(seed)

    solo = sample_cached(model, 2, generator=gen(5), y=torch.tensor([2, 1]).cuda())
    polls = {"n": 0}

    def cancel_after_two_rows() -> bool:
        polls["n"] += 1
        return polls["n"] > 2

    parts = [
        SamplePart(3, gen(9), 1.0, torch.tensor([0, 0, 0]).cuda(), cancelled=cancel_after_two_rows),
        SamplePart(2, gen(5), 1.0, torch.tensor([2, 1]).cuda()),
    ]
    results = model.sample_parts(parts)  # the batch shrinks after row 3: the graphs are captured again
    assert results[0] is None
    assert results[1] is not None and torch.equal(results[1].images, solo.images)
