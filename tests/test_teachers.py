"""teachers/: spec parsing and the teachers file, weights sources, fingerprints and teacher outputs."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from teachers import (Preprocessing, Teacher, TeacherSpec, TeacherSpecError, load_teacher, load_teachers_file,
                      parse_teacher_spec)

SMALL = 64  # input size for the tiny timm test models, to keep forward passes cheap
# Unlike test_vit (dynamic_img_size=True), test_vit3 refuses inputs of any size but its own,
# so it shows whether img_size really reached the model.
STRICT_VIT = "test_vit3"


def random_teacher(spec: str, seed: int = 0) -> Teacher:
    return load_teacher(parse_teacher_spec(spec), random_init=True, seed=seed)


def images(teacher: Teacher, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *teacher.preprocessing.input_size)


def save_source_model(tmp_path: Path, name: str, num_classes: int, filename: str) -> tuple[torch.nn.Module, Path]:
    """A randomly initialised timm model in eval mode and its state dict saved as safetensors."""
    model = timm.create_model(name, num_classes=num_classes).eval()
    path = tmp_path / filename
    save_file(model.state_dict(), str(path))
    return model, path


# ---- spec strings -------------------------------------------------------------------------------------------

def test_parse_bare_name_has_defaults():
    spec = parse_teacher_spec("resnet50")
    assert spec == TeacherSpec(model_name="resnet50", teacher_id="resnet50")
    assert (spec.pretrained_tag, spec.weights, spec.img_size, spec.num_classes) == (None, None, None, None)
    assert (spec.batch_size, spec.dtype, spec.features) == (64, "fp32", True)


def test_parse_pretrained_tag():
    spec = parse_teacher_spec("resnet50.a1_in1k")
    assert (spec.model_name, spec.pretrained_tag, spec.weights) == ("resnet50", "a1_in1k", None)
    assert spec.teacher_id == "resnet50.a1_in1k"


def test_parse_weights_path_keeps_dots_and_at_signs():
    spec = parse_teacher_spec("resnet50@/ckpt/run.v2@best/model.safetensors")
    assert (spec.model_name, spec.pretrained_tag) == ("resnet50", None)
    assert spec.weights == "/ckpt/run.v2@best/model.safetensors"
    assert spec.teacher_id == "resnet50"


def test_parse_every_option():
    spec = parse_teacher_spec("resnet50.a1_in1k, img_size=160,batch_size=256,dtype=BF16,features=false,"
                              "num_classes=10,id=r50")
    assert spec == TeacherSpec(model_name="resnet50", pretrained_tag="a1_in1k", teacher_id="r50", img_size=160,
                               batch_size=256, dtype="bf16", features=False, num_classes=10)


@pytest.mark.parametrize("text,value", [("true", True), ("1", True), ("yes", True), ("True", True),
                                        ("false", False), ("0", False), ("no", False), ("NO", False)])
def test_parse_features_values(text, value):
    assert parse_teacher_spec(f"resnet50,features={text}").features is value


def test_default_id_replaces_characters_outside_the_id_alphabet():
    assert parse_teacher_spec("resnet50.in1k+ft").teacher_id == "resnet50.in1k_ft"


@pytest.mark.parametrize("text", [
    "resnet50",
    "resnet50.a1_in1k",
    "resnet50@/w/model.safetensors",
    "resnet50@rel/model.pth,num_classes=10",
    "resnet50.a1_in1k,img_size=160,batch_size=256,dtype=bf16,features=false,id=r50",
    "vit_small_patch16_224,dtype=fp16,batch_size=8",
])
def test_spec_round_trips_through_str_and_dict(text):
    spec = parse_teacher_spec(text)
    assert parse_teacher_spec(str(spec)) == spec
    assert TeacherSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_str_is_canonical_and_drops_defaults():
    spec = parse_teacher_spec("resnet50.a1_in1k,batch_size=64,dtype=fp32,features=yes,id=resnet50.a1_in1k")
    assert str(spec) == "resnet50.a1_in1k"
    assert str(parse_teacher_spec("resnet50,features=0,dtype=bf16,id=x")) == "resnet50,dtype=bf16,features=false,id=x"


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(TeacherSpecError, match="colour") as err:
        parse_teacher_spec("resnet50,colour=red")
    for option in ("img_size", "batch_size", "dtype", "features", "num_classes", "id"):
        assert option in str(err.value)


@pytest.mark.parametrize("option,value", [
    ("img_size", "0"), ("img_size", "abc"), ("batch_size", "-4"), ("batch_size", "2.5"), ("dtype", "fp64"),
    ("features", "maybe"), ("num_classes", "0"), ("id", "a/b"),
])
def test_bad_option_value_names_option_and_value(option, value):
    with pytest.raises(TeacherSpecError) as err:
        parse_teacher_spec(f"resnet50,{option}={value}")
    assert option in str(err.value) and value in str(err.value)


@pytest.mark.parametrize("text,fragment", [
    ("resnet50,img_size", "not key=value"),
    ("resnet50,img_size=1,img_size=2", "given twice"),
    ("", "bad model name"),
    ("resnet50.a1_in1k@/w.pth", "give one or the other"),
])
def test_malformed_specs(text, fragment):
    with pytest.raises(TeacherSpecError, match=fragment):
        parse_teacher_spec(text)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(TeacherSpecError, match="colour"):
        TeacherSpec.from_dict({"model_name": "resnet50", "colour": "red"})


# ---- teachers file ------------------------------------------------------------------------------------------

def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_teachers_file_list_form(tmp_path):
    path = write_yaml(tmp_path / "teachers.yaml", [
        "resnet50.a1_in1k,img_size=160",
        {"model": "resnet50", "weights": "ckpt/r50.safetensors", "img_size": 160, "batch_size": 32,
         "dtype": "bf16", "features": False, "num_classes": 10, "id": "r50"},
    ])
    first, second = load_teachers_file(path)
    assert first == parse_teacher_spec("resnet50.a1_in1k,img_size=160")
    assert second == TeacherSpec(model_name="resnet50", weights=str(tmp_path / "ckpt" / "r50.safetensors"),
                                 teacher_id="r50", img_size=160, batch_size=32, dtype="bf16", features=False,
                                 num_classes=10)


def test_teachers_file_mapping_form_resolves_relative_weights_against_the_file(tmp_path, monkeypatch):
    sub = tmp_path / "conf"
    sub.mkdir()
    path = write_yaml(sub / "teachers.yaml", {"teachers": [
        "test_resnet@weights/a.pth,id=a",
        {"model": "test_vit@/abs/b.safetensors"},
    ]})
    monkeypatch.chdir(tmp_path)  # resolution must not depend on the working directory
    a, b = load_teachers_file(path)
    assert a.weights == str(sub / "weights" / "a.pth")
    assert b.weights == "/abs/b.safetensors"


@pytest.mark.parametrize("items,fragment", [
    (["resnet50", "resnet50,img_size=-1"], "item 1"),
    (["resnet50", {"model": "resnet50", "colour": 1}], "item 1"),
    ([{"weights": "w.pth"}], "item 0"),
    (["resnet50", "resnet50@w.pth"], "item 1: teacher id 'resnet50' already used by item 0"),
])
def test_teachers_file_errors_name_file_and_item(tmp_path, items, fragment):
    path = write_yaml(tmp_path / "bad.yaml", items)
    with pytest.raises(TeacherSpecError, match=fragment) as err:
        load_teachers_file(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("data", [[], {"students": ["resnet50"]}, "resnet50"])
def test_teachers_file_needs_a_list_of_teachers(tmp_path, data):
    with pytest.raises(TeacherSpecError, match="bad.yaml"):
        load_teachers_file(write_yaml(tmp_path / "bad.yaml", data))


def test_missing_teachers_file(tmp_path):
    with pytest.raises(TeacherSpecError, match="nope.yaml"):
        load_teachers_file(tmp_path / "nope.yaml")


# ---- resolving names and weights sources ----------------------------------------------------------------------

def test_unknown_model_lists_close_names():
    with pytest.raises(TeacherSpecError, match="unknown timm model 'resnet181'.*resnet18"):
        load_teacher(parse_teacher_spec("resnet181"), random_init=True)


def test_project_models_resolve_as_teachers():
    with pytest.raises(TeacherSpecError, match="regla_t"):
        load_teacher(parse_teacher_spec("reglat"), random_init=True)
    teacher = random_teacher("regla_t,img_size=64,num_classes=5")
    assert teacher(images(teacher))[0].shape == (2, 5)


def test_unknown_tag_lists_available_tags():
    with pytest.raises(TeacherSpecError, match="'nope'.*available tags: r160_in1k"):
        load_teacher(parse_teacher_spec("test_resnet.nope"))


def test_bare_name_without_loadable_weights_points_to_random_init():
    # test_resnet has hub weights, which cannot be reached offline.
    with pytest.raises(TeacherSpecError, match="could not load timm pretrained weights") as err:
        load_teacher(parse_teacher_spec("test_resnet"))
    assert "--random-init" in str(err.value) and "test_resnet@" in str(err.value)


def test_bare_name_of_model_without_pretrained_weights_points_to_random_init():
    with pytest.raises(TeacherSpecError, match="no pretrained weights for 'regla_t'") as err:
        load_teacher(parse_teacher_spec("regla_t"))
    assert "--random-init" in str(err.value)


def test_num_classes_that_would_replace_a_pretrained_classifier_is_refused():
    with pytest.raises(TeacherSpecError, match="num_classes=10.*1000 classes"):
        load_teacher(parse_teacher_spec("test_resnet.r160_in1k,num_classes=10"))


def test_missing_weights_file_is_named(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(TeacherSpecError, match="not found.*absent.safetensors"):
        load_teacher(parse_teacher_spec(f"test_resnet@{path}"))


def test_checkpoint_with_wrong_keys_names_file_and_keys(tmp_path):
    model, _ = save_source_model(tmp_path, "test_resnet", 10, "unused.safetensors")
    state = model.state_dict()
    state["extra.weight"] = state.pop("conv1.0.weight")
    path = tmp_path / "wrong.safetensors"
    save_file(state, str(path))
    with pytest.raises(TeacherSpecError) as err:
        load_teacher(parse_teacher_spec(f"test_resnet@{path}"))
    message = str(err.value)
    assert "wrong.safetensors" in message and "conv1.0.weight" in message and "extra.weight" in message


def test_checkpoint_that_needs_unpickling_code_is_refused(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "args": Path("/x")}, path)
    with pytest.raises(TeacherSpecError, match="cannot read weights file .*pickled.pth"):
        load_teacher(parse_teacher_spec(f"test_resnet@{path}"))


def test_checkpoint_holding_no_state_dict_is_named(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(TeacherSpecError, match="weights file .*list.pth holds no state dict"):
        load_teacher(parse_teacher_spec(f"test_resnet@{path}"))


# ---- random init ------------------------------------------------------------------------------------------

def test_random_init_is_deterministic_and_leaves_the_global_rng_alone():
    rng_before = torch.get_rng_state()
    a = random_teacher("test_resnet,img_size=64")
    b = random_teacher("test_resnet,img_size=64")
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert a.weights_sha256 == b.weights_sha256
    x = images(a)
    assert all(torch.equal(u, v) for u, v in zip(a(x), b(x)))
    assert a.weights_source == "random-init:seed=0" and a.checkpoint_sha256 is None


def test_random_init_differs_by_seed_and_teacher_id():
    base = random_teacher("test_resnet").weights_sha256
    assert random_teacher("test_resnet", seed=1).weights_sha256 != base
    assert random_teacher("test_resnet,id=other").weights_sha256 != base


def test_model_is_frozen_in_eval_mode():
    teacher = random_teacher("test_vit,img_size=64")
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert teacher.device == torch.device("cpu")


# ---- local checkpoints ------------------------------------------------------------------------------------

def write_pth(path: Path, state: dict, wrapped: bool) -> Path:
    if wrapped:  # a DDP training checkpoint: nested, with a "module." prefix and other entries
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth-wrapped"])
def test_checkpoint_loads_identical_weights_and_outputs(tmp_path, fmt):
    source = random_teacher("test_resnet,img_size=64,num_classes=7")
    state = source.model.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    else:
        path = write_pth(tmp_path / "w.pth", state, wrapped=fmt == "pth-wrapped")
    teacher = load_teacher(parse_teacher_spec(f"test_resnet@{path},img_size=64"))
    assert teacher.num_classes == 7  # from the checkpoint's classifier
    assert teacher.weights_sha256 == source.weights_sha256
    assert teacher.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert teacher.weights_source == f"file:{path.resolve()}"
    x = images(teacher)
    assert all(torch.equal(u, v) for u, v in zip(teacher(x), source(x)))


def test_weights_hash_tracks_the_weights(tmp_path):
    model, path = save_source_model(tmp_path, "test_resnet", 7, "a.safetensors")
    state = model.state_dict()
    state["fc.bias"] = state["fc.bias"] + 1e-3
    save_file(state, str(tmp_path / "b.safetensors"))
    a = load_teacher(parse_teacher_spec(f"test_resnet@{path}"))
    b = load_teacher(parse_teacher_spec(f"test_resnet@{tmp_path / 'b.safetensors'}"))
    assert a.weights_sha256 != b.weights_sha256


def test_config_json_gives_num_classes_and_preprocessing(tmp_path):
    _, path = save_source_model(tmp_path, "test_convnext", 5, "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({
        "architecture": "test_convnext", "num_classes": 5,
        "pretrained_cfg": {"input_size": [3, 48, 40], "interpolation": "bilinear",
                           "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}}))
    teacher = load_teacher(parse_teacher_spec(f"test_convnext@{path}"))
    assert teacher.num_classes == 5
    assert teacher.preprocessing == Preprocessing((48, 40), "bilinear", (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert teacher(images(teacher))[0].shape == (2, 5)


def test_config_json_for_another_architecture_is_refused(tmp_path):
    _, path = save_source_model(tmp_path, "test_resnet", 5, "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "test_vit", "num_classes": 5}))
    with pytest.raises(TeacherSpecError, match="config.json describes architecture 'test_vit'"):
        load_teacher(parse_teacher_spec(f"test_resnet@{path}"))


def test_vit_checkpoint_runs_at_another_img_size(tmp_path):
    _, path = save_source_model(tmp_path, STRICT_VIT, 3, "vit.safetensors")  # native 160 px
    teacher = load_teacher(parse_teacher_spec(f"{STRICT_VIT}@{path},img_size={SMALL}"))
    assert teacher.preprocessing.input_size == (SMALL, SMALL)
    logits, _ = teacher(torch.randn(2, 3, SMALL, SMALL))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


# ---- input size and preprocessing -----------------------------------------------------------------------------

def test_preprocessing_comes_from_the_pretrained_cfg():
    teacher = random_teacher("test_efficientnet")
    assert teacher.preprocessing == Preprocessing((160, 160), "bicubic", (0.485, 0.456, 0.406),
                                                  (0.229, 0.224, 0.225))


@pytest.mark.parametrize("name", [STRICT_VIT, "test_resnet"])
def test_img_size_override(name):
    teacher = random_teacher(f"{name},img_size=48")
    assert teacher.preprocessing.input_size == (48, 48)
    logits, features = teacher(torch.randn(2, 3, 48, 48))
    assert logits.shape == (2, 1000) and features.shape == (2, teacher.feature_dim)


def test_wrong_input_size_is_refused():
    teacher = random_teacher("test_resnet,img_size=64")
    with pytest.raises(ValueError, match=r"\(64, 64\)"):
        teacher(torch.randn(2, 3, 80, 80))


# ---- outputs ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_convnext", "test_efficientnet"])
def test_outputs_are_the_models_logits_and_pre_logit_features(name):
    teacher = random_teacher(f"{name},img_size={SMALL},num_classes=11")
    x = images(teacher, batch=3)
    logits, features = teacher(x)
    assert logits.shape == (3, 11) and features.shape == (3, teacher.feature_dim)
    assert logits.dtype == features.dtype == torch.float32
    assert not logits.requires_grad
    with torch.no_grad():
        expected_features = teacher.model.forward_head(teacher.model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(features, expected_features, rtol=0, atol=0)
        torch.testing.assert_close(logits, teacher.model(x), rtol=1e-6, atol=1e-6)


def test_bf16_runs_on_cpu_close_to_fp32():
    fp32 = random_teacher(f"test_convnext,img_size={SMALL}")
    bf16 = random_teacher(f"test_convnext,img_size={SMALL},dtype=bf16")
    assert bf16.weights_sha256 == fp32.weights_sha256  # the dtype changes how it runs, not the weights
    x = images(fp32, batch=4)
    for low, full in zip(bf16(x), fp32(x)):
        assert low.dtype == torch.float32
        assert not torch.equal(low, full)  # autocast really ran in bf16
        scale = full.abs().max().item()
        torch.testing.assert_close(low, full, rtol=0.05, atol=0.05 * scale)


def test_record_is_json_provenance():
    teacher = random_teacher(f"test_vit,img_size={SMALL},features=false,id=vit")
    record = json.loads(json.dumps(teacher.record()))
    assert record == teacher.record()
    assert TeacherSpec.from_dict(record["spec"]) == teacher.spec
    assert record["weights_sha256"] == teacher.weights_sha256 and len(record["weights_sha256"]) == 64
    assert record["preprocessing"] == {"input_size": [SMALL, SMALL], "interpolation": "bicubic",
                                       "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    assert (record["num_classes"], record["feature_dim"]) == (1000, 64)
    assert record["weights_source"] == "random-init:seed=0"
    assert record["timm_version"] == timm.__version__
