"""Object storage for everything a run touches, against a real S3 API server (moto) on loopback.

Locations (join, exists, atomic writes, refused credential URLs), the checkpoint commit rule,
metrics parts, teacher weights at a URL, and the whole CLI pipeline on s3:// with a resume
after a SIGKILL.
"""
import hashlib
import io
import json
import re
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipeline.cli import main
from pipeline.data import storage
from pipeline.train.checkpoint import (checkpoint_path, committed_steps, load_latest_checkpoint, marker_path,
                                       save_checkpoint)
from pipeline.train.metrics import MetricsLog, read_metrics
from services import finish_ok, kill_process_tree, service_env
from teachers import load_teacher, parse_teacher_spec


@pytest.fixture
def s3(s3_server, monkeypatch):
    """This process pointed at the session's S3 server, and a fresh bucket for the test: ``s3://BUCKET``."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    return f"s3://{bucket}"


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path):
    """A folder location: a local path, or a bucket prefix on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "base")
    return request.getfixturevalue("s3") + "/base"


# ---------------------------------------------------------------------------- locations


def test_join_exists_list_and_atomic_writes(base):
    path = storage.join(base, "a", "b.bin")
    assert path == f"{base}/a/b.bin" and storage.basename(path) == "b.bin"
    assert not storage.exists(path) and storage.listdir(storage.join(base, "a")) == []
    storage.write_bytes(path, b"one")
    storage.write_bytes(path, b"two")  # replaced whole
    assert storage.exists(path) and storage.read_bytes(path) == b"two"
    assert storage.listdir(storage.join(base, "a")) == ["b.bin"]  # no temp file left beside it
    storage.remove(path)
    storage.remove(path)  # already gone: fine
    assert not storage.exists(path)


def test_a_local_folder_uploads_with_the_named_files_last(base, tmp_path):
    folder = tmp_path / "built"
    (folder / "ema").mkdir(parents=True)
    for name in ("z.json", "a.bin", "ema/m.bin"):
        (folder / name).write_bytes(name.encode())
    written = storage.upload_dir(str(folder), storage.join(base, "run"), last=["z.json"])
    assert [storage.basename(w) for w in written] == ["a.bin", "m.bin", "z.json"]
    assert storage.read_bytes(storage.join(base, "run", "ema", "m.bin")) == b"ema/m.bin"


def test_credentials_in_a_url_are_refused_without_showing_them(s3_server, tmp_path):
    secret_url = f"s3://{s3_server.access_key}:{s3_server.secret_key}@bucket/run"
    with pytest.raises(storage.StorageError, match="credentials in a URL are refused") as error:
        storage.write_bytes(secret_url + "/x", b"")
    assert s3_server.secret_key not in str(error.value)
    result = CliRunner().invoke(main, ["train-student", "--shards", str(tmp_path / "train.json"), "--no-distill",
                                       "--out", secret_url])
    assert result.exit_code == 1 and result.output.startswith("Error: s3://***@bucket/run: credentials")
    assert len(result.output.strip().splitlines()) == 1 and s3_server.secret_key not in result.output
    result = CliRunner().invoke(main, ["make-shards", "--sample", "mnist", "--out", secret_url])
    assert result.exit_code == 1 and "credentials in a URL are refused" in result.output
    assert s3_server.secret_key not in result.output


def test_an_unreachable_location_is_one_line_naming_it(s3):
    missing = "s3://no-such-bucket-here/run/run.json"
    with pytest.raises(storage.StorageError, match=f"^{missing}: ") as error:
        storage.read_bytes(missing)
    assert len(str(error.value).splitlines()) == 1


