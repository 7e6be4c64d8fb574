"""The training loop of one Ray Train worker: stream, replay, distil, checkpoint, evaluate, export.

``train_worker`` is what ``TorchTrainer`` runs on each worker (jobs/train_student.py
launches it); ``run_worker`` runs the same loop in the calling process. Every worker
streams its own disjoint shards; rank 0 writes the checkpoints, metrics and the
exported model. The loop is deterministic on CPU: data order, dropout, mixup and
teacher dropping all come from seeded generators whose states are checkpointed, so a
resumed run ends with the same weights as an uninterrupted one.

On Ray Train, every checkpoint is also reported with ``ray.train.report``, as a small
pointer (the run directory and step) rather than a second copy of the state: the run
directory already holds the state, written once, where ``--resume`` and users find it,
and it may be on object storage, where a second upload would double the bytes. When
``FailureConfig(max_failures)`` restarts a lost worker group, ``ray.train.get_checkpoint()``
returns the last pointer and the new workers restore the run directory's checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn

from pipeline.data import storage
from pipeline.data.views import normalize
from pipeline.train.batches import StudentBatch
from pipeline.train.checkpoint import RunCheckpointer
from pipeline.train.evaluation import evaluate
from pipeline.train.export import export_student
from pipeline.train.losses import DistillLoss, DistillLossConfig, MixConfig, TeacherLossWeights, mix_batch
from pipeline.train.metrics import MetricsLog, plot_curves
from pipeline.train.student_data import StreamConfig, StudentInput, StudentStream
from pipeline.train.student_model import StudentWithLoss, autocast_context, create_student, feature_dim, \
    resolve_device
from pipeline.train.teacher_targets import cached_targets, load_online_teachers, online_targets
from pipeline.train.train_config import TrainConfig


@dataclass
class Position:
    """Where training stands: optimizer steps taken, and the epoch and step within it to run next."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


class WorkerRun:
    """One worker's share of a training run: built from the config and the driver's plan, then ``train()``."""

    def __init__(self, config: TrainConfig, plan: dict[str, Any], progress: Any = None,
                 session: RayTrainSession | None = None):
        self.config = config
        self.plan = plan  # what the driver resolved: num_classes, teachers, temperatures, label names
        self.progress = progress
        self.session = session  # None: not on Ray Train (nothing to report, nothing restored by Ray)
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
        distill = DistillLoss(self._loss_config(), feature_dim(self.student), self._feature_dims())
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
        self.checkpoints = RunCheckpointer(
            config.run_dir, {"module": self.module, "optimizer": self.optimizer, "scheduler": self.scheduler,
                             "ema": self.ema}, self.generator, self.rank, self.world_size)
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
        config = self.config
        return StreamConfig(batch_size=config.batch_size, seed=config.seed,
                            crops_per_image=config.crops_per_image if train else 1,
                            loader_workers=config.loader_workers, shards_in_flight=config.shards_in_flight,
                            shuffle_buffer=config.shuffle_buffer, num_classes=self.num_classes,
                            teacher_ids=tuple(self.plan["teachers"]) if train else (),
                            extra_sizes=extra if train else ())

    # -- the loop ------------------------------------------------------------------------------
    def train(self) -> None:
        self._restore()
        if self.rank == 0:
            self.log = MetricsLog(self.config.run_dir, self.position.step)
        total = self.config.epochs * self.steps_per_epoch
        self._report({"kind": "start", "total_steps": total, "step": self.position.step})
        while self.position.epoch < self.config.epochs:
            self._train_epoch()
            self._evaluate()
            self.position.epoch += 1
            self.position.step_in_epoch = 0
            self._save()
        if self.rank == 0:
            self._export()
        self._report({"kind": "done", "step": self.position.step})

    def _export(self) -> None:
        """model.safetensors, config.json, curves.png (and ema/), built in a local folder, then copied to the
        run directory file by file: on object storage each is one whole upload."""
        self.log.close()
        label_names = self.plan.get("label_names")
        with tempfile.TemporaryDirectory(prefix="export-") as folder:
            export_student(self.student, folder, self.input.size, label_names)
            if self.ema is not None:
                export_student(self.ema.module, os.path.join(folder, "ema"), self.input.size, label_names)
            plot_curves(self.config.run_dir, os.path.join(folder, "curves.png"))
            storage.upload_dir(folder, self.config.run_dir)

    def _train_epoch(self) -> None:
        config, pos = self.config, self.position
        self.module.train()
        started, images_seen, waited = time.perf_counter(), 0, 0.0
        for batch, wait in _timed(self.train_stream.iter_epoch(pos.epoch, pos.step_in_epoch)):
            parts = self.train_step(batch)
            pos.step += 1
            pos.step_in_epoch += 1
            images_seen += len(batch.labels) * self.world_size
            waited += wait
            if pos.step % config.log_every == 0 or pos.step_in_epoch == self.steps_per_epoch:
                elapsed = max(time.perf_counter() - started, 1e-9)
                self._log({"kind": "train", "step": pos.step,
                           "epoch": pos.epoch + pos.step_in_epoch / self.steps_per_epoch,
                           "lr": self.optimizer.param_groups[0]["lr"], "images_per_s": images_seen / elapsed,
                           "data_wait": waited / elapsed,  # the share of the time spent waiting for batches
                           **{("loss" if k == "total" else f"loss/{k}"): float(v) for k, v in parts.items()}})
                started, images_seen, waited = time.perf_counter(), 0, 0.0
            # The epoch's last step is checkpointed after evaluation, by train().
            if pos.step_in_epoch < self.steps_per_epoch and pos.step % config.checkpoint_every == 0:
                self._save()

    def _student_images(self, images: torch.Tensor) -> torch.Tensor:
        images = normalize(images.to(self.device), self.input.mean, self.input.std)
        return images.contiguous(memory_format=self.memory_format)

    def train_step(self, batch: StudentBatch) -> dict[str, torch.Tensor]:
        images = self._student_images(batch.images)
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

    def _evaluate(self) -> None:
        if self.val_stream is None:
            return
        models = {"": self.student} | ({"ema_": self.ema.module} if self.ema is not None else {})
        record = evaluate(models, self.val_stream, self._student_images, self.device,
                          lambda: autocast_context(self.config, self.device), self.num_classes, self.world_size)
        self._log({"kind": "eval", "step": self.position.step, "epoch": self.position.epoch + 1, **record})
        self.module.train()

    def _save(self) -> None:
        if self.rank == 0:
            self.log.flush()  # before the checkpoint: a resumed run finds every record up to its step
        self.checkpoints.save(self.position.step, {f.name: getattr(self.position, f.name) for f in fields(Position)})
        if self.session is not None:
            self.session.report_checkpoint(self.position.step, self.rank)

    def _restore(self) -> None:
        """Continue from the run directory's newest checkpoint when Ray Train restarts the workers
        after a failure (it hands back the last reported step) or when the run is resumed."""
        reported = self.session.reported_step() if self.session is not None else None
        if reported is None and not self.config.resume:
            return
        position = self.checkpoints.restore()
        found = -1 if position is None else position["step"]
        if reported is not None and found < reported:
            raise RuntimeError(f"Ray Train restarts this run from step {reported}, but the newest checkpoint in "
                               f"{self.config.run_dir} is " + (f"step {found}" if position else "missing"))
        if position is not None:
            self.position = Position(**position)

    # -- reporting -----------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            self.log.write(record)
        self._report(record)

    def _report(self, record: dict[str, Any]) -> None:
        if self.rank == 0 and self.progress is not None:
            self.progress.push.remote(record)


