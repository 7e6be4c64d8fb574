"""The student and its losses behind one forward pass, and the device and precision it runs at."""

from __future__ import annotations

import contextlib
from typing import Any

import timm
import torch
from torch import nn

import regla  # noqa: F401  (registers the regla_* models with timm)
from pipeline.train.losses import DistillLoss, TeacherTargets
from pipeline.train.train_config import TrainConfig


class StudentWithLoss(nn.Module):
    """The student and its distillation heads behind one forward, so DDP syncs both in one pass.

    The head runs once: the features the feature loss sees are what enters the classifier (read
    with a forward hook), so logits and features share one dropout mask and one pooling.
    """

    def __init__(self, student: nn.Module, distill: DistillLoss):
        super().__init__()
        self.student = student
        self.distill = distill
        classifier = student.get_classifier()
        if not isinstance(classifier, nn.Module) or isinstance(classifier, nn.Identity):
            raise ValueError(f"student {type(student).__name__} has no classifier module to take features from")

    def forward(self, images: torch.Tensor, labels: torch.Tensor, targets: dict[str, TeacherTargets],
                lam: float, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        seen: list[torch.Tensor] = []
        # Hooked only for this call: a model copied meanwhile (the EMA) must not carry the hook.
        classifier = self.student.get_classifier()
        hook = classifier.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
        try:
            logits = self.student.forward_head(self.student.forward_features(images))
        finally:
            hook.remove()
        return self.distill(logits.float(), seen[0].float(), labels, targets, generator=generator, lam=lam)


def resolve_device(config: TrainConfig) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def autocast_context(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    use_bf16 = config.precision == "bf16" or (
        config.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


def feature_dim(student: nn.Module) -> int:
    """Width of what enters the classifier (timm's ``head_hidden_size`` where a head has its own MLP)."""
    return int(getattr(student, "head_hidden_size", None) or student.num_features)


def create_student(config: TrainConfig, num_classes: int) -> nn.Module:
    kwargs: dict[str, Any] = {"num_classes": num_classes, "drop_path_rate": config.drop_path}
    if config.img_size:
        try:  # models with a fixed input size (ViTs) need it at construction; CNNs take none
            return timm.create_model(config.model, img_size=config.img_size, **kwargs)
        except TypeError:
            pass
    return timm.create_model(config.model, **kwargs)
