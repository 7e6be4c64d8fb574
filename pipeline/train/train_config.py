"""Options of a student training run: one dataclass, readable from YAML, overridable by flags.

The same ``TrainConfig`` travels from the CLI to every Ray Train worker and is
saved as ``RUN_DIR/run.json``; ``--resume`` compares it with the saved one so
that a resumed run cannot silently become a different run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipeline.data import storage

# Options that may differ between an interrupted run and its resumption: they
# change where and how fast the run executes, not what it computes.
RESUME_FREE = frozenset({"resume", "address", "loader_workers", "progress", "checkpoint_every", "log_every",
                         "max_failures", "start_timeout"})


class ConfigError(ValueError):
    """A bad option value, or a run directory that does not match the requested run."""


@dataclass
class TrainConfig:
    shards: list[str]
    out: str
    store: str | None = None
    model: str = "regla_t"
    epochs: int = 10
    batch_size: int = 128
    img_size: int | None = None  # student input size; None = the model's pretrained_cfg size
    val_shards: list[str] = field(default_factory=list)
    num_classes: int | None = None  # default: the manifest's class names, else the teachers' heads
    num_workers: int = 1  # Ray Train (DDP) workers
    cpus_per_worker: float | None = None  # default: the most whole CPUs every worker gets on the nodes (torch threads follow)
    max_failures: int = 3  # worker-group failures Ray Train recovers from (from the last checkpoint) before the run fails
    start_timeout: float = 300.0  # seconds to wait for the workers' resources before giving up
    loader_workers: int = 1  # spawned data loader processes per training worker
    address: str | None = None
    resume: bool = False
    seed: int = 0
    device: str = "auto"  # auto: cuda when Ray has GPUs, else cpu
    precision: str = "auto"  # auto: bf16 on GPUs that support it, fp32 elsewhere
    channels_last: bool = True  # NHWC student weights and inputs: faster convolutions on CPU and GPU
    # distillation
    no_distill: bool = False
    teachers: list[str] = field(default_factory=list)  # cached teacher ids to use; empty = all in the store
    online_teachers: list[str] = field(default_factory=list)  # teacher specs run live on the replayed views
    random_init_online: bool = False
    kd_weight: float = 1.0
    feature_weight: float = 0.0
    teacher_weights: dict[str, dict[str, float]] = field(default_factory=dict)  # id -> {"kd": w, "feature": w}
    label_weight: float = 1.0
    label_smoothing: float = 0.1
    temperature: float = 1.0
    teacher_drop_prob: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    crops_per_image: int = 1
    shards_in_flight: int = 16  # shards a loader reads at once, their examples interleaved
    shuffle_buffer: int = 2048  # examples shuffled on the way out (memory: this many rendered images)
    # optimisation
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr: float = 1e-5
    clip_grad: float | None = 5.0
    drop_path: float = 0.0
    ema_decay: float = 0.999  # 0 disables the weight EMA
    # bookkeeping
    checkpoint_every: int = 500  # steps; a checkpoint is also written at every epoch end
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "num_workers": self.num_workers,
                    "crops_per_image": self.crops_per_image, "log_every": self.log_every,
                    "shards_in_flight": self.shards_in_flight, "shuffle_buffer": self.shuffle_buffer,
                    "checkpoint_every": self.checkpoint_every}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.max_failures < 0:
            raise ConfigError(f"--max-failures must be at least 0, got {self.max_failures}")
        if self.start_timeout <= 0:
            raise ConfigError(f"--start-timeout must be positive, got {self.start_timeout}")
        if self.loader_workers < 0:
            raise ConfigError(f"--loader-workers must be at least 0, got {self.loader_workers}")
        if not 0.0 <= self.teacher_drop_prob <= 1.0:
            raise ConfigError(f"--teacher-drop-prob must be in [0, 1], got {self.teacher_drop_prob}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if not self.no_distill and not self.store and not self.online_teachers:
            raise ConfigError("no teachers: give --store (cached teachers) and/or --online-teacher, "
                              "or --no-distill to train with labels alone")
        if self.no_distill and (self.online_teachers or self.teachers):
            raise ConfigError("--no-distill trains with labels alone; it cannot take teachers")
        # The config is saved as run.json and sent to every worker: no location in it may carry a secret.
        weights = [spec.split(",", 1)[0].partition("@")[2] for spec in self.online_teachers]
        for location in [self.out, self.store or "", *self.shards, *self.val_shards, *weights]:
            storage.check_location(location)

    @property
    def run_dir(self) -> str:
        """The run directory: a local path or an object-storage URL."""
        return self.out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)

    def compare(self, saved: dict[str, Any]) -> list[str]:
        """Names of the options (other than RESUME_FREE ones) that differ from a saved run."""
        mine = self.to_dict()
        return [f"{name}: run has {saved.get(name)!r}, requested {mine[name]!r}"
                for name in sorted(mine) if name not in RESUME_FREE and saved.get(name) != mine[name]]


def load_yaml_options(path: str) -> dict[str, Any]:
    """Options from a YAML file; keys may use dashes like the flags (``batch-size``) or underscores."""
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def save_run_config(config: TrainConfig) -> None:
    storage.write_text(storage.join(config.run_dir, "run.json"), json.dumps(config.to_dict(), indent=2) + "\n")


def check_run_dir(config: TrainConfig) -> None:
    """Refuse to overwrite an existing run, and to resume a run that was started with other options."""
    saved_path = storage.join(config.run_dir, "run.json")
    if not config.resume:
        if storage.exists(saved_path):
            raise ConfigError(f"{config.run_dir} already holds a run; pass --resume to continue it, "
                              f"or choose another --out")
        return
    if not storage.exists(saved_path):
        raise ConfigError(f"--resume: {config.run_dir} holds no run (no run.json)")
    differences = config.compare(json.loads(storage.read_text(saved_path)))
    if differences:
        raise ConfigError(f"--resume: {config.run_dir} was started with other options: " + "; ".join(differences))
