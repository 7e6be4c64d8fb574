"""Training run plumbing: options, run directories, checkpoints, metrics and export."""

import json
import os

import pytest
import timm
import torch
from click.testing import CliRunner

import regla  # noqa: F401
from pipeline.cli import _train_options, main
from pipeline.train.checkpoint import KEEP, committed_steps, load_latest_checkpoint, save_checkpoint
from pipeline.train.export import export_student
from pipeline.train.metrics import MetricsLog, plot_curves, read_metrics
from pipeline.train.train_config import ConfigError, TrainConfig, check_run_dir, save_run_config
from teachers import load_teacher, parse_teacher_spec


def _config(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(shards=["/data/train.json"], out=str(tmp_path / "run"), no_distill=True, **kw)


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="--epochs must be at least 1"):
        _config(tmp_path, epochs=0)
    with pytest.raises(ConfigError, match="--teacher-drop-prob"):
        _config(tmp_path, teacher_drop_prob=1.5)
    with pytest.raises(ConfigError, match="no teachers"):
        TrainConfig(shards=["x"], out="y")
    with pytest.raises(ConfigError, match="cannot take teachers"):
        _config(tmp_path, online_teachers=["resnet18"])
    with pytest.raises(ConfigError, match="unknown option.*bacth_size"):
        TrainConfig.from_dict({"shards": ["x"], "out": "y", "no_distill": True, "bacth_size": 3})


def test_run_dir_is_never_overwritten_and_resume_must_match(tmp_path):
    config = _config(tmp_path, epochs=3)
    check_run_dir(config)  # a new directory is fine
    save_run_config(config)
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        check_run_dir(config)
    check_run_dir(_config(tmp_path, epochs=3, resume=True, loader_workers=3))  # how it runs may change
    with pytest.raises(ConfigError, match=r"other options: epochs: run has 3, requested 4"):
        check_run_dir(_config(tmp_path, epochs=4, resume=True))
    with pytest.raises(ConfigError, match="holds no run"):
        check_run_dir(TrainConfig(shards=["x"], out=str(tmp_path / "new"), no_distill=True, resume=True))


def test_flags_override_the_yaml_config(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("batch-size: 32\nepochs: 7\nshards: data/train.json\nmodel: regla_s\n")
    options = _train_options(str(yaml_file), {"epochs": 2, "model": None, "val_shards": ()})
    assert options["batch_size"] == 32 and options["epochs"] == 2 and options["model"] == "regla_s"
    assert options["shards"][0].startswith("/") and options["shards"][0].endswith("data/train.json")


def test_cli_names_a_missing_required_option(tmp_path):
    result = CliRunner().invoke(main, ["train-student", "--out", str(tmp_path / "r"), "--no-distill"])
    assert result.exit_code == 2 and "missing --shards" in result.output


def test_checkpoints_round_trip_and_only_the_newest_are_kept(tmp_path):
    for step in (5, 10, 15):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((2,), float(step)), "sched": {"t": 1.5}})
    assert committed_steps(str(tmp_path)) == [10, 15] and KEEP == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-000000010.commit", "step-000000010.pt", "step-000000015.commit", "step-000000015.pt"]
    step, state = load_latest_checkpoint(str(tmp_path))
    assert step == 15 and state["step"] == 15 and torch.equal(state["w"], torch.full((2,), 15.0))


def test_metrics_log_drops_records_past_the_resumed_checkpoint(tmp_path):
    log = MetricsLog(tmp_path)
    for step in (10, 20, 30):
        log.write({"kind": "train", "step": step, "loss": 1.0 / step, "loss/label": 0.5 / step, "epoch": step / 30})
    log.write({"kind": "eval", "step": 30, "epoch": 1, "top1": 50.0, "top5": 90.0})
    MetricsLog(tmp_path, resume_step=20)
    assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20]
    png = plot_curves(str(tmp_path))
    assert os.path.getsize(png) > 1000 and open(png, "rb").read(4) == b"\x89PNG"


def test_export_loads_with_timm_and_as_a_teacher(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("regla_t", num_classes=10).eval()
    export_student(model, tmp_path, (32, 32), label_names=[str(i) for i in range(10)])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "regla_t" and config["num_classes"] == 10
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32] and config["label_names"][3] == "3"

    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    from_dir = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    from_file = timm.create_model("regla_t", pretrained=True, pretrained_cfg_overlay=dict(
        file=str(tmp_path / "model.safetensors"), num_classes=10)).eval()
    teacher = load_teacher(parse_teacher_spec(f"regla_t@{tmp_path / 'model.safetensors'}"))
    torch.testing.assert_close(from_dir(x), expected)
    torch.testing.assert_close(from_file(x), expected)
    torch.testing.assert_close(teacher(x)[0], expected)
    assert teacher.preprocessing.input_size == (32, 32)


@pytest.mark.parametrize("model", ["regla_t", "resnet10t", "test_vit"])
def test_one_head_pass_gives_logits_and_features_with_one_dropout_mask(model):
    from pipeline.train.losses import DistillLoss, DistillLossConfig, TeacherLossWeights, TeacherTargets
    from pipeline.train.student_model import StudentWithLoss, feature_dim

    torch.manual_seed(0)
    student = timm.create_model(model, num_classes=10, drop_rate=0.5).train()
    distill = DistillLoss(DistillLossConfig(label_weight=1.0, teachers={"t": TeacherLossWeights(kd=0, feature=1)}),
                          feature_dim(student), {"t": 6})
    wrapped = StudentWithLoss(student, distill).train()
    calls, seen = [], []
    student.forward_head = _counting(student.forward_head, calls)
    distill.forward = _capturing(distill.forward, seen)
    targets = {"t": TeacherTargets.from_logits(torch.randn(4, 10), torch.randn(4, 6))}
    x = torch.randn(4, 3, 32, 32)
    loss, _ = wrapped(x, torch.arange(4), targets, 1.0, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and len(calls) == 1
    logits, features = seen[0]
    assert features.shape == (4, feature_dim(student))
    # The logits are the classifier applied to exactly these features: one dropout mask for both
    # (still in training mode: regla's classifier normalises with the batch's statistics).
    torch.testing.assert_close(student.get_classifier()(features), logits)
    assert (features == 0).float().mean() > 0.2  # dropout really zeroed part of them


def _counting(function, calls):
    def wrapper(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)
    return wrapper


def _capturing(function, seen):
    def wrapper(logits, features, *args, **kwargs):
        seen.append((logits.detach(), features.detach()))
        return function(logits, features, *args, **kwargs)
    return wrapper
