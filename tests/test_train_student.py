"""Student training on real MNIST shards and a real cache: in-process loops, then on Ray Train via the CLI."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from jobs.train_student import TrainingFailed, plan_run, run_trainings
from pipeline.cache.shard_cacher import ShardCacher
from pipeline.cache.store import CacheConfig, CacheStore
from pipeline.cli import main
from pipeline.data.make_shards import make_mnist_sample
from pipeline.data.shards import index_dataset
from pipeline.data.views import ViewPolicy
from pipeline.train.metrics import read_metrics
from pipeline.train.train_config import ConfigError, TrainConfig, save_run_config
from pipeline.train.trainer import run_worker
from services import kill_process_tree, service_env
from teachers import load_teacher, parse_teacher_spec

SEED = 3
# k = 10 = all classes for test_resnet, so its cached targets are the full distribution.
TEACHERS = {"test_resnet": "test_resnet,img_size=32,num_classes=10", "test_convnext": "test_convnext,img_size=32,num_classes=10"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """300 MNIST digits (32 px) in 8 shards, cached by two random-init teachers with 3 views each."""
    root = tmp_path_factory.mktemp("train")
    _, manifest = make_mnist_sample(str(root / "shards"), samples_per_shard=40, val_fraction=0.06, progress=False)
    dataset = index_dataset(manifest)
    store = CacheStore.create(str(root / "cache.zarr"), dataset,
                              CacheConfig(views=ViewPolicy(num_views=3, seed=SEED), topk=10, temperatures=(1.0, 2.0)))
    teachers = {}
    for tid, text in TEACHERS.items():
        teacher = load_teacher(parse_teacher_spec(text), random_init=True, seed=SEED)
        store.add_teacher(tid, teacher.record(), teacher.num_classes, teacher.feature_dim, True)
        teachers[tid] = teacher
    cacher = ShardCacher(store, teachers)
    for shard, info in enumerate(dataset.shards):
        cacher.process(shard, info.url, list(teachers), info.keys_sha256)
    return {"root": root, "manifest": manifest, "store": str(root / "cache.zarr")}


def _config(data, out, **options) -> TrainConfig:
    defaults = dict(shards=[data["manifest"]], val_shards=[data["manifest"]], store=data["store"], model="test_vit",
                    img_size=32, epochs=2, batch_size=32, seed=SEED, loader_workers=0, log_every=1,
                    checkpoint_every=3, progress=False)
    return TrainConfig(out=str(out), **(defaults | options))


def _train_in_process(config: TrainConfig) -> None:
    """The Ray Train worker loop, run directly (world size 1, one thread) to keep these tests fast."""
    plan = plan_run(config)
    save_run_config(config)
    run_worker(config, plan | {"cpus_per_worker": 1})


def _config_file(config: TrainConfig, path) -> str:
    """The whole config as a --config YAML file, so that a CLI run is exactly ``config``."""
    path.write_text(yaml.safe_dump(config.to_dict()))
    return str(path)


def _start_cli(*args, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train-student", *map(str, args)],
                            env=service_env() | env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_checkpoint(run_dir, process: subprocess.Popen, timeout: float = 400):
    """The first committed checkpoint file of a run in progress (fails if the run ends or times out first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted((Path(run_dir) / "checkpoints").glob("step-*.commit"))
        if found:
            return found[0].with_suffix(".pt")
        assert process.poll() is None, f"the run ended before its first checkpoint:\n{process.communicate()[0]}"
        time.sleep(0.05)
    kill_process_tree(process.pid)
    raise TimeoutError(f"no checkpoint in {run_dir} after {timeout} s:\n{process.communicate()[0]}")


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "model.safetensors"))


def _train_records(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["kind"] == "train"]


def test_run_writes_metrics_curves_and_a_timm_export(data, tmp_path):
    run = tmp_path / "run"
    _train_in_process(_config(data, run, feature_weight=0.5, teacher_weights={"test_convnext": {"kd": 0.5}}))
    records = read_metrics(run)
    evals = [r for r in records if r["kind"] == "eval"]
    assert [e["epoch"] for e in evals] == [1, 2] and all(e["samples"] == 300 for e in evals)
    assert {"top1", "top5", "ema_top1", "ema_top5"} <= evals[-1].keys()
    train = _train_records(run)[-1]
    assert {"loss", "loss/label", "loss/kd/test_resnet", "loss/kd/test_convnext", "loss/feat/test_resnet"} <= train.keys()
    assert (run / "curves.png").stat().st_size > 1000
    config = json.loads((run / "config.json").read_text())
    assert config["architecture"] == "test_vit" and config["num_classes"] == 10
    assert not any(k.startswith("distill") for k in _weights(run))  # projectors are not exported
    assert (run / "ema" / "model.safetensors").exists()


