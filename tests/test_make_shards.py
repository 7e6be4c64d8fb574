"""Building shards from an image folder and from the bundled MNIST sample; `pipeline make-shards`."""
import io
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.data.make_shards import make_mnist_sample, make_shards_from_folder
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
    assert [s["num_samples"] for s in manifest["shards"]] == [4, 4, 3]

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
    return out, make_mnist_sample(str(out), img_size=16, samples_per_shard=1500, progress=False)


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
    out, _ = mnist
    make_mnist_sample(str(tmp_path), img_size=16, samples_per_shard=1500, progress=False)
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
                                       "--samples-per-shard", "5", "--split-name", "val", "--no-shuffle"])
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