def _timed(batches: Iterator[StudentBatch]) -> Iterator[tuple[StudentBatch, float]]:
    """Each batch with the seconds the loop waited for it."""
    while True:
        started = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            return
        yield batch, time.perf_counter() - started


class RayTrainSession:
    """This worker's link to Ray Train: checkpoints reported as pointers, the last one read back on restart."""

    POINTER = "run_checkpoint.json"

    def __init__(self, run_dir: str):
        self.run_dir = str(run_dir)

    def report_checkpoint(self, step: int, rank: int) -> None:
        import ray.train

        # Every rank calls report (it is a barrier); rank 0 alone attaches the pointer.
        with tempfile.TemporaryDirectory(prefix="run-checkpoint-") as folder:
            checkpoint = None
            if rank == 0:
                pointer = {"run_dir": self.run_dir, "step": step}
                (Path(folder) / self.POINTER).write_text(json.dumps(pointer))
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report({"step": step}, checkpoint=checkpoint)

    def reported_step(self) -> int | None:
        """The step of the last checkpoint Ray Train has for this run (None: none yet)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return int(json.loads((Path(folder) / self.POINTER).read_text())["step"])


def run_worker(config: TrainConfig, plan: dict[str, Any], progress: Any = None,
               session: RayTrainSession | None = None) -> None:
    """One worker's whole run in this process: world size 1 unless torch.distributed is initialised."""
    torch.set_num_threads(max(1, int(plan["cpus_per_worker"])))
    run = WorkerRun(config, plan, progress, session)
    try:
        run.train()
    finally:
        run.train_stream.close()
        if run.val_stream is not None:
            run.val_stream.close()


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: ``loop_config`` holds the run's config, the driver's plan and a progress board."""
    config = TrainConfig.from_dict(loop_config["config"])
    _quiet_ray_train_reports()
    run_worker(config, loop_config["plan"], loop_config.get("progress"), RayTrainSession(config.run_dir))


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every reported checkpoint at INFO on the worker, and those lines reach the user's
    terminal; this run prints its own progress and summary instead."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray version: its own logging stays
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
