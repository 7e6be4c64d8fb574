"""The top-k encoding of store format 2: what is stored, exactness of the rebuild, and what inspect derives."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.cache.report import confidence_and_entropy
from pipeline.cache.topk import encode_topk, kl_divergence, leftover_log_mass, rebuild_log_probs


def _logits(batch=32, classes=200, top=20.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, generator=g) * 2
    logits[torch.arange(batch), torch.randint(0, classes, (batch,), generator=g)] = top + torch.rand(batch, generator=g)
    return logits


def test_encoding_holds_sorted_log_probabilities_and_the_log_of_the_rest():
    logits = _logits()
    encoded = encode_topk(logits, 7, (1.0, 3.0))
    assert encoded.logprob.dtype == torch.float16 and encoded.log_leftover.dtype == torch.float32
    assert encoded.index.shape == (32, 7) and torch.equal(encoded.index, logits.topk(7, dim=-1).indices)
    assert (encoded.logprob <= 0).all() and (encoded.logprob.diff(dim=-1) <= 0).all()
    exact = F.log_softmax(logits.double(), -1)
    assert torch.allclose(encoded.logprob.double(), exact.gather(1, encoded.index), atol=4e-3, rtol=1e-3)
    for i, t in enumerate((1.0, 3.0)):
        rest = torch.logsumexp(F.log_softmax(logits.double() / t, -1).scatter(1, encoded.index, -math.inf), -1)
        assert torch.allclose(encoded.log_leftover[:, i].double(), rest, rtol=0, atol=1e-5)  # 1e-5 relative mass


def test_all_classes_leave_nothing_over_and_rebuild_the_exact_softmax():
    logits = _logits(classes=30, top=5.0)
    encoded = encode_topk(logits, 30, (1.0, 2.0))
    assert torch.isneginf(encoded.log_leftover).all()
    for i, t in enumerate((1.0, 2.0)):
        rebuilt = rebuild_log_probs(encoded.logprob, encoded.index, encoded.log_leftover[:, i], 30, t)
        assert torch.allclose(rebuilt.exp(), F.softmax(logits / t, -1), atol=2e-4)  # fp16 log-probabilities
        exact = rebuild_log_probs(F.log_softmax(logits, -1), torch.arange(30).expand(32, 30),
                                  encoded.log_leftover[:, i], 30, t)
        assert torch.allclose(exact, F.log_softmax(logits / t, -1), atol=1e-5)


def test_extreme_logits_stay_finite():
    logits = torch.full((2, 50), -1e6)
    logits[:, 0] = 50.0
    encoded = encode_topk(logits, 3, (1.0,))
    assert torch.isfinite(encoded.logprob).all() and torch.isfinite(encoded.log_leftover).all()
    rebuilt = rebuild_log_probs(encoded.logprob, encoded.index, encoded.log_leftover[:, 0], 50, 1.0)
    assert torch.isfinite(rebuilt).all() and torch.allclose(rebuilt.exp().sum(-1), torch.ones(2))


def test_leftover_of_a_flat_teacher_over_many_classes_is_exact():
    """Top-5 of 21843 near-uniform classes: the leftover is almost 1 and the top-k mass tiny; both survive."""
    logits = torch.randn(8, 21843, generator=torch.Generator().manual_seed(3)) * 0.1
    encoded = encode_topk(logits, 5, (1.0,))
    rebuilt = rebuild_log_probs(encoded.logprob, encoded.index, encoded.log_leftover[:, 0], 21843, 1.0).double()
    exact = F.log_softmax(logits.double(), -1)
    top_mass = exact.gather(1, encoded.index).exp().sum(-1)
    assert torch.allclose(rebuilt.gather(1, encoded.index).exp().sum(-1), top_mass, rtol=1e-3)
    assert torch.allclose(rebuilt.exp().sum(-1), torch.ones(8, dtype=torch.float64), atol=1e-5)


def test_kl_divergence_is_zero_for_equal_and_positive_for_different_distributions():
    log_p = F.log_softmax(torch.randn(4, 10), -1)
    assert torch.allclose(kl_divergence(log_p, log_p), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    log_q = F.log_softmax(torch.randn(4, 10), -1)
    expected = (log_p.double().exp() * (log_p.double() - log_q.double())).sum(-1)
    assert torch.allclose(kl_divergence(log_p, log_q), expected, atol=1e-6) and (expected > 0).all()
    zero = torch.full((1, 3), -math.inf)
    zero[0, 0] = 0.0
    assert torch.isfinite(kl_divergence(zero, F.log_softmax(torch.randn(1, 3), -1))).all()


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_inspect_confidence_and_entropy_are_those_of_the_rebuilt_distribution(t):
    logits, k = _logits(classes=1000, top=16.0), 10
    encoded = encode_topk(logits, k, (1.0, 4.0))
    column = (1.0, 4.0).index(t)
    confidence, entropy = confidence_and_entropy(encoded.logprob.numpy().reshape(8, 4, k),
                                                 encoded.log_leftover[:, column].numpy().reshape(8, 4), 1000, t)
    assert confidence.shape == entropy.shape == (8, 4)
    rebuilt = rebuild_log_probs(encoded.logprob, encoded.index, encoded.log_leftover[:, column], 1000, t).double()
    p = rebuilt.exp()
    assert np.allclose(confidence.ravel(), p.max(-1).values.numpy(), rtol=1e-5)
    assert np.allclose(entropy.ravel(), -(p * rebuilt).sum(-1).numpy(), rtol=1e-4, atol=1e-7)
    # The live distribution's confidence, to fp16 rounding of the top log-probability.
    assert np.allclose(confidence.ravel(), F.softmax(logits.double() / t, -1).max(-1).values.numpy(), rtol=2e-3)


def test_leftover_log_mass_of_chosen_classes():
    logits = torch.tensor([[0.0, math.log(2.0), math.log(3.0), math.log(4.0)]])
    index = torch.tensor([[3, 0]])
    assert torch.allclose(leftover_log_mass(logits, index, (1.0,)).exp(), torch.tensor([[0.5]]))