def _image_folder(root, classes: int, per_class: int, size: tuple[int, int], seed: int) -> None:
    """An ImageNet-layout folder (one subfolder per class) of random JPEGs."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.jpg")


def test_make_shards_uploads_to_s3_and_removes_stale_shards(s3, tmp_path):
    from pipeline.data.shards import index_dataset

    _image_folder(tmp_path / "images", classes=2, per_class=4, size=(20, 24), seed=1)
    storage.write_bytes(f"{s3}/shards/train-000007.tar", b"left by an earlier, larger build")
    result = CliRunner().invoke(main, ["make-shards", "--from-folder", str(tmp_path / "images"), "--out",
                                       f"{s3}/shards", "--samples-per-shard", "3", "--num-workers", "1"])
    assert result.exit_code == 0, result.output
    assert f"train: 8 samples in 3 shards, manifest {s3}/shards/train.json" in result.output
    assert storage.listdir(f"{s3}/shards") == ["train-000000.tar", "train-000001.tar", "train-000002.tar",
                                               "train.json"]
    dataset = index_dataset(f"{s3}/shards/train.json")
    assert dataset.num_samples == 8 and dataset.shards[0].url == f"{s3}/shards/train-000000.tar"


# ---------------------------------------------------------------------------- checkpoints and metrics


def test_only_committed_checkpoints_that_match_their_marker_are_loaded(base):
    run = storage.join(base, "run")
    for step in (1, 2, 3):
        save_checkpoint(run, step, {"w": torch.full((3,), float(step))})
    assert committed_steps(run) == [2, 3]  # pruned: marker first, then the file
    assert sorted(storage.listdir(storage.join(run, "checkpoints"))) == [
        "step-000000002.commit", "step-000000002.pt", "step-000000003.commit", "step-000000003.pt"]

    # A newer file without its marker (the writer died before committing) is skipped.
    storage.write_bytes(checkpoint_path(run, 4), b"half a checkpoint")
    step, state = load_latest_checkpoint(run)
    assert step == 3 and torch.equal(state["w"], torch.full((3,), 3.0))
    # A marker whose sha256 does not match the file (file replaced after the commit) is skipped too.
    good = json.loads(storage.read_text(marker_path(run, 3)))
    storage.write_text(marker_path(run, 4), json.dumps({**good, "step": 4}))
    with pytest.warns(UserWarning, match="does not match its commit marker"):
        assert load_latest_checkpoint(run)[0] == 3
    # The newest committed file damaged: the older one is used.
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buffer)
    storage.write_bytes(checkpoint_path(run, 3), buffer.getvalue())
    with pytest.warns(UserWarning):
        step, state = load_latest_checkpoint(run)
    assert step == 2 and torch.equal(state["w"], torch.full((3,), 2.0))


def test_metrics_parts_are_cut_back_on_resume_and_joined_at_the_end(s3):
    run = f"{s3}/run"
    log = MetricsLog(run)
    for step in (1, 2, 3, 4):
        log.write({"kind": "train", "step": step, "loss": 1.0})
        if step % 2 == 0:
            log.flush()  # as before every checkpoint
    log.write({"kind": "eval", "step": 4, "epoch": 1, "top1": 40.0})
    log.flush()  # a second flush at the same step keeps the first one's records
    log.write({"kind": "train", "step": 5, "loss": 1.0})  # never flushed: the run was killed
    assert [(r["kind"], r["step"]) for r in read_metrics(run)] == [("train", 1), ("train", 2), ("train", 3),
                                                                   ("train", 4), ("eval", 4)]
    resumed = MetricsLog(run, resume_step=2)  # the checkpoint of step 4 never committed
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    for step in (3, 4):
        resumed.write({"kind": "train", "step": step, "loss": 0.5})
    resumed.write({"kind": "eval", "step": 4, "epoch": 1, "top1": 50.0})
    resumed.close()
    joined = [json.loads(line) for line in storage.read_text(f"{run}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in joined] == [1, 2, 3, 4, 4] and joined == read_metrics(run)


# ---------------------------------------------------------------------------- teacher weights at a URL


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_teacher_weights_at_a_url_load_and_are_fingerprinted_by_their_bytes(s3, suffix):
    source = load_teacher(parse_teacher_spec("test_resnet,img_size=32,num_classes=5"), random_init=True)
    state = source.model.state_dict()
    if suffix == "safetensors":
        data = save_safetensors(state)
    else:
        buffer = io.BytesIO()
        torch.save({"state_dict": state}, buffer)
        data = buffer.getvalue()
    url = f"{s3}/teachers/w.{suffix}"
    storage.write_bytes(url, data)
    teacher = load_teacher(parse_teacher_spec(f"test_resnet@{url},img_size=32"))
    assert teacher.checkpoint_sha256 == hashlib.sha256(data).hexdigest()
    assert teacher.weights_sha256 == source.weights_sha256 and teacher.weights_source == url
    assert teacher.num_classes == 5


def test_missing_teacher_weights_at_a_url_are_named(s3):
    from teachers import TeacherSpecError, check_teacher_spec

    with pytest.raises(TeacherSpecError, match=f"weights file not found: {s3}/absent.safetensors"):
        check_teacher_spec(parse_teacher_spec(f"test_resnet@{s3}/absent.safetensors"))


# ---------------------------------------------------------------------------- the whole pipeline on S3

TEACHER = "test_resnet,img_size=64,batch_size=8,num_classes=3"


def _cli(args, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run(args, env, timeout=300) -> str:
    return finish_ok(_cli(args, env), timeout)


def _s3fs(server):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=server.endpoint, key=server.access_key, secret=server.secret_key,
                             skip_instance_cache=True)


@pytest.mark.slow
def test_pipeline_on_s3_end_to_end_and_a_killed_run_resumes_from_s3(s3, s3_server, tmp_path):
    """make-shards -> cache-teachers -> train-student, every output on S3, through the CLI; the secret is in
    none of run.json, the store's attributes or anything printed; a run SIGKILLed after a committed checkpoint
    on S3 resumes to the uninterrupted run's weights and metrics, bit for bit (drop-path, mixup, cutmix, teacher
    dropping, feature KD and EMA all on)."""
    _image_folder(tmp_path / "images", classes=3, per_class=16, size=(40, 48), seed=0)
    env = service_env(**s3_server.env())
    printed = [_run(["make-shards", "--from-folder", tmp_path / "images", "--out", f"{s3}/shards",
                     "--samples-per-shard", 16, "--num-workers", 1], env)]
    manifest = f"{s3}/shards/train.json"
    assert f"train: 48 samples in 3 shards, manifest {manifest}" in printed[0]
    fs = _s3fs(s3_server)
    bucket = s3.removeprefix("s3://")
    printed.append(_run(["cache-teachers", "--shards", manifest, "--store", f"{s3}/cache.zarr", "--teacher", TEACHER,
                         "--views", 2, "--topk", 3, "--random-init", "--no-progress", "--num-workers", 1], env))
    assert "shards: 3 cached now, 0 already complete, 0 failed" in printed[-1]

    train = ["train-student", "--shards", manifest, "--val-shards", manifest, "--store", f"{s3}/cache.zarr",
             "--model", "regla_t", "--img-size", 32, "--epochs", 2, "--batch-size", 16, "--seed", 3,
             "--loader-workers", 0, "--cpus-per-worker", 1, "--checkpoint-every", 1, "--no-progress",
             # Everything random is on, so that the resume must restore every RNG and the data position.
             "--drop-path", 0.1, "--mixup", 0.8, "--cutmix", 1.0, "--teacher-drop-prob", 0.5, "--feature-weight", 1.0]
    # The uninterrupted run and the run to be killed start together: each waits mostly on Ray's start-up.
    uninterrupted = _cli([*train, "--out", f"{s3}/whole"], env)
    killed = _cli([*train, "--out", f"{s3}/cut"], env)
    try:
        deadline = time.monotonic() + 300
        while not fs.glob(f"{bucket}/cut/checkpoints/*.commit"):
            assert killed.poll() is None, f"the run ended before its first checkpoint:\n{killed.communicate()[0]}"
            assert time.monotonic() < deadline, "no committed checkpoint on S3"
            fs.invalidate_cache()
            time.sleep(0.05)
    except BaseException:
        kill_process_tree(uninterrupted.pid)
        raise
    finally:
        kill_process_tree(killed.pid)
    printed.append(killed.communicate()[0])
    printed.append(finish_ok(uninterrupted, 300))
    assert "val top-1" in printed[-1] and "(48 samples)" in printed[-1]

    # Plain zarr reads the store back; the export is on S3.
    import zarr

    options = {"endpoint_url": s3_server.endpoint, "key": s3_server.access_key, "secret": s3_server.secret_key}
    root = zarr.open_group(f"{s3}/cache.zarr", mode="r", storage_options=options)
    assert root["teachers/test_resnet/done"][:].all() and root["samples/key"].shape == (48,)
    for name in ("run.json", "model.safetensors", "config.json", "curves.png", "metrics.jsonl",
                 "ema/model.safetensors"):
        assert fs.exists(f"{bucket}/whole/{name}"), name
    records = [json.loads(line) for line in fs.cat_file(f"{bucket}/whole/metrics.jsonl").decode().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "eval"] == [1, 2]

    # Killed from outside once a committed checkpoint was on S3 (above), then resumed.
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/cut/model.safetensors")
    printed.append(_run([*train, "--out", f"{s3}/cut", "--resume"], env))
    whole = load_safetensors(fs.cat_file(f"{bucket}/whole/model.safetensors"))
    resumed = load_safetensors(fs.cat_file(f"{bucket}/cut/model.safetensors"))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    timing = ("images_per_s", "data_wait")  # the only fields that may differ

    def computed(run):
        lines = fs.cat_file(f"{bucket}/{run}/metrics.jsonl").decode().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines]

    assert computed("whole") == computed("cut")

    secret = s3_server.secret_key
    attrs = json.dumps(root.attrs.asdict()) + json.dumps({k: dict(n.attrs) for k, n in root.members(max_depth=None)})
    for where, text in [("run.json", fs.cat_file(f"{bucket}/whole/run.json").decode()),
                        ("store attributes", attrs), *(("CLI output", p) for p in printed)]:
        assert secret not in text, where
    assert re.search(r"s3://[^/\s]*@", "".join(printed)) is None
