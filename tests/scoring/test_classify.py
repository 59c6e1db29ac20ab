"""Bayes' rule classification with a class-conditional PixelCNN."""

from __future__ import annotations

import itertools

import pytest
import torch

from models.pixelcnn import PixelCNN, PixelCNNConfig
from models.scoring.classify import CLASS_PASS_IMAGES, class_log_likelihood, class_posterior


@pytest.fixture
def model() -> PixelCNN:
    torch.manual_seed(0)
    cfg = PixelCNNConfig(height=2, width=2, levels=3, hidden=6, n_blocks=1, first_kernel=3, kernel=3, n_classes=3)
    return PixelCNN(cfg).eval()


def test_posterior_sums_to_one_and_matches_brute_force(model: PixelCNN) -> None:
    images = torch.tensor(list(itertools.product(range(3), repeat=4))).view(-1, 1, 2, 2)
    prior = torch.tensor([0.5, 0.3, 0.2])
    with torch.no_grad():
        post = class_posterior(model, images, prior)
        # brute force in float64: p(x|y) image by image, then Bayes' rule by hand
        lik = torch.zeros(len(images), 3, dtype=torch.float64)
        for c in range(3):
            for i in range(len(images)):
                lik[i, c] = model.log_prob(images[i : i + 1], torch.tensor([c])).double().exp()
    assert torch.allclose(lik.sum(0), torch.ones(3, dtype=torch.float64), atol=1e-4)  # each p(x|y) normalised
    joint = lik * prior.double()
    expected = joint / joint.sum(1, keepdim=True)
    assert torch.allclose(post.log_posterior.exp().sum(1).double(), torch.ones(len(images), dtype=torch.float64))
    assert torch.allclose(post.log_posterior.exp().double(), expected, atol=1e-5)
    assert torch.allclose(post.log_marginal.exp().double(), joint.sum(1), rtol=1e-4)
    assert torch.equal(post.predicted, expected.argmax(1))
    # p(x) = sum_y p(x|y) p(y) is itself a normalised distribution over images
    assert abs(float(post.log_marginal.double().exp().sum()) - 1.0) < 1e-4


def test_bad_prior_and_unconditional_model_are_refused(model: PixelCNN) -> None:
    x = torch.zeros(1, 1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="prior"):
        class_posterior(model, x, torch.tensor([0.5, 0.5, 0.5]))
    plain = PixelCNN(PixelCNNConfig(height=2, width=2, levels=3, hidden=4, n_blocks=1, first_kernel=3, kernel=3))
    with pytest.raises(ValueError, match="class-conditional"):
        class_posterior(plain, x)


@pytest.mark.parametrize("batch", [1, 5, 11, CLASS_PASS_IMAGES + 3])
def test_classes_share_passes_of_at_most_a_batch_and_give_each_image_its_own_likelihoods(
    model: PixelCNN, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = torch.randint(0, 3, (batch, 1, 2, 2), generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        per_class = torch.stack([model.log_prob(x, torch.full((batch,), c)) for c in range(3)], dim=1)
    passes: list[tuple[int, list[int]]] = []
    log_prob = model.log_prob

    def counted(images: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        passes.append((images.shape[0], sorted(set(y.tolist()))))
        return log_prob(images, y)

    monkeypatch.setattr(model, "log_prob", counted)
    with torch.no_grad():
        got = class_log_likelihood(model, x)
    torch.testing.assert_close(got, per_class, rtol=0, atol=1e-6)
    assert sorted(c for _, classes in passes for c in classes) == [0, 1, 2]  # every class once
    assert all(n <= max(batch, CLASS_PASS_IMAGES) for n, _ in passes)  # no pass larger than a batch
    assert len(passes) == -(-3 // max(1, CLASS_PASS_IMAGES // batch))  # 1, 1, 2 and 3 passes


def test_a_compiled_model_keeps_one_class_per_pass(model: PixelCNN, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its graphs cover only the batch sizes its server warmed up (models/compiled.py).
    monkeypatch.setattr(model, "compiled_log_prob", model._pixel_log_prob)  # stands in for the compiled pass
    sizes: list[int] = []
    log_prob = model.log_prob

    def counted(images: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sizes.append(images.shape[0])
        return log_prob(images, y)

    monkeypatch.setattr(model, "log_prob", counted)
    with torch.no_grad():
        class_log_likelihood(model, torch.zeros(1, 1, 2, 2, dtype=torch.long))
    assert sizes == [1, 1, 1]
