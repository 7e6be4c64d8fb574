"""The Zarr store: layout, shard-aligned chunks, one writer per shard, refusing to mix."""
import json
import multiprocessing as mp
import os

import numpy as np
import pytest
import zarr

from pipeline.cache.compat import StoreError
from pipeline.cache.shard_io import ShardSamples, TeacherOutputs
from pipeline.cache.store import CacheConfig, CacheStore
from pipeline.data.shards import DatasetIndex, ShardInfo
from pipeline.data.views import ViewPolicy

V, K, D = 3, 4, 8


def _dataset(counts=(5, 5, 2), salt=""):
    shards = tuple(ShardInfo(url=f"/data/s{i}.tar", name=f"s{i}.tar", num_samples=n, keys_sha256=f"h{i}{salt}")
                   for i, n in enumerate(counts))
    return DatasetIndex(shards=shards, class_names=("a", "b"))


def _config(**kw):
    return CacheConfig(views=ViewPolicy(num_views=kw.pop("views", V)), topk=K, temperatures=(1.0, 4.0), **kw)


def _samples(shard, rows):
    keys = np.array([f"s{shard}/{i}" for i in range(rows)], dtype=object)
    rng = np.random.default_rng(shard)
    return ShardSamples(keys=keys, labels=np.arange(rows, dtype=np.int32) % 2, valid=np.ones(rows, bool),
                        boxes=rng.random((rows, V, 4), dtype=np.float32), flips=rng.random((rows, V)) < 0.5)


def _outputs(shard, rows, dim=D):
    rng = np.random.default_rng(100 + shard)
    return TeacherOutputs(topk_logprob=-rng.random((rows, V, K)).astype(np.float16),
                          topk_index=rng.integers(0, 10, (rows, V, K)).astype(np.int16),
                          log_leftover=-rng.random((rows, V, 2)).astype(np.float32),
                          features=rng.standard_normal((rows, V, dim)).astype(np.float16))


def _write_shard(path, shard):
    store = CacheStore.open(path, mode="r+")
    rows = store.rows_per_shard
    store.write_samples(shard, _samples(shard, rows))
    store.write_teacher("t", shard, _outputs(shard, rows))


def _new_store(tmp_path, **kw):
    store = CacheStore.create(str(tmp_path / "cache.zarr"), _dataset(), _config(**kw))
    store.add_teacher("t", {"spec": {"model_name": "m"}, "weights_sha256": "abc"}, num_classes=10,
                      feature_dim=D, features=True)
    return store


def test_layout_is_shard_aligned_and_readable_with_plain_zarr(tmp_path):
    store = _new_store(tmp_path)
    assert store.rows_per_shard == 5 and store.num_shards == 3
    _write_shard(store.path, 1)

    root = zarr.open_group(store.path, mode="r")  # plain zarr, no project code
    assert root.attrs["format_version"] == 2
    assert root.attrs["dataset"]["fingerprint"]["counts"] == [5, 5, 2]
    assert root.attrs["config"]["topk"] == K and root.attrs["config"]["temperatures"] == [1.0, 4.0]
    expected = {"samples/key": (15,), "samples/label": (15,), "samples/valid": (15,), "samples/done": (3,),
                "views/box": (15, V, 4), "views/flip": (15, V), "teachers/t/topk_logprob": (15, V, K),
                "teachers/t/topk_index": (15, V, K), "teachers/t/log_leftover": (15, V, 2),
                "teachers/t/features": (15, V, D), "teachers/t/done": (3,)}
    for name, shape in expected.items():
        array = root[name]
        assert array.shape == shape, name
        assert array.chunks[0] == (1 if name.endswith("done") else 5), name
    assert root["teachers/t/topk_logprob"].dtype == np.float16
    assert root["teachers/t/topk_index"].dtype == np.int16
    assert root["teachers/t/features"].dtype == np.float16
    assert list(root["samples/key"][5:10]) == [f"s1/{i}" for i in range(5)]
    assert list(root["samples/done"][:]) == [False, True, False]
    assert list(root["teachers/t/done"][:]) == [False, True, False]
    # Writing shard 1 created exactly chunk 1 of each row-chunked array, nothing else.
    chunk_files = sorted(os.listdir(os.path.join(store.path, "teachers/t/topk_logprob/c")))
    assert chunk_files == ["1"]
    meta = json.load(open(os.path.join(store.path, "teachers/t/topk_logprob/zarr.json")))
    blosc = [c for c in meta["codecs"] if c["name"] == "blosc"][0]["configuration"]
    assert blosc["cname"] == "zstd"


