"""The fast PixelCNN forward (models/fast.py) against the masked-convolution model it is built from."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from models.checkpoint import load_checkpoint, read_metadata
from models.fast import CHUNK_BYTES, FastPixelCNN
from models.pixelcnn import PixelCNN, PixelCNNConfig
from models.sampling.pixelcnn import sample_cached

STORE = Path(__file__).resolve().parents[2] / "checkpoints"
SHIPPED_PIXELCNNS = sorted(
    str(p.parent.relative_to(STORE))
    for p in STORE.glob("**/model.json")
    if read_metadata(p.parent)["architecture"] == "gated_pixelcnn"
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_model(seed: int = 0, **overrides: Any) -> PixelCNN:
    """A small PixelCNN in eval mode with random weights and biases (nothing trivially zero)."""
    cfg: dict[str, Any] = {
        "in_channels": 1, "height": 5, "width": 7, "levels": 16, "hidden": 8, "n_blocks": 2,
        "first_kernel": 5, "kernel": 3, "out_hidden": 16,
    }  # fmt: skip
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = PixelCNN(PixelCNNConfig(**cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
    return model.eval()


CASES = [
    {},
    {"in_channels": 3},  # colour: channel-masked centre taps and 1x1 convs
    {"n_classes": 4},
    {"in_channels": 2, "n_classes": 3, "first_kernel": 7, "kernel": 5},
    {"n_blocks": 0},
    {"height": 1, "width": 1},
]


@pytest.mark.parametrize("overrides", CASES)
@pytest.mark.parametrize("batch", [1, 3])
def test_fast_logits_equal_the_masked_convolutions(overrides: dict[str, Any], batch: int) -> None:
    model = random_model(**overrides)
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.levels, (batch, cfg.in_channels, cfg.height, cfg.width), generator=gen)
    y = torch.randint(0, cfg.n_classes, (batch,), generator=gen) if cfg.n_classes else None
    with torch.no_grad():
        ref = model.logits(x, y)
        ref_lp = model.pixel_log_prob(x, y)
        fast = FastPixelCNN(model)
        got = fast.logits(x, y)
        got_lp = fast.pixel_log_prob(x, y)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_lp, ref_lp, rtol=0, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_shares_taken_in_chunks_give_every_image_its_own_log_probabilities(threads: int, chunk: int) -> None:
    # A conditional model, so that a chunk's labels must be its own images' labels.
    model = random_model(n_classes=4)
    cfg = model.config
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, cfg.levels, (7, 1, cfg.height, cfg.width), generator=gen)
    y = torch.randint(0, 4, (7,), generator=gen)
    fast = FastPixelCNN(model)
    fast.chunk = chunk
    torch.set_num_threads(threads)
    with torch.no_grad():
        ref = model.pixel_log_prob(x, y)
        got = fast.pixel_log_prob(x, y)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_a_chunk_holds_the_images_whose_logits_fill_the_budget() -> None:
    grey = FastPixelCNN(random_model(height=28, width=28, levels=256, n_blocks=0))
    colour = FastPixelCNN(random_model(in_channels=3, height=32, width=32, levels=256, n_blocks=0))
    assert grey.chunk == CHUNK_BYTES // (4 * 28 * 28 * 256) >= 2  # the shipped models' shape
    assert colour.chunk == 1  # one image's logits (3.1 MB) are over the budget: one at a time
    assert FastPixelCNN(random_model()).chunk == CHUNK_BYTES // (4 * 5 * 7 * 16)


def test_the_model_takes_the_fast_path_only_prepared_in_eval_mode_without_gradients() -> None:
    model = random_model()
    x = torch.randint(0, 16, (2, 1, 5, 7))
    assert model.fast is None
    model.prepare_for_inference()
    assert isinstance(model.fast, FastPixelCNN)
    with torch.no_grad():
        assert model._fast() is model.fast
        fast_lp = model.log_prob(x)
    # With gradients (training, the causality tests) the masked convolutions run, so gradients reach
    # the parameters.
    assert model._fast() is None
    lp = model.log_prob(x)
    assert lp.requires_grad
    torch.testing.assert_close(fast_lp, lp.detach(), rtol=0, atol=1e-4)
    model.train()
    with torch.no_grad():
        assert model._fast() is None


@pytest.mark.parametrize("channels", [1, 3])
def test_fast_path_changing_a_later_sub_pixel_never_changes_earlier_logits(channels: int) -> None:
    model = random_model(in_channels=channels, height=4, width=4)
    model.prepare_for_inference()
    c_, h_, w_ = model.shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 16, (1, c_, h_, w_), generator=gen)
    with torch.no_grad():
        base = model.logits(x)  # (1, C, L, H, W)
        for pos in range(c_ * h_ * w_):
            i, rest = divmod(pos, w_ * c_)
            j, c = divmod(rest, c_)
            x2 = x.clone()
            x2[0, c, i, j] = (x2[0, c, i, j] + 7) % 16
            changed = (model.logits(x2) - base).abs().amax(dim=2)[0]  # (C, H, W)
            for pos_o in range(pos + 1):  # sub-pixels up to and including the changed one
                io, rest_o = divmod(pos_o, w_ * c_)
                jo, co = divmod(rest_o, c_)
                assert changed[co, io, jo] < 1e-6, f"logit of {(co, io, jo)} depends on later {(c, i, j)}"
            assert changed.max() > 0 or pos == c_ * h_ * w_ - 1  # something later does see it


@pytest.mark.parametrize("n_classes", [None, 3])
def test_cached_sampler_and_the_naive_one_on_fast_logits_draw_the_same_images(n_classes: int | None) -> None:
    model = random_model(n_classes=n_classes, levels=8)
    model.prepare_for_inference()
    y = torch.arange(3) % n_classes if n_classes else None
    naive = model.sample_naive(3, generator=torch.Generator().manual_seed(5), y=y)  # through the fast logits
    cached = sample_cached(model, 3, generator=torch.Generator().manual_seed(5), y=y)
    assert torch.equal(naive.images, cached.images)
    torch.testing.assert_close(naive.log_prob, cached.log_prob, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", SHIPPED_PIXELCNNS)
def test_every_shipped_pixelcnn_gives_the_same_log_likelihoods(name: str) -> None:
    model, _ = load_checkpoint(STORE / name)
    assert isinstance(model, PixelCNN)
    c, h, w = model.shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.levels, (2, c, h, w), generator=gen, dtype=torch.uint8)
    x[1] = torch.zeros(c, h, w, dtype=torch.uint8)
    x[1, :, 6:22, 8:20] = 200  # a plain bright rectangle on black: an in-distribution-like image
    y = torch.tensor([0, 3]) if model.n_classes else None
    with torch.inference_mode():
        ref = model.log_prob(x, y)
        model.prepare_for_inference()
        got = model.log_prob(x, y)
    assert ((got - ref).abs() / model.dims).max() <= 1e-4


def test_a_cpu_generation_runs_on_one_thread_and_gives_the_count_back() -> None:
    from models.sampling import cached

    model = random_model()
    torch.set_num_threads(2)
    seen: list[int] = []
    out = sample_cached(
        model, 2, generator=torch.Generator().manual_seed(0), on_logits=lambda *_: seen.append(torch.get_num_threads())
    )
    assert set(seen) == {cached.CPU_THREADS} == {1}
    assert torch.get_num_threads() == 2
    # The same images on the caller's threads (the module setting None: today's behaviour).
    cached.CPU_THREADS = None
    try:
        again = sample_cached(model, 2, generator=torch.Generator().manual_seed(0))
    finally:
        cached.CPU_THREADS = 1
    assert torch.equal(out.images, again.images)


def test_split_batch_covers_every_image_once_on_one_torch_thread_each() -> None:
    import threading

    from models.threads import split_batch

    torch.set_num_threads(2)
    seen: list[tuple[int, int, int, bool, int]] = []
    lock = threading.Lock()

    def share(rows: slice) -> None:
        with lock:
            seen.append(
                (rows.start, rows.stop, torch.get_num_threads(), torch.is_grad_enabled(), threading.get_ident())
            )

    with torch.no_grad():
        split_batch(share, 10, 3)
    assert sorted((a, b) for a, b, *_ in seen) == [(0, 3), (3, 6), (6, 10)]
    assert all(grad is False for *_, grad, _ in seen)  # the caller's autograd mode on every thread
    me = threading.get_ident()
    assert [a for a, *_, ident in seen if ident == me] == [0]  # the first share here, the others on helpers
    assert all(t == 1 for a, _, t, _, _ in seen if a != 0)  # helpers: one torch thread each
    assert torch.get_num_threads() == 2
    seen.clear()
    split_batch(share, 2, 4)  # never more shares than images
    assert sorted((a, b) for a, b, *_ in seen) == [(0, 1), (1, 2)]


def test_split_batch_waits_for_every_share_and_raises_the_first_error() -> None:
    import time

    from models.threads import split_batch

    done: list[int] = []

    def share(rows: slice) -> None:
        if rows.start == 0:
            raise ValueError("this thread's share failed")
        time.sleep(0.05)
        done.append(rows.start)

    with pytest.raises(ValueError, match="this thread's share"):
        split_batch(share, 4, 2)
    assert done == [2]  # the helper's share finished before the error came back

    def helper_fails(rows: slice) -> None:
        if rows.start != 0:
            raise KeyError("a helper's share failed")

    with pytest.raises(KeyError):
        split_batch(helper_fails, 4, 2)


@pytest.mark.parametrize("n_classes", [None, 3])
def test_row_steps_split_over_threads_draw_the_same_images(n_classes: int | None) -> None:
    from models.sampling import cached

    model = random_model(seed=4, in_channels=3, n_classes=n_classes)
    y = torch.tensor([0, 2, 1, 1, 0]) if n_classes else None
    draws = []
    for threads in (1, 2, 3):
        cached.ROW_THREADS = threads
        try:
            with torch.inference_mode():
                draws.append(sample_cached(model, 5, generator=torch.Generator().manual_seed(7), y=y))
        finally:
            cached.ROW_THREADS = None
    for out in draws[1:]:
        assert torch.equal(out.images, draws[0].images)
        assert torch.allclose(out.log_prob, draws[0].log_prob)  # type: ignore[arg-type]


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_split_batch_works_in_a_forked_child_of_a_process_that_used_it() -> None:
    import os
    import time
    import warnings

    from models.threads import split_batch

    split_batch(lambda rows: None, 4, 2)  # the parent now holds a helper thread
    with warnings.catch_warnings():  # Python 3.12+ warns about forking a process that holds threads
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: its helper threads must be new ones, or the share would wait forever
        seen: list[int] = []
        split_batch(lambda rows: seen.append(rows.start), 4, 2)
        os._exit(0 if sorted(seen) == [0, 2] else 1)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("split_batch in the forked child waited for a helper thread that does not exist there")
    assert os.waitstatus_to_exitcode(done[1]) == 0
