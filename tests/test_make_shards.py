"""Building shards from an image folder and from the bundled MNIST sample; `pipeline make-shards`."""
import io
import os
import traceback

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.data.make_shards import default_num_workers, make_mnist_sample, make_shards_from_folder
from pipeline.data.shards import DatasetError, decode_image, index_dataset, iter_shard, read_manifest


def encode(pixels, fmt):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_file(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return data


@pytest.fixture
def image_folder(tmp_path):
    """Three classes (created out of order), JPEGs plus a PNG, a BMP, a broken file and a non-image."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    files = {}
    for class_name, count in (("zebra", 3), ("ant", 4), ("moth.v2", 2)):
        for i in range(count):
            pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
            files[f"{class_name}/img{i}"] = write_file(root / class_name / f"img{i}.JPEG", encode(pixels, "JPEG"))
    files["ant/drawing"] = write_file(root / "ant" / "drawing.png", encode(np.full((16, 16, 3), 200, np.uint8), "PNG"))
    files["zebra/scan_v1"] = write_file(root / "zebra" / "scan.v1.bmp", encode(np.full((16, 16), 60, np.uint8), "BMP"))
    write_file(root / "moth.v2" / "broken.jpg", b"\xff\xd8\xff not really a jpeg")
    write_file(root / "zebra" / "notes.txt", b"not an image")
    return root, files


def read_split(spec):
    return {s.key: s for url in [s.url for s in index_dataset(spec).shards] for s in iter_shard(url)}


def test_folder_round_trip(image_folder, tmp_path):
    root, files = image_folder
    out = tmp_path / "shards"
    with pytest.warns(UserWarning, match="broken.jpg"):
        manifest_path = make_shards_from_folder(str(root), str(out), samples_per_shard=4, progress=False)

    assert manifest_path == str(out / "train.json")
    assert sorted(os.listdir(out)) == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "train.json"]
    manifest = read_manifest(manifest_path)
    assert manifest["class_names"] == ["ant", "moth.v2", "zebra"]
    assert [s["num_samples"] for s in manifest["shards"]] == [3, 4, 4]  # broken.jpg is among the first 4 files

    samples = read_split(str(out))
    assert sorted(samples) == sorted(files)
    for key, sample in samples.items():
        assert sample.label == manifest["class_names"].index(key.split("/")[0]) and sample.image_ext == "jpg"
        if key.endswith(("drawing", "scan_v1")):  # re-encoded as JPEG
            assert sample.image_bytes[:3] == b"\xff\xd8\xff"
            expected = 200 if key.endswith("drawing") else 60
            np.testing.assert_allclose(decode_image(sample.image_bytes), expected, atol=2)
        else:
            assert sample.image_bytes == files[key]

    scanned, from_manifest = index_dataset(str(out)), index_dataset(manifest_path)
    assert from_manifest.fingerprint() == scanned.fingerprint()
    assert from_manifest.class_names == ("ant", "moth.v2", "zebra") and from_manifest.num_samples == 11


def test_folder_shuffle_is_seeded(image_folder, tmp_path):
    root, files = image_folder

    def keys(out, **kwargs):
        with pytest.warns(UserWarning):
            make_shards_from_folder(str(root), str(tmp_path / out), 100, progress=False, **kwargs)
        return [s.key for s in iter_shard(str(tmp_path / out / "train-000000.tar"))]

    in_order = keys("plain", shuffle=False)
    assert in_order == sorted(files, key=lambda k: (k.split("/")[0], k))  # class order, then file order
    shuffled = keys("seed0", seed=0)
    assert shuffled == keys("seed0-again", seed=0)
    assert sorted(shuffled) == sorted(in_order) and shuffled != in_order
    assert keys("seed1", seed=1) != shuffled


def test_rerun_with_fewer_shards_removes_stale_ones(image_folder, tmp_path):
    root, _ = image_folder
    out = tmp_path / "shards"
    with pytest.warns(UserWarning):
        make_shards_from_folder(str(root), str(out), samples_per_shard=2, split="val", progress=False)
    assert len(read_manifest(str(out / "val.json"))["shards"]) == 6
    (out / "train-000009.tar").write_bytes(b"another split")
    with pytest.warns(UserWarning):
        make_shards_from_folder(str(root), str(out), samples_per_shard=5, split="val", progress=False)
    assert sorted(os.listdir(out)) == ["train-000009.tar", "val-000000.tar", "val-000001.tar",
                                       "val-000002.tar", "val.json"]
    assert index_dataset(str(out / "val-*.tar")).num_samples == 11


def test_shard_i_holds_files_i_s_to_next_and_skips_leave_it_shorter(image_folder, tmp_path):
    root, files = image_folder
    with pytest.warns(UserWarning, match="skipped 1 file.*broken.jpg"):
        make_shards_from_folder(str(root), str(tmp_path / "out"), 4, shuffle=False, progress=False, num_workers=1)
    keys = [[s.key for s in iter_shard(str(tmp_path / "out" / f"train-{i:06d}.tar"))] for i in range(3)]
    # Sorted files: ant x5, moth.v2 (broken.jpg first) x3, zebra x4, cut in groups of 4 before decoding.
    assert keys == [["ant/drawing", "ant/img0", "ant/img1", "ant/img2"],
                    ["ant/img3", "moth.v2/img0", "moth.v2/img1"],
                    ["zebra/img0", "zebra/img1", "zebra/img2", "zebra/scan_v1"]]


def test_group_with_no_decodable_file_gives_no_shard(image_folder, tmp_path):
    root, _ = image_folder
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-000011.tar.partial").write_bytes(b"left by an interrupted run")
    with pytest.warns(UserWarning, match="broken.jpg"):
        make_shards_from_folder(str(root), str(out), 1, shuffle=False, progress=False, num_workers=2)
    assert sorted(os.listdir(out)) == [f"train-{i:06d}.tar" for i in range(11)] + ["train.json"]
    assert [s.key for s in iter_shard(str(out / "train-000005.tar"))] == ["moth.v2/img0"]  # group 5 was broken.jpg


def test_shards_are_the_same_bytes_with_any_number_of_workers(image_folder, tmp_path):
    root, _ = image_folder
    for workers in (1, 2, 3):
        with pytest.warns(UserWarning, match="skipped 1 file.*broken.jpg"):
            make_shards_from_folder(str(root), str(tmp_path / f"w{workers}"), 2, progress=False, num_workers=workers)
    names = sorted(os.listdir(tmp_path / "w1"))
    assert names == [f"train-{i:06d}.tar" for i in range(6)] + ["train.json"]
    for workers in (2, 3):
        assert sorted(os.listdir(tmp_path / f"w{workers}")) == names
        for name in names:
            assert (tmp_path / f"w{workers}" / name).read_bytes() == (tmp_path / "w1" / name).read_bytes(), name
    assert default_num_workers() >= 1


def test_shards_are_the_bytes_webdataset_writes(image_folder, tmp_path):
    """Shards are written without webdataset (it imports torch in every worker) but match its TarWriter."""
    import webdataset as wds

    root, _ = image_folder
    long_name = "ünïcode_名前_" + "x" * 100 + ".png"  # needs a pax header, as webdataset writes it
    (root / "ant" / long_name).write_bytes(encode(np.zeros((8, 8, 3), np.uint8), "PNG"))
    with pytest.warns(UserWarning):
        make_shards_from_folder(str(root), str(tmp_path / "out"), 100, progress=False, num_workers=1)
    ours = tmp_path / "out" / "train-000000.tar"
    with wds.TarWriter(str(tmp_path / "wds.tar"), encoder=False, mtime=0) as writer:
        for sample in iter_shard(str(ours)):
            writer.write({"__key__": sample.key, "jpg": sample.image_bytes, "cls": str(sample.label).encode()})
    assert ours.read_bytes() == (tmp_path / "wds.tar").read_bytes()


def test_worker_error_is_one_line_naming_the_file(image_folder, tmp_path):
    root, _ = image_folder
    out = tmp_path / "out"
    (out / "train-000001.tar.partial").mkdir(parents=True)  # the worker building shard 1 cannot write it
    with pytest.raises(DatasetError, match=r"cannot write shard .*train-000001\.tar\.partial") as excinfo:
        make_shards_from_folder(str(root), str(out), 4, progress=False, num_workers=2)
    shown = "".join(traceback.format_exception(excinfo.value))
    assert "RemoteTraceback" not in shown and "concurrent.futures" not in shown
    assert not (out / "train.json").exists()

    result = CliRunner().invoke(main, ["make-shards", "--from-folder", str(root), "--out", str(out),
                                       "--samples-per-shard", "4", "--num-workers", "2"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("Error")] == [
        f"Error: cannot write shard {out / 'train-000001.tar.partial'}: Is a directory"]


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match="does not exist.*nowhere"):
        make_shards_from_folder(str(tmp_path / "nowhere"), str(tmp_path / "out"), 10)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(encode(np.zeros((8, 8, 3), np.uint8), "JPEG"))
    with pytest.raises(DatasetError, match="no class subfolders.*flat"):
        make_shards_from_folder(str(tmp_path / "flat"), str(tmp_path / "out"), 10)
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    (tmp_path / "noimg" / "cat" / "a.txt").write_text("text")
    with pytest.raises(DatasetError, match="no image files.*noimg"):
        make_shards_from_folder(str(tmp_path / "noimg"), str(tmp_path / "out"), 10)


def test_files_sharing_a_key_are_named(tmp_path):
    pixels = np.zeros((8, 8, 3), np.uint8)
    write_file(tmp_path / "in" / "cat" / "a.jpg", encode(pixels, "JPEG"))
    write_file(tmp_path / "in" / "cat" / "a.png", encode(pixels, "PNG"))
    with pytest.raises(DatasetError, match=r"a\.jpg and .*a\.png.*'cat/a'"):
        make_shards_from_folder(str(tmp_path / "in"), str(tmp_path / "out"), 10, progress=False)


def test_no_decodable_image_is_an_error(tmp_path):
    write_file(tmp_path / "in" / "cat" / "a.jpg", b"broken")
    with pytest.raises(DatasetError, match="could be decoded"), pytest.warns(UserWarning, match="a.jpg"):
        make_shards_from_folder(str(tmp_path / "in"), str(tmp_path / "out"), 10, progress=False)


# ---------------------------------------------------------------------------- MNIST sample


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    out = tmp_path_factory.mktemp("mnist")
    return out, make_mnist_sample(str(out), img_size=16, samples_per_shard=1500, progress=False, num_workers=2)


def test_mnist_sample_splits(mnist):
    out, manifests = mnist
    assert manifests == [str(out / "train.json"), str(out / "val.json")]
    train, val = read_split(manifests[0]), read_split(manifests[1])
    assert (len(train), len(val)) == (4000, 1000)
    assert [s["num_samples"] for s in read_manifest(manifests[0])["shards"]] == [1500, 1500, 1000]
    assert read_manifest(manifests[1])["class_names"] == [str(d) for d in range(10)]
    assert not set(train) & set(val)
    assert all(k.startswith("mnist/") and 0 <= int(k[6:]) < 5000 for k in [*train, *val])
    for split, per_class in ((train, 400), (val, 100)):  # stratified
        np.testing.assert_array_equal(np.bincount([s.label for s in split.values()], minlength=10), per_class)
    digit = decode_image(next(iter(train.values())).image_bytes)
    assert digit.shape == (16, 16, 3) and digit.max() > 200 and digit.min() < 30
    first_shard = [s.label for s in iter_shard(str(out / "train-000000.tar"))]
    assert len(set(first_shard[:100])) == 10  # classes are mixed across shards


def test_mnist_sample_is_deterministic(mnist, tmp_path):
    out, _ = mnist  # built by two workers; this copy by one
    make_mnist_sample(str(tmp_path), img_size=16, samples_per_shard=1500, progress=False, num_workers=1)
    for name in ("train-000000.tar", "train-000002.tar", "val-000000.tar", "train.json"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()


def test_mnist_seed_changes_the_split(mnist, tmp_path):
    out, _ = mnist
    make_mnist_sample(str(tmp_path), img_size=16, samples_per_shard=5000, val_fraction=0.1, seed=1,
                      progress=False)
    val = read_split(str(tmp_path / "val.json"))
    assert len(val) == 500 and set(val) != set(read_split(str(out / "val.json")))


# ---------------------------------------------------------------------------- CLI


def test_cli_make_shards_from_folder(image_folder, tmp_path):
    root, files = image_folder
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["make-shards", "--from-folder", str(root), "--out", str(out),
                                       "--samples-per-shard", "5", "--split-name", "val", "--no-shuffle",
                                       "--num-workers", "2"])
    assert result.exit_code == 0, result.output
    assert f"val: 11 samples in 3 shards, manifest {out / 'val.json'}" in result.output
    assert "Warning: skipped 1 file(s) that do not decode as images" in result.output and "broken.jpg" in result.output
    assert [s.key for s in iter_shard(str(out / "val-000000.tar"))] == sorted(files)[:5]


def test_cli_make_shards_mnist(tmp_path):
    result = CliRunner().invoke(main, ["make-shards", "--sample", "mnist", "--out", str(tmp_path),
                                       "--img-size", "8", "--samples-per-shard", "3000"])
    assert result.exit_code == 0, result.output
    assert "train: 4000 samples in 2 shards" in result.output and "val: 1000 samples in 1 shards" in result.output
    assert decode_image(next(iter_shard(str(tmp_path / "val-000000.tar"))).image_bytes).shape == (8, 8, 3)


@pytest.mark.parametrize("args, message", [
    ([], "exactly one of"),
    (["--from-folder", "x", "--sample", "mnist"], "exactly one of"),
    (["--sample", "mnist", "--split-name", "test"], "--split-name cannot be used with --sample"),
    (["--from-folder", "x", "--img-size", "64"], "--img-size cannot be used with --from-folder"),
    (["--from-folder", "x", "--num-workers", "0"], "0 is not in the range x>=1"),
])
def test_cli_make_shards_usage_errors(tmp_path, args, message):
    result = CliRunner().invoke(main, ["make-shards", "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()


def test_cli_make_shards_dataset_error_is_clean(tmp_path):
    result = CliRunner().invoke(main, ["make-shards", "--from-folder", str(tmp_path / "missing"),
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "Error: image folder does not exist" in result.output and "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)
