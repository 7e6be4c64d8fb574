"""The training loop of one Ray Train worker: stream, replay, distil, checkpoint, evaluate, export.

``train_worker`` is what ``TorchTrainer`` runs on each worker (jobs/train_student.py
launches it). Every worker streams its own disjoint shards; rank 0 writes the
checkpoints, metrics and the exported model. The loop is deterministic on CPU:
data order, dropout, mixup and teacher dropping all come from seeded generators
whose states are checkpointed, so a resumed run ends with the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn

import regla  # noqa: F401  (registers the regla_* models with timm)
from pipeline.data.views import normalize
from pipeline.train.checkpoint import latest_checkpoint, load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from pipeline.train.export import export_student
from pipeline.train.losses import DistillLoss, DistillLossConfig, MixConfig, TeacherLossWeights, TeacherTargets, mix_batch
from pipeline.train.metrics import MetricsLog, plot_curves
from pipeline.train.student_data import StreamConfig, StudentBatch, StudentInput, StudentStream
from pipeline.train.train_config import TrainConfig
from teachers import Teacher, load_teacher, parse_teacher_spec


class StudentWithLoss(nn.Module):
    """The student and its distillation heads behind one forward, so DDP syncs both in one pass."""

    def __init__(self, student: nn.Module, distill: DistillLoss):
        super().__init__()
        self.student = student
        self.distill = distill

    def forward(self, images: torch.Tensor, labels: torch.Tensor, targets: dict[str, TeacherTargets],
                lam: float, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pooled = self.student.forward_features(images)
        features = self.student.forward_head(pooled, pre_logits=True)
        logits = self.student.forward_head(pooled)
        return self.distill(logits.float(), features.float(), labels, targets, generator=generator, lam=lam)


@dataclass
class Position:
    """Where training stands: optimizer steps taken, and the epoch and step within it to run next."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


