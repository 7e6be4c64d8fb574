"""Losses: cached top-k KD equals live KD, exact leftover mass, teacher dropping, feature KD, mixing."""
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.cache.topk import encode_topk, kl_divergence, leftover_log_mass
from pipeline.train.losses import (
    DistillLoss,
    DistillLossConfig,
    FeatureProjector,
    FeatureStandardizer,
    MixConfig,
    TeacherLossWeights,
    TeacherTargets,
    feature_loss,
    kd_loss,
    label_loss,
    mix_batch,
    mix_labels,
    teacher_dropping,
)

TEMPS = (1.0, 4.0)


def cached_targets(logits: torch.Tensor, k: int, temperatures=TEMPS, features=None, feature_mask=None):
    """Targets as the cache encodes and stores them: fp16 top-k log-probabilities, fp32 log leftover."""
    encoded = encode_topk(logits, k, temperatures)
    return TeacherTargets(topk_logprob=encoded.logprob.float(), topk_index=encoded.index.to(torch.int16),
                          log_leftover=encoded.log_leftover, temperatures=temperatures,
                          num_classes=logits.shape[-1], features=features, feature_mask=feature_mask)


def topk_target(logits: torch.Tensor, k: int, t: float) -> torch.Tensor:
    """What top-k targets should be at temperature t, in float64: the exact probabilities of the top-k
    classes, and the exact mass of the others spread uniformly over them (summed in log space: 1 - sum(top)
    cancels even in float64)."""
    log_p = F.log_softmax(logits.double() / t, dim=-1)
    index = logits.topk(k, dim=-1).indices
    rest = torch.logsumexp(log_p.scatter(1, index, -math.inf), dim=-1, keepdim=True) - math.log(logits.shape[-1] - k)
    return rest.expand_as(log_p).clone().scatter_(1, index, log_p.gather(1, index))


