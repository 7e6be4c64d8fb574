"""Distillation losses: label CE, logit KD from cached top-k targets, feature KD, teacher dropping, mixing.

Cached logit targets (store format 2, ``pipeline/cache/topk.py``) hold, per sample and view,
the top-k classes, their log-probabilities at T = 1 and, for each cached temperature T, the
log of the exact mass left to the other C - k classes. That gives each top-k class its
exact probability at T and spreads the exact leftover uniformly over the other classes, at
any logit scale. The teacher is never renormalised over its top-k: the student is
normalised over all C classes, so a renormalised teacher would push the student towards a
sharper distribution than the teacher's. With k = C the cached loss equals the live loss
up to the fp16 rounding of the stored log-probabilities.

Multi-teacher KD sums each teacher's weighted logit and feature losses. With teacher
dropping (UNIC, Sariyildiz et al. 2024) the teacher with the highest loss on a sample is
always kept and every other teacher is dropped with probability ``drop_prob``.

Mixup/CutMix pair each sample with the reversed batch, as timm's ``Mixup`` does in batch
mode. Cached targets are mixed with the same ``lam``: teacher probabilities (not logits)
and features are interpolated. That is an approximation: the teacher never saw the mixed
image, and its output on it is not the mixture of its outputs on the two originals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.cache.topk import rebuild_log_probs


def mix_log_probs(log_probs: torch.Tensor, lam: float) -> torch.Tensor:
    """log(lam * p + (1 - lam) * p.flip(0)): mixes probabilities, not logits."""
    if lam >= 1.0:
        return log_probs
    if lam <= 0.0:
        return log_probs.flip(0)
    return torch.logaddexp(log_probs + math.log(lam), log_probs.flip(0) + math.log1p(-lam))


@dataclass
class TeacherTargets:
    """One teacher's targets for one batch (tensors on the training device)."""

    topk_logprob: torch.Tensor  # [B, k] float32, log_softmax(logits) (T = 1) of the top-k classes
    topk_index: torch.Tensor  # [B, k] int64 class indices
    log_leftover: torch.Tensor  # [B, T] float32, log of the other classes' mass at each t; -inf when k = C
    temperatures: tuple[float, ...]
    num_classes: int
    features: torch.Tensor | None = None  # [B, D] float32 pooled teacher features
    feature_mask: torch.Tensor | None = None  # [B] bool: samples that have features; None = all

    def __post_init__(self) -> None:
        self.temperatures = tuple(float(t) for t in self.temperatures)
        batch, k = self.topk_logprob.shape
        if self.topk_index.shape != (batch, k):
            raise ValueError(f"topk_index shape {tuple(self.topk_index.shape)} != topk_logprob shape {(batch, k)}")
        if self.log_leftover.shape != (batch, len(self.temperatures)):
            raise ValueError(f"log_leftover shape {tuple(self.log_leftover.shape)} != (batch, num temperatures) "
                             f"{(batch, len(self.temperatures))}")
        if not 0 < k <= self.num_classes:
            raise ValueError(f"top-k size {k} must be in [1, num_classes={self.num_classes}]")
        if self.features is not None and self.features.shape[0] != batch:
            raise ValueError(f"features batch {self.features.shape[0]} != {batch}")
        if self.feature_mask is not None and self.feature_mask.shape != (batch,):
            raise ValueError(f"feature_mask shape {tuple(self.feature_mask.shape)} != {(batch,)}")

    @classmethod
    def from_logits(cls, logits: torch.Tensor, features: torch.Tensor | None = None,
                    temperatures: tuple[float, ...] = (1.0,)) -> TeacherTargets:
        """Full-logit targets (k = num_classes) from a live ("online") teacher forward."""
        logits = logits.detach().float()
        batch, num_classes = logits.shape
        index = torch.arange(num_classes, device=logits.device).expand(batch, num_classes)
        nothing_left = torch.full((batch, len(temperatures)), -math.inf, device=logits.device)
        return cls(topk_logprob=F.log_softmax(logits, dim=-1), topk_index=index, log_leftover=nothing_left,
                   temperatures=tuple(temperatures), num_classes=num_classes,
                   features=None if features is None else features.detach().float())

    @property
    def batch_size(self) -> int:
        return self.topk_logprob.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TeacherTargets:
        def move(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(device, non_blocking=non_blocking)

        return replace(self, topk_logprob=move(self.topk_logprob), topk_index=move(self.topk_index),
                       log_leftover=move(self.log_leftover), features=move(self.features),
                       feature_mask=move(self.feature_mask))

    def _temperature_index(self, temperature: float) -> int:
        for i, t in enumerate(self.temperatures):
            if math.isclose(t, temperature, rel_tol=1e-6):
                return i
        raise ValueError(f"temperature {temperature} is not cached; the stored temperatures are "
                         f"{list(self.temperatures)}")

    def log_probs(self, temperature: float, lam: float = 1.0) -> torch.Tensor:
        """Teacher log-distribution [B, C] at ``temperature``, rebuilt from the top-k encoding.

        Top-k class i gets (1 - L_T) * softmax(topk_logprob / T)_i, each of the C - k other
        classes L_T / (C - k), with L_T the stored leftover (``pipeline.cache.topk``). Never
        renormalised over the top-k. ``lam < 1`` mixes the distribution with the reversed
        batch (see ``mix_log_probs``).
        """
        # Targets are constants: detached so no gradient ever reaches a teacher.
        leftover = self.log_leftover[:, self._temperature_index(temperature)].detach()
        out = rebuild_log_probs(self.topk_logprob.detach(), self.topk_index, leftover, self.num_classes, temperature)
        return mix_log_probs(out, lam)

    def mixed_features(self, lam: float = 1.0) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(features, mask) mixed with the reversed batch; a mixed sample has features only if both halves do."""
        mask = self.feature_mask
        if mask is None:
            mask = torch.ones(self.batch_size, dtype=torch.bool, device=self.topk_logprob.device)
        features = None if self.features is None else self.features.detach().float()
        if lam >= 1.0 or features is None:
            return features, mask
        return lam * features + (1.0 - lam) * features.flip(0), mask & mask.flip(0)


def label_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """Per-sample cross-entropy [B]; int labels [B] get label smoothing, soft labels [B, C] are used as given
    (``mix_labels`` already smooths them)."""
    logits = logits.float()
    if labels.dim() == 1:
        return F.cross_entropy(logits, labels.long(), label_smoothing=smoothing, reduction="none")
    return -(labels.float() * F.log_softmax(logits, dim=-1)).sum(-1)


def kd_loss(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample T^2 * KL(teacher || softmax(student / T)) [B], in float32 even under autocast."""
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        student = F.log_softmax(student_logits.float() / temperature, dim=-1)
        teacher = teacher_log_probs.float()
        p = teacher.exp()
        # Classes with zero teacher mass contribute 0 (avoids 0 * -inf when a caller passes -inf).
        kl = torch.where(p > 0, p * (teacher - student), torch.zeros_like(p)).sum(-1)
    return kl * temperature**2


def feature_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample 0.5 * (1 - cosine) + 0.5 * smooth-L1 [B] (the cosine term ignores scale, smooth-L1 does not)."""
    pred, target = pred.float(), target.float()
    cosine = F.cosine_similarity(pred, target, dim=-1, eps=1e-8)
    return 0.5 * (1.0 - cosine) + 0.5 * F.smooth_l1_loss(pred, target, reduction="none").mean(-1)


def teacher_dropping(losses: torch.Tensor, drop_prob: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep mask [num_teachers, B] for per-sample teacher losses [num_teachers, B].

    Per sample, the teacher with the highest loss is always kept; each other teacher
    is dropped with probability ``drop_prob``.
    """
    losses = losses.detach()
    device = generator.device if generator is not None else losses.device
    keep = torch.rand(losses.shape, generator=generator, device=device).to(losses.device) >= drop_prob
    hardest = F.one_hot(losses.argmax(0), losses.shape[0]).T.bool()
    return keep | hardest


class FeatureProjector(nn.Module):
    """Student features -> teacher feature space: Linear, GELU, Linear (one per teacher)."""

    def __init__(self, student_dim: int, teacher_dim: int, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or max(student_dim, teacher_dim)
        self.fc1 = nn.Linear(student_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, teacher_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class FeatureStandardizer(nn.Module):
    """Running per-dim mean/std of one teacher's features, so teachers with different
    feature scales weigh alike. Updated in training mode, frozen in eval mode; the
    statistics are buffers, hence in the state_dict and in checkpoints."""

    def __init__(self, dim: int, momentum: float = 0.01, eps: float = 1e-6):
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    @torch.no_grad()
    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """EMA update from the samples [B, D] where ``mask`` [B] is True; the first update
        initialises. Fewer than 2 samples: no update. No host sync (runs every step)."""
        x = x.float()
        if mask is None:
            mask = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        x = torch.where(mask[:, None], x, torch.zeros_like(x))  # masked rows may hold anything
        count = mask.sum()
        mean = x.sum(0) / count.clamp_min(1)
        var = (torch.where(mask[:, None], x - mean, torch.zeros_like(x)) ** 2).sum(0) / (count - 1).clamp_min(1)
        valid = count >= 2
        rate = torch.where(self.num_updates == 0, 1.0, self.momentum) * valid
        self.mean.lerp_(mean, rate)
        self.var.lerp_(var, rate)
        self.num_updates += valid.long()

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / (self.std + self.eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.training:
            self.update(x, mask)
        return self.standardize(x)


@dataclass
class TeacherLossWeights:
    kd: float = 1.0
    feature: float = 0.0  # 0 disables feature KD for this teacher (no projector created)


@dataclass
class DistillLossConfig:
    label_weight: float = 1.0  # weight of the label CE (0 = pure KD)
    label_smoothing: float = 0.1
    temperature: float = 1.0  # KD temperature; must be one of the cached temperatures
    teachers: dict[str, TeacherLossWeights] = field(default_factory=dict)
    teacher_drop_prob: float = 0.0  # 0 = fixed weights; > 0 = teacher dropping

    def __post_init__(self) -> None:
        self.teachers = {tid: w if isinstance(w, TeacherLossWeights) else TeacherLossWeights(**w)
                         for tid, w in self.teachers.items()}
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.teacher_drop_prob <= 1.0:
            raise ValueError(f"teacher_drop_prob must be in [0, 1], got {self.teacher_drop_prob}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.label_weight <= 0 and not self.teachers:
            raise ValueError("label_weight is 0 and there are no teachers: nothing to train on")


class DistillLoss(nn.Module):
    """Label CE + per-teacher logit KD + per-teacher feature KD, with optional teacher dropping.

    Holds the projectors and standardizers (``nn.ModuleDict`` keyed by teacher id), which
    are trained with the student and dropped at export.

    Normalisation: each teacher's per-sample loss is ``kd_w * kd + feat_w * feat``, where
    the feature term is averaged over the samples that have features (so its scale does
    not depend on how many views have cached features). Teacher losses are summed over
    teachers (the weights set their scale). With teacher dropping, dropped entries count
    0 and the kept ones are summed and divided by the batch size, without rescaling by
    1 / (1 - drop_prob): dropping moves weight towards the hardest teacher per sample.
    """

    def __init__(self, config: DistillLossConfig, student_dim: int, teacher_dims: dict[str, int] | None = None):
        super().__init__()
        self.config = config
        teacher_dims = teacher_dims or {}
        self.projectors = nn.ModuleDict()
        self.standardizers = nn.ModuleDict()
        for tid, weights in config.teachers.items():
            if weights.feature <= 0:
                continue
            if tid not in teacher_dims:
                raise ValueError(f"teacher '{tid}' has feature weight {weights.feature} but no feature size "
                                 f"in teacher_dims (have {sorted(teacher_dims)})")
            self.projectors[tid] = FeatureProjector(student_dim, teacher_dims[tid])
            self.standardizers[tid] = FeatureStandardizer(teacher_dims[tid])

    def forward(self, student_logits: torch.Tensor, student_features: torch.Tensor | None, labels: torch.Tensor,
                targets: dict[str, TeacherTargets], generator: torch.Generator | None = None,
                lam: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scalar total loss, parts); parts are detached scalars: "label", "kd/<tid>", "feat/<tid>",
        "kept/<tid>" (fraction kept, with teacher dropping) and "total".

        ``lam < 1``: the batch was mixed with its reverse (``mix_batch``); integer labels and
        every teacher's distribution and features are mixed to match. Soft labels are used as given.
        Teachers in ``targets`` but not in the config are ignored.
        """
        cfg = self.config
        parts: dict[str, torch.Tensor] = {}
        total = student_logits.new_zeros((), dtype=torch.float32)
        if cfg.label_weight > 0:
            if labels.dim() == 1 and lam < 1.0:
                labels = mix_labels(labels, student_logits.shape[-1], lam, cfg.label_smoothing)
            label = label_loss(student_logits, labels, cfg.label_smoothing).mean()
            parts["label"] = label.detach()
            total = total + cfg.label_weight * label

        if cfg.teachers:
            per_teacher, decide = self._teacher_losses(student_logits, student_features, targets, lam, parts)
            stacked = torch.stack(per_teacher)  # [num_teachers, B]
            if cfg.teacher_drop_prob > 0:
                keep = teacher_dropping(torch.stack(decide), cfg.teacher_drop_prob, generator)
                stacked = stacked * keep
                for tid, kept in zip(cfg.teachers, keep.float().mean(1)):
                    parts[f"kept/{tid}"] = kept
            total = total + stacked.sum(0).mean()

        parts["total"] = total.detach()
        return total, parts

    def _teacher_losses(self, student_logits: torch.Tensor, student_features: torch.Tensor | None,
                        targets: dict[str, TeacherTargets], lam: float, parts: dict[str, torch.Tensor]
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per teacher: the weighted per-sample loss [B] and its detached, unscaled form for dropping."""
        cfg = self.config
        missing = [tid for tid in cfg.teachers if tid not in targets]
        if missing:
            raise ValueError(f"no targets for teachers {missing} (got {sorted(targets)})")
        per_teacher, decide = [], []
        for tid, weights in cfg.teachers.items():
            target = targets[tid]
            loss = student_logits.new_zeros(student_logits.shape[0], dtype=torch.float32)
            raw = loss.detach().clone()
            if weights.kd > 0:
                kd = kd_loss(student_logits, target.log_probs(cfg.temperature, lam), cfg.temperature)
                parts[f"kd/{tid}"] = kd.detach().mean()
                loss = loss + weights.kd * kd
                raw = raw + weights.kd * kd.detach()
            if weights.feature > 0:
                feat, mask = self._feature_loss(tid, student_features, target, lam)
                count = mask.sum()
                parts[f"feat/{tid}"] = (feat.detach() * mask).sum() / count.clamp_min(1)
                # Averaged over the samples with features: scaled by B / count, 0 where masked out.
                scale = mask.float() * (mask.numel() / count.clamp_min(1))
                loss = loss + weights.feature * feat * scale
                raw = raw + weights.feature * feat.detach() * mask
            per_teacher.append(loss)
            decide.append(raw)
        return per_teacher, decide

    def _feature_loss(self, tid: str, student_features: torch.Tensor | None, target: TeacherTargets,
                      lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        if student_features is None:
            raise ValueError(f"teacher '{tid}' has a feature weight but student_features is None")
        if target.features is None:
            raise ValueError(f"teacher '{tid}' has a feature weight but its targets have no features")
        standardizer = self.standardizers[tid]
        if standardizer.training:  # statistics from the unmixed features
            standardizer.update(target.features, target.feature_mask)
        # Standardising is affine per dim, so it commutes with mixing (lam + (1 - lam) = 1).
        features, mask = target.mixed_features(lam)
        # Rows without features may hold anything (zeros, NaN): replace them before the loss,
        # since a NaN target would reach the gradient even through a zero weight.
        teacher = torch.where(mask[:, None], standardizer.standardize(features), 0.0)
        pred = self.projectors[tid](student_features)
        feat = feature_loss(pred, teacher)
        return torch.where(mask, feat, torch.zeros_like(feat)), mask


@dataclass
class MixConfig:
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0  # probability of mixing a batch
    switch_prob: float = 0.5  # when both alphas > 0, probability of cutmix instead of mixup

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


def _uniform(generator: torch.Generator) -> float:
    return torch.rand((), generator=generator, device=generator.device).item()


def _beta(alpha: float, generator: torch.Generator) -> float:
    """Beta(alpha, alpha) draw, seeded from ``generator`` (torch's Beta takes no generator)."""
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device).item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def cutmix_box(height: int, width: int, lam: float, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of a box with area about (1 - lam) of the image, centred anywhere, clipped to it."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy = int(torch.randint(0, height, (), generator=generator, device=generator.device).item())
    cx = int(torch.randint(0, width, (), generator=generator, device=generator.device).item())
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return y0, y1, x0, x1


def mix_batch(images: torch.Tensor, config: MixConfig, generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """Mixup or CutMix of each sample with the reversed batch; returns (images, lam), lam = 1.0: unmixed.

    CutMix corrects lam to the pasted area. Deterministic given ``generator``; float or uint8 [B, C, H, W].
    """
    if not config.enabled or _uniform(generator) >= config.prob:
        return images, 1.0
    use_cutmix = config.cutmix_alpha > 0 and (config.mixup_alpha <= 0 or _uniform(generator) < config.switch_prob)
    if use_cutmix:
        lam = _beta(config.cutmix_alpha, generator)
        height, width = images.shape[-2:]
        y0, y1, x0, x1 = cutmix_box(height, width, lam, generator)
        mixed = images.clone()
        mixed[..., y0:y1, x0:x1] = images.flip(0)[..., y0:y1, x0:x1]
        return mixed, 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    lam = _beta(config.mixup_alpha, generator)
    if images.is_floating_point():
        return images * lam + images.flip(0) * (1.0 - lam), lam
    mixed = images.float() * lam + images.flip(0).float() * (1.0 - lam)
    return mixed.round().clamp(0, 255).to(images.dtype), lam


def mix_labels(labels: torch.Tensor, num_classes: int, lam: float, smoothing: float) -> torch.Tensor:
    """Soft targets [B, C]: smoothed one-hot labels mixed with the reversed batch's."""
    off = smoothing / num_classes
    one_hot = F.one_hot(labels.long(), num_classes).float()
    smoothed = one_hot * (1.0 - smoothing) + off
    return lam * smoothed + (1.0 - lam) * smoothed.flip(0)
