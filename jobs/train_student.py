"""The training job: check the inputs on the driver, then run ``pipeline.train.trainer`` on Ray Train.

Everything that can be wrong with the inputs (model name, shards, store, teachers,
class counts, the run directory) is checked here, before any Ray worker starts,
so that a bad flag is a one-line error rather than a failed worker's traceback.
Rank 0 streams its progress records to a small actor that the driver polls for
its progress bar.
"""

from __future__ import annotations

import difflib
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray
import timm

import regla  # noqa: F401  (registers the regla_* models with timm)
from jobs.ray_env import ray_session
from jobs.nodes import alive_nodes, describe_nodes
from jobs.worker_resources import WorkerResources, plan_worker_resources
from pipeline.cache.store import CacheStore
from pipeline.data import storage
from pipeline.data.shards import DatasetIndex, index_dataset
from pipeline.train.metrics import read_metrics
from pipeline.train.train_config import ConfigError, TrainConfig, check_run_dir, save_run_config
from teachers import load_teacher, parse_teacher_spec


START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Collects rank 0's progress records until the driver drains them."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def push(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def drain(self) -> list[dict[str, Any]]:
        records, self.records = self.records, []
        return records


@dataclass
class TrainSummary:
    run_dir: str
    model: str
    steps: int
    seconds: float
    final_eval: dict[str, Any] | None
    images_per_second: float | None

    def lines(self) -> list[str]:
        lines = [f"trained {self.steps} steps in {self.seconds:.0f} s"
                 + (f" ({self.images_per_second:.0f} images/s in the last epoch)" if self.images_per_second else "")]
        if self.final_eval:
            e = self.final_eval
            lines.append(f"val top-1 {e['top1']:.2f}%, top-5 {e['top5']:.2f}%"
                         + (f"; EMA top-1 {e['ema_top1']:.2f}%" if "ema_top1" in e else "")
                         + f" ({e['samples']} samples)")
        lines.append(f"run: {self.run_dir} (model.safetensors, config.json, metrics.jsonl, curves.png)")
        return lines


def check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close names: {', '.join(close)}" if close else "; see `timm.list_models()` or `pipeline models`"
        raise ConfigError(f"unknown model {name!r}{hint}")


def plan_cached_teachers(config: TrainConfig, dataset: DatasetIndex) -> tuple[dict[str, dict], tuple[float, ...]]:
    """The store's teachers to use (with class count and feature size) and its temperatures, after checks."""
    store = CacheStore.open(config.store)
    chosen = config.teachers or store.teacher_ids
    store.check_ready(dataset, chosen)
    teachers = {}
    for tid in chosen:
        record = store.teacher_record(tid)
        teachers[tid] = {"num_classes": record["num_classes"], "feature_dim": record["feature_dim"],
                         "features": "features" in store.teacher(tid)}
    return teachers, tuple(store.attrs["config"]["temperatures"])


def plan_run(config: TrainConfig) -> dict[str, Any]:
    """Check every input and resolve what the workers need; raise a clear error on the first problem."""
    check_model_name(config.model)
    dataset = index_dataset(config.shards)
    val_dataset = index_dataset(config.val_shards) if config.val_shards else None
    teachers, temperatures = {}, (config.temperature,)
    if config.store and not config.no_distill:
        teachers, temperatures = plan_cached_teachers(config, dataset)
        if config.temperature not in temperatures:
            raise ConfigError(f"--temperature {config.temperature}: the store has targets only at temperature(s) "
                              f"{', '.join(map(str, temperatures))}")
    heads = {tid: info["num_classes"] for tid, info in teachers.items()}
    for spec in config.online_teachers:
        teacher = load_teacher(parse_teacher_spec(spec), random_init=config.random_init_online, seed=config.seed)
        # An online teacher replaces a cached one of the same id: same views, live targets.
        teachers.pop(teacher.spec.teacher_id, None)
        heads[teacher.spec.teacher_id] = teacher.num_classes
    num_classes = config.num_classes or (len(dataset.class_names) if dataset.class_names else None) \
        or next(iter(heads.values()), None)
    if num_classes is None:
        raise ConfigError("cannot tell the number of classes: the shards have no manifest with class names; "
                          "pass --num-classes")
    if dataset.class_names and num_classes < len(dataset.class_names):
        raise ConfigError(f"the shards' manifest names {len(dataset.class_names)} classes, more than the "
                          f"student's {num_classes}")
    wrong = {tid: n for tid, n in heads.items() if n != num_classes}
    if wrong:
        raise ConfigError(f"the student has {num_classes} classes, but teacher(s) "
                          + ", ".join(f"{tid!r} have {n}" for tid, n in wrong.items()))
    check_run_dir(config)
    # The indexes travel to the workers: indexing shards without a manifest reads every tar.
    return {"num_classes": num_classes, "teachers": teachers, "temperatures": list(temperatures),
            "label_names": list(dataset.class_names) if dataset.class_names else None,
            "dataset": dataset, "val_dataset": val_dataset}


