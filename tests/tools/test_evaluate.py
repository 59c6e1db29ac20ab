"""Evaluation: a stopped run resumes from its saved rows and gives the same report."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.tools import evaluate as evaluate_mod
from models.tools.data import ImageDataset
from models.tools.evaluate import evaluate
from models.vae import VAE, VAEConfig


def _data(n: int = 10) -> ImageDataset:
    images = torch.randint(0, 4, (n, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return ImageDataset(images, None, None, "tiny:test")


def _vae(seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    cfg = VAEConfig(height=4, width=4, levels=4, latent_dim=2, hidden=4, downsample=1, iwae_samples=4)
    return VAE(cfg).eval()


def test_a_stopped_evaluation_resumes_where_it_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _data()
    full = evaluate(_vae(), data, batch_size=3, show_progress=False)

    model = _vae()
    calls = {"n": 0}
    real = VAE.log_weights

    def stop_after_two(self: VAE, x: torch.Tensor, k: int) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(self, x, k)

    monkeypatch.setattr(evaluate_mod.Partial, "save", _always_save(evaluate_mod.Partial.save))
    monkeypatch.setattr(VAE, "log_weights", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, data, batch_size=3, show_progress=False, partial_dir=tmp_path)
    saved = list(tmp_path.iterdir())
    assert len(saved) == 1

    seen: list[int] = []

    def counted(self: VAE, x: torch.Tensor, k: int) -> torch.Tensor:
        seen.append(len(x))
        return real(self, x, k)

    monkeypatch.setattr(VAE, "log_weights", counted)
    resumed = evaluate(model, data, batch_size=3, show_progress=False, partial_dir=tmp_path)
    assert sum(seen) == 4, "only the 4 images not yet done are scored again"
    assert resumed["bits_per_dim"] == pytest.approx(full["bits_per_dim"], abs=1e-6)
    assert resumed["elbo_bits_per_dim"] == pytest.approx(full["elbo_bits_per_dim"], abs=1e-6)


def _always_save(save):  # type: ignore[no-untyped-def]
    """Partial.save without its once-a-minute throttle, so the test sees every batch saved."""
    return lambda self, values, force=False: save(self, values, force=True)


def test_saved_rows_of_another_model_or_data_are_not_used(tmp_path: Path) -> None:
    data = _data()
    evaluate(_vae(0), data, batch_size=5, show_progress=False, partial_dir=tmp_path)
    evaluate(_vae(1), data, batch_size=5, show_progress=False, partial_dir=tmp_path)
    evaluate(_vae(0), _data(8), batch_size=5, show_progress=False, partial_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 3
    again = evaluate(_vae(0), data, batch_size=5, show_progress=False, partial_dir=tmp_path)
    assert again["bits_per_dim"] == pytest.approx(evaluate(_vae(0), data, show_progress=False)["bits_per_dim"])


def test_vae_report_carries_the_kl_of_the_code() -> None:
    data, model = _data(), _vae()
    report = evaluate(model, data, show_progress=False)
    with torch.no_grad():
        mean, std = model.encode(data.images)
    q = torch.distributions.Normal(mean, std)
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(std))
    expected = torch.distributions.kl_divergence(q, p).sum(1).mean()
    assert report["kl_nats_per_image"] == pytest.approx(float(expected), rel=1e-5)
    assert report["kl_nats_per_image"] > 0
