"""Shard lists, manifests, the dataset index, tar reading and image decoding (pipeline.data.shards)."""
import hashlib
import io
import json
import os
import tarfile
import warnings

import numpy as np
import pytest
from PIL import Image

from pipeline.data.shards import (
    MANIFEST_FORMAT, DatasetError, ImageDecodeError, ShardInfo, decode_image,
    expand_shard_urls, index_dataset, iter_shard, open_url, read_manifest, write_manifest,
)


def write_tar(path, members):
    """Write a tar with (name, bytes) members, as a third-party tool would; directories for None."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def encode(pixels, fmt, **kwargs):
    buffer = io.BytesIO()
    (pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def rgb(color, size=16):
    return np.full((size, size, 3), color, dtype=np.uint8)


def labelled_tar(path, keys):
    return write_tar(path, [m for i, k in enumerate(keys)
                            for m in ((f"{k}.png", encode(rgb(i), "PNG")), (f"{k}.cls", str(i).encode()))])


def key_hash(keys):
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


# ---------------------------------------------------------------------------- reading tars


def test_reads_shards_written_by_other_tools(tmp_path):
    red, green, blue = rgb((250, 0, 0)), rgb((0, 250, 0)), rgb((0, 0, 250))
    url = write_tar(tmp_path / "other.tar", [
        ("a", None),
        ("a/s1.jpeg", encode(red, "JPEG", quality=95)),
        ("a/s1.cls", b"3\n"),
        ("a/s2.PNG", encode(green, "PNG")),
        ("a/s2.cls.txt", b" 7 "),
        ("a/s2.json", b'{"caption": "ignored"}'),
        ("a.b/c.d/img001.webp", encode(blue, "WEBP", lossless=True)),
        ("a.b/c.d/img001.cls", b"12"),
        ("a.b/c.d/img001.txt", b"extra"),
        ("x/img.seg.png", encode(red, "PNG")),  # ext 'seg.png' is no image of this dataset
        ("__meta__.json", b"{}"),
    ])
    samples = list(iter_shard(url))
    assert [(s.key, s.label, s.image_ext) for s in samples] == [
        ("a/s1", 3, "jpeg"), ("a/s2", 7, "png"), ("a.b/c.d/img001", 12, "webp")]
    for sample, expected in zip(samples, (red, green, blue)):
        np.testing.assert_allclose(decode_image(sample.image_bytes), expected, atol=3)
    assert index_dataset(url).shards[0].keys_sha256 == key_hash(["a/s1", "a/s2", "a.b/c.d/img001"])


def test_image_preference_follows_image_exts(tmp_path):
    png, jpg = encode(rgb(10), "PNG"), encode(rgb(200), "JPEG")
    url = write_tar(tmp_path / "s.tar", [("k.png", png), ("k.jpg", jpg), ("k.cls", b"1")])
    (sample,) = iter_shard(url)
    assert (sample.image_ext, sample.image_bytes) == ("jpg", jpg)


@pytest.mark.parametrize("data, label", [
    (b"3\n", 3), (b" 42 ", 42), (b"007", 7), (b"5", 5),
    (b"-1", None), (b"2.5", None), (b"[1]", None), (b'"cat"', None), (b"true", None),
    (b"cat", None), (b"", None), (b"\xff\xfe", None),
])
def test_cls_is_decimal_text_or_json_int(tmp_path, data, label):
    url = write_tar(tmp_path / "s.tar", [("k.jpg", encode(rgb(0), "JPEG")), ("k.cls", data)])
    assert [s.label for s in iter_shard(url)] == [label]


def test_missing_members_read_as_none(tmp_path):
    url = write_tar(tmp_path / "s.tar", [("img.jpg", encode(rgb(0), "JPEG")), ("lab.cls", b"4")])
    assert [(s.key, s.label, s.image_ext, s.image_bytes is None) for s in iter_shard(url)] == [
        ("img", None, "jpg", False), ("lab", 4, None, True)]


# Cut inside k2's image, or just after k1's members: k1 may have lost members, so it does not count.
@pytest.mark.parametrize("cut, last_key", [("mid-member", "k1"), ("member-boundary", "k0")])
def test_truncated_tar_names_shard_and_last_key(tmp_path, cut, last_key):
    full = labelled_tar(tmp_path / "full.tar", ["k0", "k1", "k2"])
    data = open(full, "rb").read()
    with tarfile.open(full) as tar:
        members = tar.getmembers()
    end = members[4].offset_data + 10 if cut == "mid-member" else members[4].offset
    url = str(tmp_path / "train-000007.tar")
    with open(url, "wb") as f:
        f.write(data[:end])

    streamed = []
    with pytest.raises(DatasetError, match=rf"train-000007\.tar is truncated.*'{last_key}'"):
        for sample in iter_shard(url):
            streamed.append(sample.key)
    assert streamed[-1] == last_key
    with pytest.raises(DatasetError, match=r"train-000007\.tar is truncated"):
        index_dataset(url)


def test_non_tar_shard_is_an_error_naming_it(tmp_path):
    url = tmp_path / "junk.tar"
    url.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(DatasetError, match="junk.tar"):
        index_dataset(str(url))
    with pytest.raises(DatasetError, match="junk.tar"):
        list(iter_shard(str(url)))


# ---------------------------------------------------------------------------- the index


def test_index_layout_and_empty_shard_keeps_its_place(tmp_path):
    a = labelled_tar(tmp_path / "a.tar", ["a0", "a1", "a2"])
    empty = write_tar(tmp_path / "b.tar", [])
    c = labelled_tar(tmp_path / "c.tar", ["c0"])
    with pytest.warns(UserWarning, match="b.tar"):
        index = index_dataset([a, empty, c])
    assert [(s.name, s.num_samples) for s in index.shards] == [("a.tar", 3), ("b.tar", 0), ("c.tar", 1)]
    assert (index.rows_per_shard, index.num_rows, index.num_samples) == (3, 9, 4)
    assert index.class_names is None
    fingerprint = index.fingerprint()
    assert fingerprint["shards"] == ["a.tar", "b.tar", "c.tar"] and fingerprint["counts"] == [3, 0, 1]
    per_shard = [key_hash(["a0", "a1", "a2"]), key_hash([]), key_hash(["c0"])]
    assert fingerprint["keys_sha256"] == hashlib.sha256("\n".join(per_shard).encode()).hexdigest()
    json.dumps(fingerprint)


def test_key_order_changes_the_fingerprint(tmp_path):
    one = index_dataset(labelled_tar(tmp_path / "s.tar", ["k0", "k1"])).fingerprint()
    two = index_dataset(labelled_tar(tmp_path / "s.tar", ["k1", "k0"])).fingerprint()
    assert one["shards"] == two["shards"] and one["counts"] == two["counts"]
    assert one["keys_sha256"] != two["keys_sha256"]


def test_empty_dataset_is_an_error(tmp_path):
    url = write_tar(tmp_path / "empty.tar", [("only.json", b"{}")])
    with pytest.raises(DatasetError, match="no samples"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index_dataset(url)


def test_duplicate_key_within_a_shard(tmp_path):
    url = labelled_tar(tmp_path / "dup.tar", ["k0", "k1", "k0"])
    with pytest.raises(DatasetError, match=r"'k0'.*dup\.tar"):
        index_dataset(url)
    with pytest.raises(DatasetError, match=r"'k0'.*dup\.tar"):
        list(iter_shard(url))


def test_repeated_member_within_a_sample(tmp_path):
    url = write_tar(tmp_path / "s.tar", [("k.jpg", b"a"), ("k.JPG", b"b"), ("k.cls", b"1")])
    with pytest.raises(DatasetError, match=r"s\.tar: sample 'k' has two 'jpg' members"):
        list(iter_shard(url))


def test_duplicate_key_across_shards_names_both(tmp_path):
    a = labelled_tar(tmp_path / "a.tar", ["k0", "shared"])
    b = labelled_tar(tmp_path / "b.tar", ["shared", "k2"])
    with pytest.raises(DatasetError, match=r"'shared'.*a\.tar.*b\.tar"):
        index_dataset([a, b])


def test_index_from_manifest_matches_the_scan(tmp_path):
    urls = [labelled_tar(tmp_path / f"train-{i:06d}.tar", [f"s{i}_{j}" for j in range(i + 1)]) for i in range(3)]
    scanned = index_dataset(str(tmp_path))
    write_manifest(str(tmp_path / "train.json"), "train", scanned.shards, ["cat", "dog"])

    manifest = read_manifest(str(tmp_path / "train.json"))
    assert manifest["format"] == MANIFEST_FORMAT and manifest["split"] == "train"
    assert manifest["num_samples"] == 6 and manifest["class_names"] == ["cat", "dog"]
    assert manifest["shards"][2] == {"name": "train-000002.tar", "num_samples": 3,
                                     "keys_sha256": key_hash(["s2_0", "s2_1", "s2_2"])}

    from_manifest = index_dataset(str(tmp_path / "train.json"))
    assert from_manifest.fingerprint() == scanned.fingerprint()
    assert [s.url for s in from_manifest.shards] == urls
    assert from_manifest.class_names == ("cat", "dog")


def test_manifest_with_a_missing_shard_names_it(tmp_path):
    urls = [labelled_tar(tmp_path / f"train-{i:06d}.tar", [f"k{i}"]) for i in range(2)]
    write_manifest(str(tmp_path / "train.json"), "train", index_dataset(urls).shards, None)
    os.remove(urls[1])
    with pytest.raises(DatasetError, match="train-000001.tar"):
        index_dataset(str(tmp_path / "train.json"))
    with pytest.raises(DatasetError, match="train-000001.tar"):
        expand_shard_urls(str(tmp_path / "train.json"))


@pytest.mark.parametrize("content, message", [
    ("{not json", "cannot read manifest"),
    ('{"format": "other/1", "shards": []}', "not a shard manifest"),
    (json.dumps({"format": MANIFEST_FORMAT, "num_samples": 5, "class_names": None,
                 "shards": [{"name": "a.tar", "num_samples": 4, "keys_sha256": "x"}]}), "num_samples is 5"),
    (json.dumps({"format": MANIFEST_FORMAT, "num_samples": 1, "shards": [{"name": "a.tar"}]}), "'shards'"),
])
def test_bad_manifest_names_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message) as excinfo:
        read_manifest(str(path))
    assert "bad.json" in str(excinfo.value)


# ---------------------------------------------------------------------------- shard lists


@pytest.fixture
def shard_dir(tmp_path):
    for i in range(3):
        labelled_tar(tmp_path / f"train-{i:06d}.tar", [f"k{i}"])
    (tmp_path / "notes.txt").write_text("not a shard")
    return tmp_path


def test_expand_brace_list_comma_and_directory(shard_dir, monkeypatch):
    expected = [str(shard_dir / f"train-{i:06d}.tar") for i in range(3)]
    monkeypatch.chdir(shard_dir)
    assert expand_shard_urls("train-{000000..000002}.tar") == expected
    assert expand_shard_urls(f"{shard_dir}/train-{{000000,000002}}.tar") == [expected[0], expected[2]]
    assert expand_shard_urls(["train-000002.tar", "train-000000.tar"]) == [expected[2], expected[0]]
    assert expand_shard_urls("train-000001.tar, train-{000000..000002}.tar") == expected[1:2] + expected
    assert expand_shard_urls(str(shard_dir)) == expected
    assert expand_shard_urls(".") == expected


def test_expand_manifest_resolves_names_next_to_it(shard_dir, monkeypatch):
    index = index_dataset(str(shard_dir))
    write_manifest(str(shard_dir / "train.json"), "train", index.shards[::-1], None)
    monkeypatch.chdir(shard_dir.parent)
    assert expand_shard_urls(f"{shard_dir.name}/train.json") == [s.url for s in index.shards[::-1]]


def test_expand_fsspec_urls(shard_dir):
    url = f"file://{shard_dir}/train-000001.tar"
    assert expand_shard_urls(url) == [url]
    assert expand_shard_urls(f"file://{shard_dir}") == [f"file://{shard_dir}/train-{i:06d}.tar" for i in range(3)]
    assert expand_shard_urls(f"file://{shard_dir}/train-00000[02].tar") == [
        f"file://{shard_dir}/train-000000.tar", f"file://{shard_dir}/train-000002.tar"]
    assert [s.key for s in iter_shard(url)] == ["k1"]
    assert index_dataset(url).shards[0] == ShardInfo(url, "train-000001.tar", 1, key_hash(["k1"]))


def test_expand_errors_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match="does not exist.*missing-000003.tar"):
        expand_shard_urls(str(tmp_path / "missing-000003.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no .tar shards.*empty"):
        expand_shard_urls(str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="no files match"):
        expand_shard_urls(f"file://{tmp_path}/nothing-*.tar")
    with pytest.raises(DatasetError, match="no shards"):
        expand_shard_urls(" , ")


def test_expand_brace_pattern_with_a_missing_shard(shard_dir):
    with pytest.raises(DatasetError, match="train-000003.tar"):
        expand_shard_urls(f"{shard_dir}/train-{{000000..000003}}.tar")


def test_open_url_reads_local_paths_and_fsspec_urls(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"payload")
    for url in (str(tmp_path / "f.bin"), f"file://{tmp_path}/f.bin"):
        with open_url(url) as f:
            assert f.read() == b"payload"


# ---------------------------------------------------------------------------- decoding


def test_decode_rejects_corrupt_and_truncated_images():
    with pytest.raises(ImageDecodeError, match="not a decodable image"):
        decode_image(b"\x00garbage" * 50)
    jpeg = encode(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8), "JPEG")
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(jpeg[: len(jpeg) // 2])
    png = encode(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8), "PNG")
    with pytest.raises(ImageDecodeError):
        decode_image(png[: len(png) // 2])


def test_decode_refuses_decompression_bombs(monkeypatch):
    data = encode(rgb(0, size=40), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 pixels: PIL itself only warns
    with pytest.raises(ImageDecodeError, match="decompression bomb"), warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        decode_image(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # above twice the limit: PIL raises
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(data)


def test_decode_rgb_formats_round_trip():
    pixels = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for fmt, kwargs in (("PNG", {}), ("WEBP", {"lossless": True})):
        decoded = decode_image(encode(pixels, fmt, **kwargs))
        assert decoded.dtype == np.uint8 and decoded.flags.writeable
        np.testing.assert_array_equal(decoded, pixels)
    assert decode_image(encode(pixels, "JPEG")).shape == (20, 30, 3)


def test_decode_grayscale_and_bilevel():
    gray = np.array([[0, 100, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(encode(gray, "PNG")), np.repeat(gray[..., None], 3, axis=2))
    la = Image.fromarray(np.dstack([gray, np.zeros_like(gray)]), mode="LA")
    np.testing.assert_array_equal(decode_image(encode(la, "PNG"))[0, :, 0], [0, 100, 255])
    bilevel = Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1")
    np.testing.assert_array_equal(decode_image(encode(bilevel, "PNG")), [[[0, 0, 0], [255, 255, 255]]])


def test_decode_drops_alpha_keeping_colour():
    rgba = np.array([[[200, 10, 20, 0], [1, 2, 3, 255]]], dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(encode(rgba, "PNG")), rgba[..., :3])


def test_decode_palette_images():
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putdata([0, 1])
    np.testing.assert_array_equal(decode_image(encode(palette, "PNG")), [[[255, 0, 0], [0, 0, 255]]])
    with warnings.catch_warnings():  # per-entry alpha: PIL warns on a direct RGB conversion
        warnings.simplefilter("error")
        np.testing.assert_array_equal(decode_image(encode(palette, "PNG", transparency=bytes([128, 255]))),
                                      [[[255, 0, 0], [0, 0, 255]]])


def test_decode_cmyk():
    cmyk = Image.frombytes("CMYK", (3, 1), bytes([0, 0, 0, 0, 0, 255, 255, 0, 0, 0, 0, 255]))
    expected = [[[255, 255, 255], [255, 0, 0], [0, 0, 0]]]  # white, red, black
    np.testing.assert_array_equal(decode_image(encode(cmyk, "TIFF")), expected)
    np.testing.assert_allclose(decode_image(encode(cmyk.resize((24, 8), Image.NEAREST), "JPEG", quality=100))[0, ::8],
                               expected[0], atol=8)


@pytest.mark.parametrize("dtype, fmt", [("<u2", "PNG"), (">u2", "TIFF"), ("<i4", "TIFF")])
def test_decode_sixteen_bit_scales_instead_of_clipping(dtype, fmt):
    values = np.array([[0, 257, 32768, 65535]], dtype=dtype)
    img = Image.fromarray(values)
    assert img.mode in ("I;16", "I;16B", "I")
    decoded = decode_image(encode(img, fmt))
    np.testing.assert_array_equal(decoded[..., 0], [[0, 1, 128, 255]])
    assert decoded.dtype == np.uint8 and (decoded == decoded[..., :1]).all()
