"""Teacher targets for a training batch: joined from the cache, or computed live by online teachers."""

from __future__ import annotations

import torch

from pipeline.data.views import normalize
from pipeline.train.batches import StudentBatch
from pipeline.train.losses import TeacherTargets
from pipeline.train.train_config import TrainConfig
from teachers import Teacher, load_teacher, parse_teacher_spec


def cached_targets(batch: StudentBatch, temperatures: tuple[float, ...], num_classes: int,
                   device: torch.device) -> dict[str, TeacherTargets]:
    return {tid: TeacherTargets(topk_logprob=t.topk_logprob, topk_index=t.topk_index, log_leftover=t.log_leftover,
                                temperatures=temperatures, num_classes=num_classes, features=t.features,
                                feature_mask=t.feature_mask).to(device)
            for tid, t in batch.teachers.items()}


def load_online_teachers(config: TrainConfig, device: torch.device) -> dict[str, Teacher]:
    teachers = [load_teacher(parse_teacher_spec(spec), device, random_init=config.random_init_online, seed=config.seed)
                for spec in config.online_teachers]
    return {t.spec.teacher_id: t for t in teachers}


def online_targets(batch: StudentBatch, teachers: dict[str, Teacher], temperatures: tuple[float, ...],
                   device: torch.device) -> dict[str, TeacherTargets]:
    """Full-logit targets from teachers run live on the batch's views, rendered at their own sizes."""
    targets = {}
    for tid, teacher in teachers.items():
        pre = teacher.preprocessing
        images = batch.extra_images[(*pre.input_size, pre.interpolation)].to(device)
        logits, features = teacher(normalize(images, pre.mean, pre.std))
        targets[tid] = TeacherTargets.from_logits(logits, features if teacher.spec.features else None, temperatures)
    return targets