def test_cached_targets_give_the_online_teachers_loss(data, tmp_path):
    """With k = all classes, distilling from the cache equals distilling from the live teacher (to fp16)."""
    _train_in_process(_config(data, tmp_path / "cached", teachers=["test_resnet"], epochs=1))
    # The online teacher takes the cached one's place (same id): same replayed views, live targets.
    _train_in_process(_config(data, tmp_path / "online", teachers=["test_resnet"], epochs=1,
                              online_teachers=[TEACHERS["test_resnet"]], random_init_online=True))
    cached, online = _train_records(tmp_path / "cached"), _train_records(tmp_path / "online")
    assert len(cached) == len(online) > 3
    for a, b in zip(cached[:3], online[:3]):
        assert a["loss/kd/test_resnet"] == pytest.approx(b["loss/kd/test_resnet"], rel=2e-3)
        assert a["loss/label"] == pytest.approx(b["loss/label"], rel=1e-4)


def test_labels_only_run_trains(data, tmp_path):
    run = tmp_path / "labels"
    _train_in_process(_config(data, run, store=None, no_distill=True, epochs=3, lr=5e-3))
    losses = [r["loss"] for r in _train_records(run)]
    assert set(_train_records(run)[0]) >= {"loss", "loss/label"} and not any("kd" in k for k in _train_records(run)[0])
    assert sum(losses[-5:]) < sum(losses[:5])


# -- bad input: refused on the driver, before any worker starts ---------------------------------------------


def _cli(*args):
    return CliRunner().invoke(main, ["train-student", *map(str, args)])


def _base(data, out):
    return ["--shards", data["manifest"], "--store", data["store"], "--model", "test_vit", "--out", out,
            "--img-size", 32, "--batch-size", 32, "--no-progress"]


@pytest.mark.parametrize("extra, message", [
    (["--model", "regla_tt"], "unknown model 'regla_tt'; close names: regla_t"),
    (["--store", "/nonexistent/cache.zarr"], "/nonexistent/cache.zarr"),
    (["--num-classes", 12], "the student has 12 classes, but teacher(s) 'test_convnext' have 10"),
    (["--num-classes", 5], "manifest names 10 classes, more than the student's 5"),
    (["--teacher", "vit_huge"], "no teacher 'vit_huge'; it holds test_convnext, test_resnet"),
    (["--temperature", 4], "targets only at temperature(s) 1.0, 2.0"),
])
def test_bad_input_is_a_clear_error(data, tmp_path, extra, message):
    result = _cli(*_base(data, tmp_path / "run"), *extra)
    assert result.exit_code == 1 and message in result.output, result.output


def test_store_of_other_shards_is_refused(data, tmp_path):
    train, _ = make_mnist_sample(str(tmp_path / "other"), samples_per_shard=40, val_fraction=0.06, seed=1,
                                 progress=False)
    args = _base(data, tmp_path / "run")
    args[args.index("--shards") + 1] = train
    result = _cli(*args)
    assert result.exit_code == 1 and "was built from another dataset" in result.output


def test_runs_trained_together_are_all_checked_before_any_starts(data, tmp_path):
    good = _config(data, tmp_path / "good", no_distill=True, store=None)
    bad = _config(data, tmp_path / "bad", model="regla_tt")
    with pytest.raises(ConfigError, match="unknown model 'regla_tt'"):
        run_trainings([good, bad])
    assert not (tmp_path / "good" / "run.json").exists()


# -- on Ray Train, through the CLI ----------------------------------------------------------------------------


@pytest.mark.slow
def test_runs_side_by_side_on_ray_finish_or_fail_on_their_own(data, tmp_path, ray_local):
    # The labels-only run reads its own copy of the shards, one of them cut short after indexing.
    shards = tmp_path / "shards"
    shutil.copytree(data["root"] / "shards", shards)
    damaged = shards / "train-000003.tar"
    damaged.write_bytes(damaged.read_bytes()[:5000])
    finishing = _config(data, tmp_path / "kd", epochs=1, cpus_per_worker=1)
    failing = _config(data, tmp_path / "labels", epochs=1, cpus_per_worker=1, no_distill=True, store=None,
                      shards=[str(shards / "train.json")], max_failures=0)
    with pytest.raises(TrainingFailed, match="training labels-only failed: .*train-000003.tar"):
        run_trainings([finishing, failing], labels=["kd", "labels-only"])
    assert (tmp_path / "kd" / "model.safetensors").exists()
    assert [r["samples"] for r in read_metrics(tmp_path / "kd") if r["kind"] == "eval"] == [300]
    assert not (tmp_path / "labels" / "model.safetensors").exists()
