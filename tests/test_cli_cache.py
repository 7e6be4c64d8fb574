"""`pipeline cache-teachers`, `inspect` and `verify` through the CLI: real tar shards, real Zarr stores, real Ray.

Every test that runs the cache job in-process requests the session's `ray_local`, so the CLI reuses
that Ray instead of starting its own; the cluster tests run the CLI in subprocesses.
"""
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.data.views import ViewPolicy, sample_views
from services import service_env

TEACHERS = ["test_resnet,img_size=32,batch_size=16", "test_convnext,img_size=32,batch_size=16"]
TIDS = ["test_resnet", "test_convnext"]
VIEW_ARGS = ["--views", "2", "--topk", "3"]
RUN_ARGS = ["--random-init", "--no-progress"]
BIN = Path(sys.executable).parent  # .venv/bin: the `pipeline` and `ray` console scripts


# ---------------------------------------------------------------------------- helpers


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def cache(shards, store, *teachers, extra=(), views=True):
    args = ["cache-teachers", "--shards", shards, "--store", store]
    for teacher in teachers:
        args += ["--teacher", teacher]
    return cli(*args, *(VIEW_ARGS if views else []), *RUN_ARGS, *extra)


def assert_ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)


def assert_clean_error(result, *needles):
    """Exit 1 from a click error (not an uncaught exception), one 'Error:' line naming every needle."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # CliRunner hides tracebacks
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert str(needle) in errors[0], errors[0]
    return errors[0]


def image_bytes(rng, height, width, fmt="JPEG"):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def write_tar(path, samples):
    """samples: [(key, {ext: bytes})], written in order."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def tar_keys(path):
    keys = []
    with tarfile.open(path) as tar:
        for name in tar.getnames():
            cut = name.rfind("/") + 1
            key = name[:cut] + name[cut:].split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


def store_arrays(path):
    """Every array of a store, read with plain zarr: {path inside the store: numpy array}."""
    group = zarr.open_group(str(path), mode="r")
    return {name: node[:] for name, node in group.members(max_depth=None) if isinstance(node, zarr.Array)}


def store_attrs(path):
    return zarr.open_group(str(path), mode="r").attrs.asdict()