def confident_logits(batch: int, classes: int, top: float, seed: int = 0) -> torch.Tensor:
    """Other logits N(0, 2), one class per row at ``top`` +- 0.5 (not a round fp16 value): a confident teacher."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, generator=g) * 2
    rows, columns = torch.arange(batch), torch.randint(0, classes, (batch,), generator=g)
    logits[rows, columns] = top + torch.rand(batch, generator=g) - 0.5
    return logits


def reference_kd(student, teacher, t):
    p = F.softmax(teacher / t, dim=-1)
    return t * t * (p * (F.log_softmax(teacher / t, dim=-1) - F.log_softmax(student / t, dim=-1))).sum(-1)


@pytest.mark.parametrize("t", TEMPS)
def test_cached_kd_with_all_classes_equals_full_logit_kd(t):
    teacher, student = torch.randn(8, 50) * 3, torch.randn(8, 50) * 3
    expected = reference_kd(student, teacher, t)
    cached = kd_loss(student, cached_targets(teacher, k=50).log_probs(t), t)
    assert torch.allclose(cached, expected, rtol=5e-3, atol=1e-3)  # fp16 log-probabilities: ~5e-4 relative each
    online = kd_loss(student, TeacherTargets.from_logits(teacher, temperatures=TEMPS).log_probs(t), t)
    assert torch.allclose(online, expected, rtol=1e-6, atol=1e-6)  # float32 rounding only
    assert (expected > 1e-3).all()  # a non-trivial comparison


def test_rebuilt_distribution_keeps_exact_topk_mass_and_uniform_leftover():
    logits = torch.randn(6, 20) * 2
    k = 5
    values, index = logits.topk(k, dim=-1)
    targets = TeacherTargets(topk_logprob=F.log_softmax(logits, -1).gather(1, index), topk_index=index,
                             log_leftover=leftover_log_mass(logits, index, (1.0,)), temperatures=(1.0,),
                             num_classes=20)
    p = targets.log_probs(1.0).exp()
    assert torch.allclose(p.sum(-1), torch.ones(6), atol=1e-6)
    true = F.softmax(logits, dim=-1)
    assert torch.allclose(p.gather(1, index), true.gather(1, index), atol=1e-6)
    others = torch.ones_like(p, dtype=torch.bool).scatter_(1, index, False)
    rest = p[others].view(6, 20 - k)
    leftover = 1 - true.gather(1, index).sum(-1, keepdim=True)
    assert torch.allclose(rest, (leftover / (20 - k)).expand_as(rest), atol=1e-6)
    assert (rest > 0).all()
    renormalised = torch.zeros_like(p).scatter_(1, index, F.softmax(values, dim=-1))
    assert not torch.allclose(p, renormalised, atol=1e-3)


@pytest.mark.parametrize("top", [16.0, 24.0, 32.0])
@pytest.mark.parametrize("t", TEMPS)
def test_confident_teacher_keeps_its_exact_leftover(top, t):
    """Top logit 16-32 over 1000 classes: fp16 rounding of a raw top logit is as large as the whole leftover
    mass, but the stored log-probabilities and log leftover rebuild it to float32 precision."""
    logits, k = confident_logits(64, 1000, top), 10
    rebuilt = cached_targets(logits, k).log_probs(t).double()
    true = topk_target(logits, k, t)
    index = logits.topk(k, dim=-1).indices
    others = torch.ones_like(rebuilt, dtype=torch.bool).scatter_(1, index, False)
    leftover = rebuilt.exp()[others].view(64, -1).sum(-1)
    true_leftover = true.exp()[others].view(64, -1).sum(-1)
    assert ((leftover / true_leftover - 1).abs() < 1e-3).all()
    assert kl_divergence(true, rebuilt).max() < 1e-5
    assert torch.allclose(rebuilt.exp().sum(-1), torch.ones(64, dtype=torch.float64), atol=1e-5)
    if t == 1.0:  # the same logits stored raw in fp16 beside an exact logsumexp lose the leftover (format 1)
        raw = logits.topk(k, dim=-1).values.half().double() - torch.logsumexp(logits.double(), -1, keepdim=True)
        raw_leftover = (1 - raw.exp().sum(-1)).clamp_min(0)
        assert (raw_leftover / true_leftover - 1).abs().median() > 0.1


def test_fp16_overshoot_and_peaked_teacher_stay_finite():
    # A teacher so peaked that the leftover mass is far below float32's smallest number.
    logits = torch.full((4, 10), -1e4)
    logits[:, 0] = 30.0
    targets = cached_targets(logits, k=3, temperatures=(1.0,))
    log_p = targets.log_probs(1.0)
    assert torch.isfinite(log_p).all()
    student = torch.randn(4, 10, requires_grad=True)
    loss = kd_loss(student, log_p, 1.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(student.grad).all()
    # -inf teacher log-probs (zero mass) contribute 0, not NaN.
    hard = torch.full((4, 10), -math.inf)
    hard[:, 0] = 0.0
    assert torch.allclose(kd_loss(student.detach(), hard, 1.0), -F.log_softmax(student.detach(), -1)[:, 0])


def test_unknown_temperature_names_the_stored_ones():
    targets = cached_targets(torch.randn(2, 10), k=3)
    with pytest.raises(ValueError, match=r"\[1\.0, 4\.0\]"):
        targets.log_probs(2.0)


def test_kd_loss_is_float32_under_autocast():
    student = torch.randn(4, 10).bfloat16()
    teacher = TeacherTargets.from_logits(torch.randn(4, 10)).log_probs(1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = kd_loss(student, teacher, 1.0)
    assert loss.dtype == torch.float32


def test_teacher_dropping_keeps_the_hardest_teacher():
    losses = torch.rand(3, 4000)
    hardest = F.one_hot(losses.argmax(0), 3).T.bool()
    assert teacher_dropping(losses, 0.0).all()
    assert torch.equal(teacher_dropping(losses, 1.0), hardest)
    keep = teacher_dropping(losses, 0.3, torch.Generator().manual_seed(1))  # not the global seed: independent of losses
    assert keep[hardest].all()
    drop_rate = 1 - keep[~hardest].float().mean().item()
    assert abs(drop_rate - 0.3) < 0.02
    again = teacher_dropping(losses, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(keep, again)


def test_feature_loss_parts():
    x = torch.randn(5, 16)
    assert torch.allclose(feature_loss(x, x), torch.zeros(5), atol=1e-6)
    assert (feature_loss(x + 0.1 * torch.randn(5, 16), x) > 0).all()
    smooth_l1 = lambda a, b: F.smooth_l1_loss(a, b, reduction="none").mean(-1)  # noqa: E731
    # Cosine ignores scale: only the smooth-L1 part remains for a scaled copy ...
    assert torch.allclose(feature_loss(2 * x, x), 0.5 * smooth_l1(2 * x, x), atol=1e-6)
    # ... and an opposite vector costs the full cosine part, 0.5 * (1 - (-1)) = 1.
    assert torch.allclose(feature_loss(-x, x) - 0.5 * smooth_l1(-x, x), torch.ones(5), atol=1e-5)


def test_feature_standardizer_tracks_stats_and_freezes_in_eval():
    torch.manual_seed(0)
    mean, std = torch.tensor([3.0, -1.0, 0.5]), torch.tensor([2.0, 0.5, 1.0])
    st = FeatureStandardizer(3, momentum=0.1)
    assert {"mean", "var", "num_updates"} <= set(st.state_dict())
    for _ in range(100):
        st(torch.randn(256, 3) * std + mean)
    assert torch.allclose(st.mean, mean, atol=0.05) and torch.allclose(st.std, std, rtol=0.05)
    x = torch.randn(256, 3) * std + mean
    z = st(x)
    assert torch.allclose(z.mean(0), torch.zeros(3), atol=0.2) and torch.allclose(z.std(0), torch.ones(3), atol=0.2)
    st.eval()
    frozen = st.mean.clone()
    st(torch.randn(64, 3) + 100)
    assert torch.equal(st.mean, frozen)
    # Masked-out rows never touch the statistics, and a batch of < 2 samples is skipped.
    st.train()
    mask = torch.zeros(64, dtype=torch.bool)
    mask[:1] = True
    st(torch.full((64, 3), 1e6), mask)
    assert torch.equal(st.mean, frozen)
    fresh = FeatureStandardizer(3)
    fresh(torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0], [1e9, 1e9, 1e9]]), torch.tensor([True, True, False]))
    assert torch.allclose(fresh.mean, torch.tensor([2.0, 3.0, 4.0]))  # first update initialises


def _teacher_batch(batch=8, classes=10, dim=12, mask=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, generator=g) * 2
    features = torch.randn(batch, dim, generator=g)
    return cached_targets(logits, k=4, features=features, feature_mask=mask)


def test_distill_loss_gradients_and_parts():
    cfg = DistillLossConfig(teachers={"a": TeacherLossWeights(kd=1.0, feature=1.0),
                                      "b": TeacherLossWeights(kd=0.5)}, temperature=4.0)
    loss_fn = DistillLoss(cfg, student_dim=6, teacher_dims={"a": 12})
    assert set(loss_fn.projectors) == {"a"} and isinstance(loss_fn.projectors["a"], FeatureProjector)
    logits = torch.randn(8, 10, requires_grad=True)
    features = torch.randn(8, 6, requires_grad=True)
    targets = {"a": _teacher_batch(seed=1), "b": _teacher_batch(seed=2)}
    for t in targets.values():
        t.topk_logprob.requires_grad_(True)
        t.features.requires_grad_(True)
    total, parts = loss_fn(logits, features, torch.randint(0, 10, (8,)), targets)
    assert set(parts) == {"label", "kd/a", "kd/b", "feat/a", "total"}
    assert all(not p.requires_grad and p.dim() == 0 for p in parts.values())
    expected = parts["label"] + parts["kd/a"] + 0.5 * parts["kd/b"] + parts["feat/a"]
    assert torch.allclose(parts["total"], expected, atol=1e-5)
    total.backward()
    assert logits.grad.abs().sum() > 0 and features.grad.abs().sum() > 0
    assert loss_fn.projectors["a"].fc1.weight.grad.abs().sum() > 0
    assert all(t.topk_logprob.grad is None and t.features.grad is None for t in targets.values())
    assert "projectors.a.fc1.weight" in loss_fn.state_dict() and "standardizers.a.mean" in loss_fn.state_dict()


def test_distill_loss_labels_only_equals_label_loss():
    loss_fn = DistillLoss(DistillLossConfig(label_smoothing=0.2), student_dim=6, teacher_dims={})
    logits, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
    total, parts = loss_fn(logits, None, labels, {})
    assert torch.allclose(total, label_loss(logits, labels, 0.2).mean())
    assert set(parts) == {"label", "total"}
    # Smoothed integer labels and the equivalent soft labels give the same loss.
    soft = mix_labels(labels, 10, 1.0, 0.2)
    assert torch.allclose(label_loss(logits, labels, 0.2), label_loss(logits, soft, 0.2), atol=1e-6)


def test_distill_loss_with_no_features_in_batch_is_finite():
    cfg = DistillLossConfig(label_weight=0.0, teachers={"a": TeacherLossWeights(kd=1.0, feature=1.0)})
    loss_fn = DistillLoss(cfg, student_dim=6, teacher_dims={"a": 12})
    targets = _teacher_batch(mask=torch.zeros(8, dtype=torch.bool))
    targets.features[:] = float("nan")  # rows without features may hold anything
    logits, features = torch.randn(8, 10, requires_grad=True), torch.randn(8, 6, requires_grad=True)
    total, parts = loss_fn(logits, features, torch.randint(0, 10, (8,)), {"a": targets})
    assert parts["feat/a"] == 0 and torch.isfinite(total)
    assert torch.allclose(total, parts["kd/a"])
    total.backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(features.grad).all()
    assert torch.equal(loss_fn.standardizers["a"].num_updates, torch.tensor(0))


def test_distill_loss_feature_mask_averages_over_samples_with_features():
    cfg = DistillLossConfig(label_weight=0.0, teachers={"a": TeacherLossWeights(kd=0.0, feature=1.0)})
    loss_fn = DistillLoss(cfg, student_dim=6, teacher_dims={"a": 12}).eval()
    mask = torch.tensor([True, False] * 4)
    targets = _teacher_batch(mask=mask)
    features = torch.randn(8, 6)
    total, _ = loss_fn(torch.randn(8, 10), features, torch.zeros(8, dtype=torch.long), {"a": targets})
    pred = loss_fn.projectors["a"](features)
    expected = feature_loss(pred, loss_fn.standardizers["a"].standardize(targets.features))[mask].mean()
    assert torch.allclose(total, expected, atol=1e-6)


def test_distill_loss_teacher_dropping_keeps_hardest_and_drops_others():
    weights = {"a": TeacherLossWeights(kd=1.0), "b": TeacherLossWeights(kd=1.0)}
    logits = torch.randn(64, 10)
    targets = {"a": _teacher_batch(64, seed=1), "b": _teacher_batch(64, seed=2)}
    kd_a = kd_loss(logits, targets["a"].log_probs(1.0), 1.0)
    kd_b = kd_loss(logits, targets["b"].log_probs(1.0), 1.0)
    base = dict(label_weight=0.0, teachers=weights)
    labels = torch.zeros(64, dtype=torch.long)
    total_all, _ = DistillLoss(DistillLossConfig(**base), 6)(logits, None, labels, targets)
    assert torch.allclose(total_all, (kd_a + kd_b).mean(), atol=1e-6)
    total_max, parts = DistillLoss(DistillLossConfig(teacher_drop_prob=1.0, **base), 6)(logits, None, labels, targets)
    assert torch.allclose(total_max, torch.maximum(kd_a, kd_b).mean(), atol=1e-6)
    assert torch.allclose(parts["kept/a"] + parts["kept/b"], torch.tensor(1.0))


def test_mix_batch_off_and_mixup():
    images = torch.rand(6, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    out, lam = mix_batch(images, MixConfig(mixup_alpha=1.0, prob=0.0), g)
    assert lam == 1.0 and out is images
    out, lam = mix_batch(images, MixConfig(mixup_alpha=1.0), g)
    assert 0.0 < lam < 1.0
    assert torch.allclose(out, lam * images + (1 - lam) * images.flip(0))
    again, lam_again = mix_batch(images, MixConfig(mixup_alpha=1.0), torch.Generator().manual_seed(0))
    first, lam_first = mix_batch(images, MixConfig(mixup_alpha=1.0), torch.Generator().manual_seed(0))
    assert lam_again == lam_first and torch.equal(again, first)
    u8 = (images * 255).to(torch.uint8)
    out8, lam8 = mix_batch(u8, MixConfig(mixup_alpha=1.0), g)
    assert out8.dtype == torch.uint8
    assert (out8.float() - (lam8 * u8.float() + (1 - lam8) * u8.flip(0).float())).abs().max() <= 0.5


def test_cutmix_lam_is_the_pasted_area():
    images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 32, 32).contiguous()
    g = torch.Generator().manual_seed(3)
    lams = []
    for _ in range(20):
        out, lam = mix_batch(images, MixConfig(cutmix_alpha=1.0), g)
        pasted = (out[0, 0] != images[0, 0]).float().mean().item()  # sample 0 receives sample 3's pixels
        assert lam == pytest.approx(1 - pasted, abs=1e-9)
        assert torch.equal(out[1] != images[1], out[0] != images[0])  # one box for the whole batch
        lams.append(lam)
    assert any(lam < 1.0 for lam in lams)
    # Both alphas set: the switch picks cutmix or mixup, deterministically per seed.
    cfg = MixConfig(mixup_alpha=1.0, cutmix_alpha=1.0)
    runs = [mix_batch(images, cfg, torch.Generator().manual_seed(s)) for s in range(10)]
    again = [mix_batch(images, cfg, torch.Generator().manual_seed(s)) for s in range(10)]
    assert all(a[1] == b[1] and torch.equal(a[0], b[0]) for a, b in zip(runs, again))
    assert len({torch.equal(o[0, 0], o[0, 0, 0, 0].expand(32, 32)) for o, _ in runs}) == 2  # both kinds seen


def test_mixed_teacher_targets_and_labels():
    logits = torch.randn(6, 20) * 2
    targets = cached_targets(logits, k=5, features=torch.randn(6, 4),
                             feature_mask=torch.tensor([True, True, True, True, False, True]))
    lam = 0.3
    p = targets.log_probs(4.0).exp()
    mixed = targets.log_probs(4.0, lam).exp()
    assert torch.allclose(mixed, lam * p + (1 - lam) * p.flip(0), atol=1e-6)
    assert torch.allclose(mixed.sum(-1), torch.ones(6), atol=1e-5)
    features, mask = targets.mixed_features(lam)
    assert torch.allclose(features, lam * targets.features + (1 - lam) * targets.features.flip(0))
    assert mask.tolist() == [True, False, True, True, False, True]
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    soft = mix_labels(labels, 20, lam, 0.1)
    assert torch.allclose(soft.sum(-1), torch.ones(6))
    assert soft[0, 0].item() == pytest.approx(lam * (0.9 + 0.005) + (1 - lam) * 0.005)
    assert soft[0, 5].item() == pytest.approx((1 - lam) * (0.9 + 0.005) + lam * 0.005)
    # DistillLoss mixes integer labels and teacher distributions with the same lam.
    cfg = DistillLossConfig(teachers={"t": TeacherLossWeights(kd=1.0)}, temperature=4.0)
    student = torch.randn(6, 20)
    total, parts = DistillLoss(cfg, 4)(student, None, labels, {"t": targets}, lam=lam)
    assert torch.allclose(parts["label"], label_loss(student, soft).mean(), atol=1e-6)
    assert torch.allclose(parts["kd/t"], kd_loss(student, targets.log_probs(4.0, lam), 4.0).mean(), atol=1e-6)
    assert not torch.allclose(parts["kd/t"], kd_loss(student, targets.log_probs(4.0), 4.0).mean(), atol=1e-4)
