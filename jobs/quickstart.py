"""The whole product on the bundled MNIST sample, on one embedded Ray.

Shards -> two teachers of different families trained on labels -> their outputs
cached per view -> a ReGLA student trained from the cache, and the same student
trained on labels alone -> a table of val accuracies. Both students follow one
recipe: same seed, epochs, label weight and replayed cached views; the labels-only
run sets the KD weight to 0, so the distillation loss is the only difference.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from jobs.cache_teachers import CacheJob, run_cache_job
from jobs.ray_env import ray_session
from jobs.train_student import TrainSummary, run_trainings
from pipeline.cache.store import CacheConfig
from pipeline.data.make_shards import make_mnist_sample
from pipeline.data.views import ViewPolicy
from pipeline.train.train_config import ConfigError, TrainConfig
from teachers import parse_teacher_spec


@dataclass
class QuickstartConfig:
    out: str = "quickstart"
    img_size: int = 32
    teachers: tuple[str, ...] = ("resnet10t", "convnext_atto")
    teacher_epochs: int = 2
    student: str = "regla_t"
    student_epochs: int = 3
    batch_size: int = 64
    views: int = 4
    topk: int = 5
    seed: int = 0
    progress: bool = True


@dataclass
class QuickstartResult:
    out: Path
    teachers: dict[str, TrainSummary]
    students: dict[str, TrainSummary]
    store: Path
    seconds: float

    def lines(self) -> list[str]:
        rows = [("run", "model", "top-1 %", "top-5 %", "EMA top-1 %")]
        for label, runs in (("teacher", self.teachers), ("student", self.students)):
            for name, summary in runs.items():
                e = summary.final_eval or {}
                rows.append((f"{label} {name}", summary.model, f"{e.get('top1', float('nan')):.2f}",
                             f"{e.get('top5', float('nan')):.2f}", f"{e.get('ema_top1', float('nan')):.2f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
        return table + [
            "",
            "Both students: same seed, epochs, label weight and cached views; labels only = KD weight 0.",
            "One seed on 1000 val digits: see docs/quality.md for the spread over seeds.",
            "",
            f"finished in {self.seconds:.0f} s; files under {self.out}:",
            f"  shards:   {self.out / 'shards'}",
            f"  cache:    {self.store}  (pipeline inspect {self.store})",
            *[f"  {kind}: {s.run_dir}" for kind, runs in (("teacher", self.teachers), ("student", self.students))
              for s in runs.values()],
        ]


def run_quickstart(config: QuickstartConfig) -> QuickstartResult:
    out = Path(config.out).resolve()
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty; choose another --out or remove it")
    started = time.perf_counter()
    train_manifest, val_manifest = make_mnist_sample(str(out / "shards"), img_size=config.img_size,
                                                     seed=config.seed, progress=config.progress)
    # Two runs at a time, one CPU share each: small models use a second thread poorly,
    # and the runs overlap each other's start-up.
    cpus_per_run = max(1.0, (os.cpu_count() or 2) / 2)
    common = dict(shards=[train_manifest], val_shards=[val_manifest], img_size=config.img_size,
                  batch_size=config.batch_size, seed=config.seed, progress=config.progress,
                  cpus_per_worker=cpus_per_run,
                  loader_workers=0)  # decoding 32 px digits costs less than a spawned loader process
    with ray_session():
        teacher_runs = run_trainings([TrainConfig(out=str(out / "teachers" / name), model=name, no_distill=True,
                                                  epochs=config.teacher_epochs, **common)
                                      for name in config.teachers], labels=list(config.teachers))
        teachers = dict(zip(config.teachers, teacher_runs))
        store = out / "cache.zarr"
        weights = {name: os.path.join(summary.run_dir, "model.safetensors") for name, summary in teachers.items()}
        specs = [parse_teacher_spec(f"{name}@{path},img_size={config.img_size}") for name, path in weights.items()]
        cache_config = CacheConfig(views=ViewPolicy(num_views=config.views, seed=config.seed), topk=config.topk)
        cached = run_cache_job(CacheJob(shards=train_manifest, store=str(store), teachers=specs,
                                        config=cache_config), progress=config.progress)
        if cached.failed:
            raise RuntimeError(f"caching failed for {', '.join(cached.failed)}")
        student_labels = ["KD from cache", "labels only"]
        student = dict(model=config.student, store=str(store), epochs=config.student_epochs, label_weight=1.0,
                       **common)
        student_runs = run_trainings([
            TrainConfig(out=str(out / "students" / "kd"), kd_weight=1.0, **student),
            TrainConfig(out=str(out / "students" / "labels"), kd_weight=0.0, **student),
        ], labels=student_labels)
        students = dict(zip(student_labels, student_runs))
    return QuickstartResult(out=out, teachers=teachers, students=students, store=store,
                            seconds=time.perf_counter() - started)