def file_mtimes(root, *subdirs):
    return {str(p.relative_to(root)): p.stat().st_mtime_ns
            for sub in subdirs for p in (Path(root) / sub).rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """12 tiny images in 3 classes (incl. gray, RGBA, CMYK, 16-bit and palette), packed by make-shards 5 per shard."""
    root = tmp_path_factory.mktemp("dataset")
    images = root / "images"
    rng = np.random.default_rng(0)
    sizes = {}  # key -> (width, height)

    def save(key, image, name):
        (images / key.split("/")[0]).mkdir(parents=True, exist_ok=True)
        image.save(images / key.split("/")[0] / name)
        sizes[key] = image.size

    def rgb(height, width):
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))

    save("ant/rgb0", rgb(20, 16), "rgb0.jpg")
    save("ant/rgb1", rgb(16, 24), "rgb1.jpg")
    save("ant/gray", Image.fromarray(rng.integers(0, 256, (18, 18), dtype=np.uint8)), "gray.png")
    save("ant/rgba", Image.fromarray(rng.integers(0, 256, (20, 22, 4), dtype=np.uint8)), "rgba.png")
    save("bee/cmyk", rgb(21, 19).convert("CMYK"), "cmyk.jpg")
    save("bee/deep", Image.fromarray(rng.integers(0, 65536, (16, 20), dtype=np.uint16)), "deep.png")
    save("bee/palette", rgb(20, 20).convert("P", palette=Image.ADAPTIVE, colors=16), "palette.png")
    save("bee/rgb2", rgb(24, 16), "rgb2.jpg")
    for i in range(4):
        save(f"cat/rgb{i}", rgb(16 + 2 * i, 20), f"rgb{i}.jpg")
    assert [Image.open(images / name).mode for name in ("ant/gray.png", "ant/rgba.png", "bee/palette.png")] == \
        ["L", "RGBA", "P"]
    assert Image.open(images / "bee" / "deep.png").mode.startswith("I;16")

    out = root / "shards"
    result = cli("make-shards", "--from-folder", images, "--out", out, "--samples-per-shard", 5)
    assert_ok(result)
    shards = sorted(out.glob("train-*.tar"))
    assert [p.name for p in shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    return {"manifest": str(out / "train.json"), "dir": str(out), "shards": shards,
            "keys": [tar_keys(p) for p in shards], "sizes": sizes}


@pytest.fixture(scope="module")
def base_store(dataset, tmp_path_factory, ray_local):
    """Both teachers, 2 views, top-3, cached on the embedded Ray."""
    path = tmp_path_factory.mktemp("base") / "cache.zarr"
    result = cache(dataset["manifest"], path, *TEACHERS)
    return path, result


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory):
    """Hand-made shards: undecodable images, a sample without cls, one without image, an empty shard in the middle."""
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(1)
    jpeg = image_bytes(rng, 20, 16)
    write_tar(root / "d-000000.tar", [
        ("k/good0", {"jpg": image_bytes(rng, 20, 16), "cls": b"0"}),
        ("k/trunc", {"jpg": jpeg[: len(jpeg) // 2], "cls": b"1"}),  # truncated JPEG
        ("k/png", {"png": image_bytes(rng, 18, 22, "PNG"), "cls": b"2"}),
        ("k/nocls", {"jpg": image_bytes(rng, 20, 16)}),  # no class member
    ])
    write_tar(root / "d-000001.tar", [])  # a valid tar with zero members
    write_tar(root / "d-000002.tar", [
        ("k/garbage", {"jpg": b"this is not an image", "cls": b"0"}),
        ("k/good1", {"jpg": image_bytes(rng, 20, 16), "cls": b"1"}),
        ("k/noimg", {"cls": b"2"}),  # no image member
    ])
    return root


@pytest.fixture(scope="module")
def bad_store(bad_dataset, tmp_path_factory, ray_local):
    path = tmp_path_factory.mktemp("bad-store") / "cache.zarr"
    with pytest.warns(UserWarning, match="has no samples"):
        result = cache(str(bad_dataset), path, TEACHERS[0])
    return path, result


# ---------------------------------------------------------------------------- 1. happy path


def test_cache_teachers_caches_every_image_mode_as_valid_aligned_rows(base_store, dataset):
    """Two teachers over make-shards output: summary lines are right, and every row (gray, RGBA, CMYK,
    16-bit, palette included) is valid, holds its own sample's views and finite, sorted top-k logits."""
    path, result = base_store
    assert_ok(result)
    out = result.output
    assert "shards: 3 cached now, 0 already complete, 0 failed (of 3)" in out
    assert "samples: 12 (0 invalid, skipped), views per sample: 2" in out
    assert "teachers: test_resnet, test_convnext" in out
    per_view = dict((m[1], (float(m[2]), float(m[3]))) for m in re.finditer(
        r"^  (\S+): ([\d.]+) B/view \(top-k \+ leftover\), ([\d.]+) B/view \(features\)$", out, re.M))
    assert set(per_view) == set(TIDS) and all(a > 0 and b > 0 for a, b in per_view.values()), out
    assert not re.search(r"^FAILED", out, re.M)

    # The CMYK JPEG is stored byte for byte, so the cache itself decodes CMYK.
    shard = next(p for p, keys in zip(dataset["shards"], dataset["keys"]) if "bee/cmyk" in keys)
    with tarfile.open(shard) as t:
        assert Image.open(io.BytesIO(t.extractfile("bee/cmyk.jpg").read())).mode == "CMYK"

    arrays = store_arrays(path)
    C = 5
    keys = arrays["samples/key"]
    assert keys.shape == (15,)
    for shard, shard_keys in enumerate(dataset["keys"]):
        row_keys = list(keys[shard * C: shard * C + C])
        assert row_keys == shard_keys + [""] * (C - len(shard_keys))  # tar order, then padding
    rows = {k: i for i, k in enumerate(keys) if k}
    assert set(rows) == set(dataset["sizes"])
    valid = arrays["samples/valid"]
    assert valid.sum() == 12 and all(valid[r] for r in rows.values())
    classes = {"ant": 0, "bee": 1, "cat": 2}
    assert all(arrays["samples/label"][r] == classes[k.split("/")[0]] for k, r in rows.items())

    policy = ViewPolicy.from_dict(store_attrs(path)["config"]["views"])
    assert policy.num_views == 2
    for key, row in rows.items():
        boxes, flips = sample_views(policy, key, *dataset["sizes"][key])  # views of this key at this size
        assert np.array_equal(arrays["views/box"][row], boxes), key
        assert np.array_equal(arrays["views/flip"][row], flips), key
    for tid in TIDS:
        logprob = arrays[f"teachers/{tid}/topk_logprob"][valid].astype(np.float32)
        assert logprob.shape == (12, 2, 3) and np.isfinite(logprob).all() and (logprob < 0).all()
        assert (np.diff(logprob, axis=-1) <= 0).all()
        leftover = arrays[f"teachers/{tid}/log_leftover"][valid]
        assert leftover.shape == (12, 2, 1) and np.isfinite(leftover).all() and (leftover < 0).all()
        features = arrays[f"teachers/{tid}/features"][valid].astype(np.float32)
        assert np.isfinite(features).all() and (np.abs(features).sum(-1) > 0).all()
        assert arrays[f"teachers/{tid}/done"].all()
        assert not arrays[f"teachers/{tid}/topk_logprob"][~valid].any()  # padding rows stay empty


# ---------------------------------------------------------------------------- 2. adding a teacher


def test_adding_a_teacher_takes_view_settings_from_the_store(base_store, dataset, tmp_path):
    """`--teacher NEW` alone on a 2-view top-3 store computes only NEW, on the stored views; the result
    equals a joint run. An explicit conflicting --views fails naming the setting and changes nothing."""
    path = tmp_path / "cache.zarr"
    assert_ok(cache(dataset["manifest"], path, TEACHERS[0]))
    before = store_arrays(path)
    mtimes = file_mtimes(path, "samples", "views", "teachers/test_resnet")
    time.sleep(0.01)

    result = cache(dataset["manifest"], path, TEACHERS[1], views=False)
    assert_ok(result)
    assert "teachers: test_convnext" in result.output and "shards: 3 cached now" in result.output
    config = store_attrs(path)["config"]
    assert config["views"]["num_views"] == 2 and config["topk"] == 3
    after = store_arrays(path)
    for name, array in before.items():  # first teacher, samples and views untouched ...
        assert np.array_equal(after[name], array), name
    assert file_mtimes(path, "samples", "views", "teachers/test_resnet") == mtimes  # ... not even rewritten
    base = store_arrays(base_store[0])
    assert set(after) == set(base)
    for name in after:  # and the new teacher's outputs equal those of a run with both teachers
        assert np.array_equal(after[name], base[name]), name

    result = cli("cache-teachers", "--shards", dataset["manifest"], "--store", path,
                 "--teacher", TEACHERS[0] + ",id=extra", "--views", "3", *RUN_ARGS)
    assert_clean_error(result, str(path), "other settings", "num_views")
    result = cache(dataset["manifest"], path, TEACHERS[1], views=False)  # the same command again: a no-op
    assert_ok(result)
    assert "shards: 0 cached now, 3 already complete, 0 failed (of 3)" in result.output
    assert sorted(store_attrs(path)["teachers"]) == sorted(TIDS)
    assert not (path / "teachers" / "extra").exists()


# ---------------------------------------------------------------------------- 3. inspect


def test_inspect_reports_teachers_views_and_coverage(base_store, tmp_path):
    """inspect as text, as JSON (teachers, k, views, full coverage, sizes), and as a PNG plot."""
    path = base_store[0]
    result = cli("inspect", path)
    assert_ok(result)
    assert "views: 2 per sample (features for 2), top-3" in result.output
    for tid in TIDS:
        assert f"teacher {tid}: {tid} (random-init:seed=0" in result.output
    assert result.output.count("coverage 100.0% (3/3 shards)") == 2

    result = cli("inspect", path, "--json")
    assert_ok(result)
    report = json.loads(result.stdout)
    assert set(report["teachers"]) == set(TIDS)
    assert report["topk"] == 3 and report["views"]["num_views"] == 2 and report["feature_views"] == 2
    assert report["dataset"]["num_samples"] == 12 and report["dataset"]["num_shards"] == 3
    for tid, dim in zip(TIDS, (96, 64)):
        t = report["teachers"][tid]
        assert t["coverage"] == 1.0 and t["shards_done"] == 3 and t["samples_covered"] == 12
        assert t["bytes_per_view"] > 0 and t["feature_bytes_per_view"] > 0 and t["feature_dim"] == dim
    assert isinstance(report["compression_ratio"], float) and report["compression_ratio"] > 0
    assert report["bytes"] > 0

    png = tmp_path / "out.png"
    result = cli("inspect", path, "--plot", png)
    assert_ok(result)
    assert f"plot: {png}" in result.output
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert Image.open(png).size[0] > 100


# ---------------------------------------------------------------------------- 4. verify


def corrupt_copy(store, tmp_path, array, change):
    """A copy of ``store`` with ``change`` applied to row bee/cmyk of ``array`` (plain zarr); returns (path, row)."""
    path = tmp_path / "corrupt.zarr"
    shutil.copytree(store, path)
    group = zarr.open_group(str(path), mode="r+")
    row = list(group["samples/key"][:]).index("bee/cmyk")
    values = group[array]
    values[row] = change(values[row])
    return path, row


def test_verify_passes_on_a_good_store_and_names_a_corrupted_row(base_store, tmp_path):
    """verify recomputes entries live: exit 0 on the cache as written; after +1.0 on one row's cached
    log-probabilities (plain zarr), exit 1 with MISMATCH lines naming exactly that row."""
    result = cli("verify", base_store[0], "--samples", 8)
    assert_ok(result)
    assert "checked 16 entries" in result.output and "MISMATCH" not in result.output
    for tid in TIDS:
        assert re.search(rf"^  {tid}: max KL [\d.e+-]+ nats, max leftover error ", result.output, re.M), result.output

    path, row = corrupt_copy(base_store[0], tmp_path, "teachers/test_resnet/topk_logprob",
                             lambda x: x + np.float16(1.0))

    result = cli("verify", path, "--samples", 64)  # more than the 12 valid rows: every row is checked
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    mismatches = [line for line in result.output.splitlines() if line.startswith("MISMATCH")]
    assert mismatches, result.output
    assert all(line.startswith(f"MISMATCH test_resnet row {row} (bee/cmyk) view ") for line in mismatches), mismatches
    assert any("top-k log-probabilities differ" in line for line in mismatches)


def test_verify_json_gives_kl_and_leftover_error_per_teacher_and_fails_above_the_kl_limit(base_store, tmp_path):
    """--json: max_kl and max_leftover_rel_error per teacher, tiny on the cache as written; a leftover cut
    by e^3 on one row of one teacher makes that teacher's KL exceed 1e-3: exit 1, a line naming it."""
    result = cli("verify", base_store[0], "--samples", 8, "--json")
    assert_ok(result)
    report = json.loads(result.stdout)
    assert report["ok"] and report["checked"] == 16 and report["max_kl_allowed"] == 1e-3
    for tid in TIDS:
        teacher = report["teachers"][tid]
        assert teacher["checked"] == 8 and 0 <= teacher["max_kl"] < 1e-6, teacher
        assert teacher["max_leftover_rel_error"] < 1e-4 and teacher["max_logprob_error"] < 1e-2, teacher
        assert teacher["min_feature_cosine"] > 0.999, teacher

    path, row = corrupt_copy(base_store[0], tmp_path, "teachers/test_convnext/log_leftover", lambda x: x - 3.0)
    result = cli("verify", path, "--samples", 64, "--json")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    report = json.loads(result.stdout)
    assert not report["ok"]
    corrupted, intact = report["teachers"]["test_convnext"], report["teachers"]["test_resnet"]
    assert corrupted["max_kl"] > 1e-3 and corrupted["max_leftover_rel_error"] > 0.9, corrupted
    assert intact["max_kl"] < 1e-6 and intact["max_leftover_rel_error"] < 1e-4, intact
    kl_lines = [line for line in result.output.splitlines() if line.startswith("MISMATCH") and "KL(" in line]
    assert kl_lines and all(line.startswith(f"MISMATCH test_convnext row {row} (bee/cmyk) view ") for line in kl_lines)
    value = float(re.search(r"KL\(live \|\| rebuilt\) ([\d.e+-]+) nats > 0.001", kl_lines[0])[1])
    assert value > 1e-3 and value <= corrupted["max_kl"]


# ---------------------------------------------------------------------------- 5. bad input


def test_undecodable_and_unlabelled_samples_are_counted_and_rows_stay_aligned(bad_store, bad_dataset):
    """A truncated JPEG, garbage bytes, no cls and no image are counted invalid; keys stay in shard order."""
    path, result = bad_store
    assert_ok(result)
    assert "samples: 7 (4 invalid, skipped), views per sample: 2" in result.output
    assert "0 failed (of 3)" in result.output
    arrays = store_arrays(path)
    C = 4
    keys = arrays["samples/key"]
    for shard in range(3):
        shard_keys = tar_keys(bad_dataset / f"d-{shard:06d}.tar")
        assert list(keys[shard * C: shard * C + C]) == shard_keys + [""] * (C - len(shard_keys))
    valid = {k for k, v in zip(keys, arrays["samples/valid"]) if v}
    assert valid == {"k/good0", "k/png", "k/good1"}
    labels = dict(zip(keys, arrays["samples/label"]))
    assert labels["k/nocls"] == -1 and labels["k/trunc"] == 1 and labels["k/noimg"] == 2
    logprob = arrays["teachers/test_resnet/topk_logprob"]
    assert (logprob[arrays["samples/valid"]] != 0).all() and not logprob[~arrays["samples/valid"]].any()


def test_empty_shard_in_the_middle_keeps_later_rows_in_place(bad_store, bad_dataset):
    """An empty shard owns C padding rows; the next shard's samples sit at shard*C + j and verify live."""
    path, _ = bad_store
    arrays = store_arrays(path)
    assert list(arrays["samples/key"][4:8]) == [""] * 4 and not arrays["samples/valid"][4:8].any()
    assert arrays["samples/done"].all() and arrays["teachers/test_resnet/done"].all()
    row = 2 * 4 + 1
    assert arrays["samples/key"][row] == "k/good1" and arrays["samples/label"][row] == 1
    policy = ViewPolicy.from_dict(store_attrs(path)["config"]["views"])
    boxes, _ = sample_views(policy, "k/good1", 16, 20)
    assert np.array_equal(arrays["views/box"][row], boxes)
    result = cli("verify", path, "--samples", 8)  # re-reads each picked row from its shard position
    assert_ok(result)
    assert "checked 3 entries" in result.output
    report = json.loads(cli("inspect", path, "--json").stdout)
    assert report["teachers"]["test_resnet"]["coverage"] == 1.0
    assert report["dataset"]["valid_samples_cached"] == 3


def test_truncated_tar_fails_before_the_store_is_created(tmp_path, ray_local):
    """A shard cut in the middle of a member: exit 1 naming the shard; no store directory."""
    shards = tmp_path / "shards"
    shards.mkdir()
    rng = np.random.default_rng(2)
    for s in range(2):
        write_tar(shards / f"t-{s:06d}.tar",
                  [(f"x/s{s}_{i}", {"jpg": image_bytes(rng, 20, 16), "cls": b"0"}) for i in range(3)])
    victim = shards / "t-000001.tar"
    with tarfile.open(victim) as tar:
        member = tar.getmembers()[2]  # the second sample's image
    data = victim.read_bytes()
    victim.write_bytes(data[: member.offset_data + member.size // 2])
    store = tmp_path / "cache.zarr"
    result = cache(str(shards), store, TEACHERS[0])
    assert_clean_error(result, str(victim), "truncated")
    assert not store.exists()


def test_truncated_tar_behind_a_manifest_fails_only_that_shard(dataset, tmp_path, ray_local):
    """With a manifest the tars are not read when indexing, so a truncated shard is found by its worker:
    exit 1, a FAILED line naming the shard, and that shard is not marked done (its rows stay empty)."""
    shards = tmp_path / "shards"
    shutil.copytree(dataset["dir"], shards)
    victim = shards / "train-000001.tar"
    with tarfile.open(victim) as tar:
        member = tar.getmembers()[4]  # the third sample's image
    victim.write_bytes(victim.read_bytes()[: member.offset_data + member.size // 2])
    store = tmp_path / "cache.zarr"
    result = cache(str(shards / "train.json"), store, TEACHERS[0], extra=["--max-retries", 0])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "shards: 2 cached now, 0 already complete, 1 failed (of 3)" in result.output
    failed = [line for line in result.output.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and failed[0].startswith("FAILED train-000001.tar: ") and "truncated" in failed[0]
    arrays = store_arrays(store)
    assert list(arrays["teachers/test_resnet/done"]) == [True, False, True]
    assert list(arrays["samples/done"]) == [True, False, True]
    assert not arrays["samples/key"][5:10].any() and not arrays["teachers/test_resnet/topk_logprob"][5:10].any()


def test_duplicate_keys_across_shards_fail_before_the_store_is_created(tmp_path, ray_local):
    """The same key in two shards: exit 1 naming the key and both shards; no store directory."""
    shards = tmp_path / "shards"
    shards.mkdir()
    rng = np.random.default_rng(3)
    for s in range(2):
        write_tar(shards / f"u-{s:06d}.tar",
                  [(f"x/k{s * 2 + i}", {"jpg": image_bytes(rng, 20, 16), "cls": b"0"}) for i in range(3)])
    store = tmp_path / "cache.zarr"
    result = cache(str(shards), store, TEACHERS[0])
    assert_clean_error(result, "'x/k2'", shards / "u-000000.tar", shards / "u-000001.tar")
    assert not store.exists()


def test_store_path_that_is_not_a_store_is_refused_untouched(dataset, tmp_path, ray_local):
    """--store at a directory of other files, or at a plain file: exit 1 naming it, nothing written."""
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("mine")
    assert_clean_error(cache(dataset["manifest"], folder, TEACHERS[0]), str(folder))
    assert [p.name for p in folder.iterdir()] == ["readme.txt"]

    plain = tmp_path / "plain.zarr"
    plain.write_text("not a store")
    assert_clean_error(cache(dataset["manifest"], plain, TEACHERS[0]), str(plain))
    assert plain.read_text() == "not a store"


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_inspect_and_verify_on_a_missing_path(command, tmp_path):
    """inspect/verify of a path with no store: exit 1 naming it, and the path is not created."""
    missing = tmp_path / "missing.zarr"
    assert_clean_error(cli(command, missing), "no teacher cache", str(missing))
    assert not missing.exists()


@pytest.mark.parametrize("command", ["cache-teachers", "train-student", "inspect", "verify"])
def test_version_1_store_is_refused_with_how_to_rebuild_it(command, dataset, tmp_path, version_1_store, ray_local):
    """A format-1 store (written with plain zarr) is never read: every command that opens a store exits 1
    with one line saying how to rebuild it, and leaves it as it was."""
    from pipeline.data.shards import index_dataset

    path = version_1_store(tmp_path / "v1.zarr", index_dataset(dataset["manifest"]), teacher_ids=TIDS)
    before = file_mtimes(path, ".")
    args = {"cache-teachers": ["--shards", dataset["manifest"], "--teacher", TEACHERS[0], *RUN_ARGS],
            "train-student": ["--shards", dataset["manifest"], "--out", tmp_path / "run", "--epochs", 1],
            "inspect": [], "verify": []}[command]
    store_arg = ["--store", path] if command in ("cache-teachers", "train-student") else [path]
    error = assert_clean_error(cli(command, *store_arg, *args), f"{path} is a format-1 teacher cache",
                               "--store NEW.zarr --views 2 --topk 3 --temperatures 1", "(test_convnext, test_resnet)")
    assert "`pipeline cache-teachers --shards SHARDS" in error
    assert file_mtimes(path, ".") == before and store_attrs(path)["format_version"] == 1
    assert not (tmp_path / "run").exists()


def test_store_from_another_dataset_is_refused(base_store, dataset, tmp_path, ray_local):
    """The same store with only 2 of its 3 shards: exit 1 saying 'another dataset'; the store is unchanged."""
    path = tmp_path / "copy.zarr"
    shutil.copytree(base_store[0], path)
    before = store_arrays(path)
    result = cache(os.path.join(dataset["dir"], "train-{000000..000001}.tar"), path, TEACHERS[0], views=False)
    assert_clean_error(result, str(path), "another dataset")
    after = store_arrays(path)
    assert all(np.array_equal(after[name], array) for name, array in before.items())


@pytest.mark.parametrize("spec, random_init, needles", [
    ("test_resnt,img_size=32", True, ["unknown timm model 'test_resnt'", "test_resnet"]),
    ("test_resnet,img_size=32,colour=red", True, ["unknown option(s) colour"]),
    ("regla_t", False, ["regla_t", "--random-init"]),
    ("test_resnet,img_size=32", False, ["test_resnet", "--random-init"]),
    ("test_resnet@{tmp}/missing.safetensors", False, ["weights file not found", "{tmp}/missing.safetensors"]),
], ids=["unknown-model", "unknown-option", "no-weights", "no-weights-offline", "missing-weights-file"])
def test_bad_teacher_fails_without_leaving_a_store(spec, random_init, needles, dataset, tmp_path, ray_local):
    """A teacher that cannot be loaded: exit 1 with a message naming the problem, and no store directory."""
    store = tmp_path / "cache.zarr"
    args = ["cache-teachers", "--shards", dataset["manifest"], "--store", store,
            "--teacher", spec.format(tmp=tmp_path), *VIEW_ARGS, "--no-progress"]
    result = cli(*args, *(["--random-init"] if random_init else []))
    assert_clean_error(result, *[n.format(tmp=tmp_path) for n in needles])
    assert not store.exists()


@pytest.fixture(scope="module")
def full_disk_run(dataset, tmp_path_factory, ray_local):
    """cache-teachers with a 64-view store on a 128 KiB tmpfs: the store fits, the teacher's chunks do not."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; not running as root here")
    mount = tmp_path_factory.mktemp("tmpfs")
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount)],
                                 capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command: cannot mount a tmpfs to fill")
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {mounted.stderr.strip()}")
    try:
        store = mount / "cache.zarr"
        result = cli("cache-teachers", "--shards", dataset["manifest"], "--store", store, "--teacher", TEACHERS[0],
                     "--views", 64, "--topk", 3, "--max-retries", 0, *RUN_ARGS)
        done = report = None
        if (store / "teachers" / "test_resnet").exists():
            done = zarr.open_group(str(store), mode="r")["teachers/test_resnet/done"][:]
            report = json.loads(cli("inspect", store, "--json").stdout)
        yield result, done, report
    finally:
        if subprocess.run(["umount", str(mount)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)])


def test_full_disk_fails_with_no_space_left(full_disk_run):
    """A full disk is exit 1 with 'No space left' in the error or the FAILED lines; no failed shard is marked done."""
    result, done, _ = full_disk_run
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    assert "No space left on device" in result.output, result.output
    failed = re.findall(r"^FAILED train-(\d+)\.tar: (.*)$", result.output, re.M)
    if failed:  # the store was created and the shard writes failed
        assert all("No space left on device" in error for _, error in failed)
        assert done is not None and not any(done[int(s)] for s, _ in failed)
    else:  # the driver could not even create the store
        assert_clean_error(result, "No space left on device")


def test_no_bytes_per_view_is_claimed_for_a_teacher_with_nothing_cached(full_disk_run):
    """After the full-disk run no view of the teacher is cached: neither the summary nor inspect may report
    the partial chunks' bytes as a bytes-per-view figure (it would be the total, divided by 1)."""
    result, done, report = full_disk_run
    if done is None or done.any():
        pytest.skip("the full-disk run did not leave a teacher with zero completed shards")
    match = re.search(r"^  test_resnet: ([\d.]+) B/view \(top-k \+ leftover\)", result.output, re.M)
    assert match is None or float(match[1]) == 0.0, result.output
    teacher = report["teachers"]["test_resnet"]
    assert teacher["samples_covered"] == 0
    assert teacher["bytes_per_view"] == 0 and teacher["feature_bytes_per_view"] == 0, teacher


# ---------------------------------------------------------------------------- 6. a real Ray cluster


def _run_pipeline(env, *args):
    return subprocess.run([BIN / "pipeline", *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300)


def _assert_same_store(path, reference, rtol=0.0):
    """Every array equal; with ``rtol``, floating-point outputs equal to that tolerance (a worker with
    another torch thread count sums in another order)."""
    got, want = store_arrays(path), store_arrays(reference)
    assert set(got) == set(want)
    for name in want:
        if rtol and np.issubdtype(want[name].dtype, np.floating) and name.startswith("teachers/"):
            np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=rtol, err_msg=name)
        else:
            assert np.array_equal(got[name], want[name]), name


@pytest.mark.slow
def test_cache_on_a_ray_cluster_equals_the_embedded_run(ray_cluster, ray_local, base_store, dataset, tmp_path):
    """`--address HOST:PORT` makes the CLI the driver of a `ray start` cluster (the session's two-node one);
    the store is complete and equals the embedded run's; the test session's own Ray is untouched."""
    import ray

    address, env = ray_cluster.gcs_address, service_env()
    session_gcs = ray.get_runtime_context().gcs_address
    path = tmp_path / "cluster.zarr"
    run = _run_pipeline(env, "cache-teachers", "--shards", dataset["manifest"], "--store", path,
                        "--teacher", TEACHERS[0], "--teacher", TEACHERS[1], *VIEW_ARGS, *RUN_ARGS,
                        "--address", address)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "shards: 3 cached now, 0 already complete, 0 failed (of 3)" in run.stdout
    assert "Connected to Ray cluster" in run.stderr and "Started a local Ray instance" not in run.stderr
    _assert_same_store(path, base_store[0], rtol=2e-3)
    assert ray.is_initialized() and ray.get_runtime_context().gcs_address == session_gcs
    assert ray.get(ray.put(41)) + 1 == 42


@pytest.mark.slow
def test_no_address_uses_an_embedded_ray_even_when_a_local_cluster_runs(ray_cluster, base_store, dataset, tmp_path):
    """Without --address the job runs on an embedded Ray (design, section 6), even when this machine
    also runs a `ray start` cluster: no traceback, exit 0, the same store."""
    env = service_env()
    path = tmp_path / "embedded.zarr"
    run = _run_pipeline(env, "cache-teachers", "--shards", dataset["manifest"], "--store", path,
                        "--teacher", TEACHERS[0], "--teacher", TEACHERS[1], *VIEW_ARGS, *RUN_ARGS)
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "Connecting to existing Ray cluster" not in run.stderr
    _assert_same_store(path, base_store[0])