def plan_resources(config: TrainConfig) -> WorkerResources:
    """Each worker's CPUs and GPU, from the connected cluster's alive nodes; PlacementError if they never fit."""
    return plan_worker_resources(alive_nodes(), config.num_workers, config.cpus_per_worker, config.device)


def _progress_board() -> Any:
    """A progress board on the driver's node: it must outlive any other node, as Ray Train's controller does."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ProgressBoard.options(scheduling_strategy=here).remote()


def _ray_storage(run_dir: str) -> tuple[str, Any]:
    """Where Ray Train keeps its own run state (the checkpoint pointers): inside the run directory, which
    every node must reach anyway; fsspec URLs go through pyarrow so any fsspec filesystem works."""
    if "://" not in run_dir or run_dir.startswith("file://"):
        return os.path.join(os.path.abspath(run_dir.removeprefix("file://")), "ray"), None
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    filesystem, path = fsspec.core.url_to_fs(run_dir)
    return f"{path.rstrip('/')}/ray", PyFileSystem(FSSpecHandler(filesystem))


def _bound_worker_start(configs: list[TrainConfig]) -> None:
    """Make Ray Train give up on placing a worker group after --start-timeout instead of waiting forever.

    Ray Train reads this from the driver's environment and passes it to its controller."""
    os.environ[START_TIMEOUT_ENV] = str(max(config.start_timeout for config in configs))


def run_training(config: TrainConfig) -> TrainSummary:
    """Train one student as ``config`` says, on the embedded Ray or the cluster at ``config.address``."""
    return run_trainings([config])[0]


def run_trainings(configs: list[TrainConfig], labels: list[str] | None = None) -> list[TrainSummary]:
    """Train several students at the same time on one Ray, each with its own progress bar.

    Every input of every run is checked before any of them starts. Small models use
    two CPU threads poorly, so on a small machine two one-CPU runs side by side (say
    a KD student and its labels-only baseline) finish sooner than one after the other.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.train.trainer import train_worker

    addresses = {config.address for config in configs}
    if len(addresses) > 1:
        raise ConfigError(f"runs trained together must share one Ray address, got {sorted(map(str, addresses))}")
    labels = labels or [storage.basename(config.run_dir) for config in configs]
    plans = [plan_run(config) for config in configs]
    for config in configs:
        save_run_config(config)
    with ray_session(configs[0].address):
        resources = [plan_resources(config) for config in configs]
        _bound_worker_start(configs)
        runs = []
        for config, plan, request, label in zip(configs, plans, resources, labels):
            plan["cpus_per_worker"] = request.cpus
            board = _progress_board()
            storage_path, storage_filesystem = _ray_storage(config.run_dir)
            trainer = TorchTrainer(
                train_worker,
                train_loop_config={"config": config.to_dict(), "plan": plan, "progress": board},
                scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=request.gpus > 0,
                                             resources_per_worker=request.ray_resources()),
                run_config=RunConfig(
                    storage_path=storage_path, storage_filesystem=storage_filesystem, name="train",
                    # A lost worker (or node) restarts the worker group from the last checkpoint; a worker
                    # group that cannot be placed within --start-timeout counts as a failure too.
                    failure_config=FailureConfig(max_failures=config.max_failures,
                                                 controller_failure_limit=config.max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=2),
                    logging_config=LoggingConfig(log_level="WARNING")),
            )
            runs.append(_FitRun(trainer, board, label if len(configs) > 1 else None, config.progress, config,
                                request))
        seconds = _fit_with_progress(runs)
    return [_summarize(config, seconds[i]) for i, config in enumerate(configs)]


def _summarize(config: TrainConfig, seconds: float) -> TrainSummary:
    records = read_metrics(config.run_dir)
    evals = [r for r in records if r["kind"] == "eval"]
    trains = [r for r in records if r["kind"] == "train"]
    return TrainSummary(run_dir=config.run_dir, model=config.model, steps=trains[-1]["step"] if trains else 0,
                        seconds=seconds, final_eval=evals[-1] if evals else None,
                        images_per_second=trains[-1]["images_per_s"] if trains else None)


class TrainingFailed(RuntimeError):
    """The run failed beyond --max-failures recoveries; it can continue from its last checkpoint with --resume."""


@dataclass
class _FitRun:
    """One TorchTrainer fitting in a background thread, and the driver-side view of its progress."""

    trainer: Any
    board: Any
    label: str | None
    show: bool
    config: TrainConfig | None = None
    request: WorkerResources | None = None
    bar: Any = None
    result: Any = None
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> None:
        def fit() -> None:
            try:
                self.result = self.trainer.fit()
            except Exception as e:  # reported on the driver thread
                self.error = e

        self.thread = threading.Thread(target=fit, daemon=True)
        self.thread.start()


def _fit_with_progress(runs: list[_FitRun]) -> dict[int, float]:
    """Fit every run at once; show their progress; return each run's wall seconds; raise if one failed."""
    started = time.perf_counter()
    seconds: dict[int, float] = {}
    for run in runs:
        run.start()
    while True:
        for i, run in enumerate(runs):
            if i in seconds:
                continue
            alive = run.thread.is_alive()
            for record in ray.get(run.board.drain.remote()):
                _show(record, run, position=i)
            if not alive:
                seconds[i] = time.perf_counter() - started
        if len(seconds) == len(runs):
            break
        time.sleep(0.5)
    for run in runs:
        if run.bar is not None:
            run.bar.close()
    failures = [(run, run.error or getattr(run.result, "error", None)) for run in runs]
    failures = [(run, error) for run, error in failures if error is not None]
    if failures:
        run, error = failures[0]
        raise TrainingFailed(f"training {run.label + ' ' if run.label else ''}failed: {_failure_reason(run, error)}") \
            from error
    return seconds