def test_round_trip_and_padding_rows(tmp_path):
    store = _new_store(tmp_path)
    for shard in range(3):
        _write_shard(store.path, shard)
    outputs = store.read_teacher("t", 2)
    assert np.array_equal(outputs.topk_logprob, _outputs(2, 5).topk_logprob)
    samples = store.read_samples(0)
    assert np.array_equal(samples.boxes, _samples(0, 5).boxes)
    assert store.teacher_done("t").all() and store.samples_done().all()


def test_concurrent_writers_of_different_shards(tmp_path):
    store = _new_store(tmp_path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_shard, args=(store.path, shard)) for shard in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    for shard in range(3):
        got = store.read_teacher("t", shard)
        want = _outputs(shard, 5)
        assert np.array_equal(got.features, want.features)
        assert np.array_equal(store.read_samples(shard).flips, _samples(shard, 5).flips)


def test_refuses_another_dataset_or_other_settings(tmp_path):
    store = _new_store(tmp_path)
    CacheStore.open_or_create(store.path, _dataset(), _config())  # the same: fine
    with pytest.raises(StoreError, match="another dataset.*keys_sha256"):
        CacheStore.open_or_create(store.path, _dataset(salt="x"), _config())
    with pytest.raises(StoreError, match="another dataset.*counts"):
        CacheStore.open_or_create(store.path, _dataset(counts=(5, 4, 2)), _config())
    with pytest.raises(StoreError, match="other settings.*views"):
        CacheStore.open_or_create(store.path, _dataset(), _config(views=V + 1))
    with pytest.raises(StoreError, match="other settings.*feature_views"):
        CacheStore.open_or_create(store.path, _dataset(), _config(feature_views=1))


def test_teacher_identity_and_index_dtype(tmp_path):
    store = _new_store(tmp_path)
    record = {"spec": {"model_name": "m"}, "weights_sha256": "abc"}
    store.add_teacher("t", record, num_classes=10, feature_dim=D, features=True)  # same teacher: no-op
    with pytest.raises(StoreError, match="already has a teacher 't'.*weights_sha256"):
        store.add_teacher("t", {**record, "weights_sha256": "def"}, num_classes=10, feature_dim=D, features=True)
    store.add_teacher("big", {"spec": {"model_name": "b"}}, num_classes=40000, feature_dim=D, features=False)
    reopened = CacheStore.open(store.path)
    assert reopened.teacher_ids == ["big", "t"]
    assert reopened.teacher("big")["topk_index"].dtype == np.int32
    assert "features" not in reopened.teacher("big")
    with pytest.raises(StoreError, match="exceeds"):
        store.add_teacher("tiny", {}, num_classes=K - 1, feature_dim=D, features=False)


def test_missing_or_foreign_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="no teacher cache at"):
        CacheStore.open(str(tmp_path / "nowhere.zarr"))
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    with pytest.raises(StoreError, match="not a regla-distill teacher cache"):
        CacheStore.open(str(tmp_path / "other.zarr"))
    with pytest.raises(StoreError, match="not a regla-distill teacher cache"):
        CacheStore.open_or_create(str(tmp_path / "other.zarr"), _dataset(), _config())


def test_version_1_store_is_refused_with_how_to_rebuild_it(tmp_path, version_1_store):
    """A format-1 store (fp16 raw logits) is never read, whichever way it is opened; the store is left as it was."""
    path = version_1_store(tmp_path / "v1.zarr", _dataset(), teacher_ids=("vit", "resnet50"), views=V, topk=K,
                           temperatures=(1.0, 4.0))
    for open_store in (lambda: CacheStore.open(path), lambda: CacheStore.open(path, mode="r+"),
                       lambda: CacheStore.open_or_create(path, _dataset(), _config())):
        with pytest.raises(StoreError) as error:
            open_store()
        message = str(error.value)
        assert "\n" not in message and message.startswith(f"{path} is a format-1 teacher cache")
        assert (f"rebuild it in format 2: `pipeline cache-teachers --shards SHARDS --store NEW.zarr --views {V} "
                f"--topk {K} --temperatures 1,4 --feature-views {V} --seed 0 --teacher SPEC ...` with the same "
                "teachers (resnet50, vit)") in message
    root = zarr.open_group(path, mode="r")
    assert root.attrs["format_version"] == 1 and "topk_logits" in root["teachers/vit"]
    assert "topk_logprob" not in root["teachers/vit"]


def test_store_of_an_unknown_version_is_refused(tmp_path):
    store = _new_store(tmp_path)
    zarr.open_group(store.path, mode="r+").attrs["format_version"] = 3
    with pytest.raises(StoreError, match="has format version 3, this version of regla-distill reads version 2"):
        CacheStore.open(store.path)