def resolve_device(config: TrainConfig) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def autocast_context(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    use_bf16 = config.precision == "bf16" or (
        config.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


def create_student(config: TrainConfig, num_classes: int) -> nn.Module:
    kwargs: dict[str, Any] = {"num_classes": num_classes, "drop_path_rate": config.drop_path}
    if config.img_size:
        try:  # models with a fixed input size (ViTs) need it at construction; CNNs take none
            return timm.create_model(config.model, img_size=config.img_size, **kwargs)
        except TypeError:
            pass
    return timm.create_model(config.model, **kwargs)


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
    targets = {}
    for tid, teacher in teachers.items():
        pre = teacher.preprocessing
        images = batch.extra_images[(*pre.input_size, pre.interpolation)].to(device)
        logits, features = teacher(normalize(images, pre.mean, pre.std))
        targets[tid] = TeacherTargets.from_logits(logits, features if teacher.spec.features else None, temperatures)
    return targets


class WorkerRun:
    """One worker's share of a training run (built by ``train_worker``)."""

    def __init__(self, config: TrainConfig, plan: dict[str, Any], progress: Any = None):
        self.config = config
        self.plan = plan  # what the driver resolved: num_classes, teachers, temperatures, label names
        self.progress = progress
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.device = resolve_device(config)
        self.num_classes = plan["num_classes"]
        self.temperatures = tuple(plan["temperatures"])

        torch.manual_seed(config.seed)  # same initial weights on every rank
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.student = create_student(config, self.num_classes).to(self.device, memory_format=self.memory_format)
        self.input = StudentInput.from_model(self.student, config.img_size)
        self.online = load_online_teachers(config, self.device)
        distill = DistillLoss(self._loss_config(), self.student.num_features, self._feature_dims())
        self.module = StudentWithLoss(self.student, distill).to(self.device)
        self.ddp = (nn.parallel.DistributedDataParallel(self.module) if self.world_size > 1 else self.module)

        self.train_stream = StudentStream(plan["dataset"], None if config.no_distill else config.store,
                                          self.input, self._stream_config(train=True), self.rank, self.world_size)
        self.val_stream = (StudentStream(plan["val_dataset"], None, self.input, self._stream_config(train=False),
                                         self.rank, self.world_size, eval_mode=True)
                           if plan["val_dataset"] is not None else None)
        self.steps_per_epoch = self.train_stream.steps_per_epoch()
        self.optimizer = create_optimizer_v2(self.module, opt="adamw", lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched="cosine", num_epochs=config.epochs, warmup_epochs=config.warmup_epochs,
            min_lr=config.min_lr, warmup_lr=config.min_lr, step_on_epochs=False,
            updates_per_epoch=self.steps_per_epoch)
        self.ema = ModelEmaV3(self.student, decay=config.ema_decay, use_warmup=True) if config.ema_decay > 0 else None
        self.mix = MixConfig(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix)
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + self.rank)
        torch.manual_seed(config.seed * 1000 + self.rank)  # dropout / drop-path differ per rank
        self.position = Position()
        self.log: MetricsLog | None = None

    # -- construction helpers ------------------------------------------------------------------
    def _teacher_ids(self) -> list[str]:
        return list(self.plan["teachers"]) + list(self.online)

    def _loss_config(self) -> DistillLossConfig:
        weights = {}
        for tid in self._teacher_ids():
            given = self.config.teacher_weights.get(tid, {})
            has_features = (self.plan["teachers"].get(tid, {}).get("features", False) if tid in self.plan["teachers"]
                            else self.online[tid].spec.features)
            weights[tid] = TeacherLossWeights(
                kd=given.get("kd", self.config.kd_weight),
                feature=given.get("feature", self.config.feature_weight) if has_features else 0.0)
        return DistillLossConfig(label_weight=self.config.label_weight, label_smoothing=self.config.label_smoothing,
                                 temperature=self.config.temperature, teachers=weights,
                                 teacher_drop_prob=self.config.teacher_drop_prob)

    def _feature_dims(self) -> dict[str, int]:
        dims = {tid: info["feature_dim"] for tid, info in self.plan["teachers"].items()}
        dims.update({tid: t.feature_dim for tid, t in self.online.items()})
        return dims

    def _stream_config(self, train: bool) -> StreamConfig:
        extra = tuple((*t.preprocessing.input_size, t.preprocessing.interpolation) for t in self.online.values())
        return StreamConfig(batch_size=self.config.batch_size, seed=self.config.seed,
                            crops_per_image=self.config.crops_per_image if train else 1,
                            loader_workers=self.config.loader_workers, num_classes=self.num_classes,
                            teacher_ids=tuple(self.plan["teachers"]) if train else (),
                            extra_sizes=extra if train else ())

    # -- checkpoints ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "position": vars(self.position).copy()}

    def restore(self) -> None:
        path = latest_checkpoint(self.config.run_dir)
        if path is None:
            return
        state = load_checkpoint(path)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.position = Position(**state["position"])
        restore_rng_state(state["rng"][self.rank], self.generator)

    def save(self) -> None:
        """Rank 0 writes the checkpoint, with every rank's RNG state so that each resumes its own stream."""
        rngs = [rng_state(self.generator)]
        if self.world_size > 1:
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if self.rank == 0:
            state = self.state()
            state["rng"] = rngs
            save_checkpoint(self.config.run_dir, self.position.step, state)
        if self.world_size > 1:
            dist.barrier()

    # -- the loop ------------------------------------------------------------------------------
    def train(self) -> None:
        if self.config.resume:
            self.restore()
        if self.rank == 0:
            self.log = MetricsLog(self.config.run_dir, self.position.step)
        total = self.config.epochs * self.steps_per_epoch
        self._report({"kind": "start", "total_steps": total, "step": self.position.step})
        while self.position.epoch < self.config.epochs:
            self._train_epoch()
            self._evaluate()
            self.position.epoch += 1
            self.position.step_in_epoch = 0
            self.save()
        if self.rank == 0:
            export_student(self.student, self.config.run_dir, self.input.size, self.plan.get("label_names"))
            if self.ema is not None:
                export_student(self.ema.module, self.config.run_dir / "ema", self.input.size,
                               self.plan.get("label_names"))
            plot_curves(self.config.run_dir)
        self._report({"kind": "done", "step": self.position.step})

    def _train_epoch(self) -> None:
        config, pos = self.config, self.position
        self.module.train()
        started, images_seen = time.perf_counter(), 0
        batches = self.train_stream.iter_epoch(pos.epoch, pos.step_in_epoch)
        for batch in batches:
            parts = self.train_step(batch)
            pos.step += 1
            pos.step_in_epoch += 1
            images_seen += len(batch.labels) * self.world_size
            if pos.step % config.log_every == 0 or pos.step_in_epoch == self.steps_per_epoch:
                elapsed = time.perf_counter() - started
                record = {"kind": "train", "step": pos.step, "epoch": pos.epoch + pos.step_in_epoch /
                          self.steps_per_epoch, "lr": self.optimizer.param_groups[0]["lr"],
                          "images_per_s": images_seen / max(elapsed, 1e-9),
                          **{("loss" if k == "total" else f"loss/{k}"): float(v) for k, v in parts.items()}}
                self._log(record)
            interrupt = config.interrupt_after_steps is not None and pos.step >= config.interrupt_after_steps
            # The epoch's last step is checkpointed after evaluation, by train().
            if pos.step_in_epoch < self.steps_per_epoch and (pos.step % config.checkpoint_every == 0 or interrupt):
                self.save()
            if interrupt:
                raise RuntimeError(f"interrupted after step {pos.step} (interrupt_after_steps)")

    def _student_images(self, batch: StudentBatch) -> torch.Tensor:
        images = normalize(batch.images.to(self.device), self.input.mean, self.input.std)
        return images.contiguous(memory_format=self.memory_format)

    def train_step(self, batch: StudentBatch) -> dict[str, torch.Tensor]:
        images = self._student_images(batch)
        labels = batch.labels.to(self.device)
        targets = cached_targets(batch, self.temperatures, self.num_classes, self.device)
        targets.update(online_targets(batch, self.online, self.temperatures, self.device))
        images, lam = mix_batch(images, self.mix, self.generator)  # lam = 1 (untouched) when mixing is off
        with autocast_context(self.config, self.device):
            loss, parts = self.ddp(images, labels, targets, lam, self.generator)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.position.step + 1}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.clip_grad:
            nn.utils.clip_grad_norm_(self.module.parameters(), self.config.clip_grad)
        self.optimizer.step()
        self.scheduler.step_update(num_updates=self.position.step + 1)
        if self.ema is not None:
            self.ema.update(self.student, step=self.position.step + 1)
        return parts

    @torch.no_grad()
    def _evaluate(self) -> None:
        if self.val_stream is None:
            return
        models = {"": self.student} | ({"ema_": self.ema.module} if self.ema is not None else {})
        for model in models.values():
            model.eval()
        k = min(5, self.num_classes)
        counts = torch.zeros(2 * len(models) + 1, dtype=torch.float64)
        for batch in self.val_stream.iter_epoch(0):
            images = self._student_images(batch)
            labels = batch.labels.to(self.device)
            for i, model in enumerate(models.values()):
                with autocast_context(self.config, self.device):
                    top = model(images).float().topk(k, dim=-1).indices
                hits = top == labels[:, None]
                counts[2 * i] += hits[:, 0].sum().item()
                counts[2 * i + 1] += hits.any(dim=-1).sum().item()
            counts[-1] += len(labels)
        if self.world_size > 1:
            dist.all_reduce(counts)
        total = max(counts[-1].item(), 1.0)
        record = {"kind": "eval", "step": self.position.step, "epoch": self.position.epoch + 1,
                  "samples": int(counts[-1].item())}
        for i, prefix in enumerate(models):
            record[f"{prefix}top1"] = 100.0 * counts[2 * i].item() / total
            record[f"{prefix}top5"] = 100.0 * counts[2 * i + 1].item() / total
        self._log(record)
        self.module.train()

    # -- reporting -----------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            self.log.write(record)
        self._report(record)

    def _report(self, record: dict[str, Any]) -> None:
        if self.rank == 0 and self.progress is not None:
            self.progress.push.remote(record)


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: ``loop_config`` holds the run's config, the driver's plan and a progress board."""
    config = TrainConfig.from_dict(loop_config["config"])
    threads = max(1, math.floor(loop_config["plan"]["cpus_per_worker"]))
    torch.set_num_threads(threads)
    run = WorkerRun(config, loop_config["plan"], loop_config.get("progress"))
    try:
        run.train()
    finally:
        run.train_stream.close()
        if run.val_stream is not None:
            run.val_stream.close()