def _failure_reason(run: _FitRun, error: BaseException) -> str:
    """One line: for workers that could not be placed in time, the request and what the nodes have now."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    cause = getattr(error, "controller_failure", None)
    if isinstance(cause, WorkerGroupStartupTimeoutError) and run.config is not None and run.request is not None:
        wanted = f"{run.request.cpus:g} CPU" + (" + 1 GPU" if run.request.gpus else "")
        return (f"{run.config.num_workers} worker(s) of {wanted} each could not be placed within --start-timeout "
                f"{run.config.start_timeout:g} s ({run.config.max_failures + 1} attempt(s)); the cluster now has "
                f"{describe_nodes(alive_nodes())}")
    return _root_cause(error)


def _show(record: dict[str, Any], run: _FitRun, position: int) -> None:
    from tqdm import tqdm

    if not run.show:
        return
    if record["kind"] == "start" and run.bar is not None:  # Ray Train restarted the workers after a failure
        run.bar.write(f"{run.label + ': ' if run.label else ''}workers restarted; continuing from step {record['step']}")
        run.bar.reset(total=record["total_steps"])
        run.bar.update(record["step"])
    elif record["kind"] == "start":
        run.bar = tqdm(total=record["total_steps"], initial=record["step"], unit="step", desc=run.label,
                       position=position, dynamic_ncols=True)
    elif record["kind"] == "train" and run.bar is not None:
        run.bar.update(record["step"] - run.bar.n)
        run.bar.set_postfix(_loss_summary(record) | {"img/s": f"{record['images_per_s']:.0f}"}, refresh=True)
    elif record["kind"] == "eval":
        line = f"epoch {record['epoch']}: val top-1 {record['top1']:.2f}%  top-5 {record['top5']:.2f}%"
        if "ema_top1" in record:
            line += f"  (EMA top-1 {record['ema_top1']:.2f}%)"
        if run.label:
            line = f"{run.label}: {line}"
        (run.bar.write if run.bar is not None else print)(line)


def _loss_summary(record: dict[str, Any]) -> dict[str, str]:
    """Total loss, label loss, and KD / feature losses summed over teachers: short enough for one line."""
    sums: dict[str, float] = {}
    for name, value in record.items():
        if name == "loss" or name.startswith("loss/"):
            kind = name.split("/")[1] if "/" in name else "loss"
            if kind != "kept":
                sums[kind] = sums.get(kind, 0.0) + value
    return {k: f"{v:.3f}" for k, v in sums.items()}


def _root_cause(error: BaseException) -> str:
    """The innermost error message, without Ray's wrapping layers."""
    seen = error
    while seen.__cause__ is not None:
        seen = seen.__cause__
    text = str(seen).strip().splitlines()
    return text[-1] if text else type(seen).__name__
