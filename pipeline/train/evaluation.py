"""Top-1 / top-5 accuracy of the student (and its EMA) on the validation stream, summed over ranks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from pipeline.train.student_data import StudentStream


@torch.no_grad()
def evaluate(models: dict[str, nn.Module], stream: StudentStream, prepare: Callable[[torch.Tensor], torch.Tensor],
             device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager],
             num_classes: int, world_size: int) -> dict[str, float]:
    """``{prefix}top1``/``top5`` per model (keys of ``models`` are the prefixes) and ``samples``.

    ``prepare`` turns a batch's uint8 images into the model's input (normalised, on the device).
    The models are left in eval mode.
    """
    for model in models.values():
        model.eval()
    k = min(5, num_classes)
    counts = torch.zeros(2 * len(models) + 1, dtype=torch.float64)
    for batch in stream.iter_epoch(0):
        images = prepare(batch.images)
        labels = batch.labels.to(device)
        for i, model in enumerate(models.values()):
            with autocast():
                top = model(images).float().topk(k, dim=-1).indices
            hits = top == labels[:, None]
            counts[2 * i] += hits[:, 0].sum().item()
            counts[2 * i + 1] += hits.any(dim=-1).sum().item()
        counts[-1] += len(labels)
    if world_size > 1:
        dist.all_reduce(counts)
    total = max(counts[-1].item(), 1.0)
    record = {"samples": int(counts[-1].item())}
    for i, prefix in enumerate(models):
        record[f"{prefix}top1"] = 100.0 * counts[2 * i].item() / total
        record[f"{prefix}top5"] = 100.0 * counts[2 * i + 1].item() / total
    return record
