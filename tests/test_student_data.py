"""The student data stream on real MNIST shards and a real Zarr store cached by real (random-init) teachers."""
import io
import shutil
import tarfile
from dataclasses import fields, replace

import numpy as np
import pytest
import timm
import torch
import zarr

from pipeline.cache.compat import StoreError
from pipeline.cache.shard_cacher import ShardCacher
from pipeline.cache.store import CacheConfig, CacheStore
from pipeline.data.make_shards import make_mnist_sample
from pipeline.data.shards import DatasetError, DatasetIndex, decode_image, index_dataset, iter_shard
from pipeline.data.views import ViewPolicy, normalize, policy_view, render_view, sample_views
from pipeline.train.batches import CachedTeacherBatch, StudentBatch
from pipeline.train.student_data import StreamConfig, StudentInput, StudentStream
from teachers import load_teacher, parse_teacher_spec

V, FEATURE_VIEWS, TOPK = 4, 2, 5
TEACHERS = ("test_resnet,img_size=32,batch_size=64", "test_vit,img_size=32,batch_size=64,features=false")
RESNET, VIT = "test_resnet", "test_vit"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """300 MNIST digits (20 px) in 8 shards (7 x 40 + 20), cached by two teachers with 4 views each."""
    root = tmp_path_factory.mktemp("student_data")
    _, val = make_mnist_sample(str(root / "shards"), img_size=20, samples_per_shard=40, val_fraction=0.06,
                               progress=False)
    dataset = index_dataset(val)
    assert [s.num_samples for s in dataset.shards] == [40] * 7 + [20]
    config = CacheConfig(views=ViewPolicy(num_views=V, seed=3), topk=TOPK, temperatures=(1.0, 2.0),
                         feature_views=FEATURE_VIEWS)
    path = str(root / "cache.zarr")
    store = CacheStore.create(path, dataset, config)
    teachers = {}
    for text in TEACHERS:
        spec = parse_teacher_spec(text)
        teacher = load_teacher(spec, "cpu", random_init=True, seed=3)
        store.add_teacher(spec.teacher_id, teacher.record(), teacher.num_classes, teacher.feature_dim,
                          spec.features)
        teachers[spec.teacher_id] = teacher
    cacher = ShardCacher(store, teachers)
    for shard, info in enumerate(dataset.shards):
        cacher.process(shard, info.url, list(teachers), info.keys_sha256)
    images = {raw.key: decode_image(raw.image_bytes) for info in dataset.shards for raw in iter_shard(info.url)}
    return {"dataset": dataset, "store": path, "teachers": teachers, "root": root, "images": images,
            "group": zarr.open_group(path, mode="r")}


def _student(size=(24, 24), interpolation="bilinear", crop_pct=0.875):
    return StudentInput(size=size, interpolation=interpolation, mean=(0.5,) * 3, std=(0.25,) * 3,
                        crop_pct=crop_pct)


def _epoch(stream, epoch, start_step=0):
    return list(stream.iter_epoch(epoch, start_step))


def _image(data, key):
    return torch.from_numpy(np.ascontiguousarray(data["images"][key].transpose(2, 0, 1)))


def _assert_same(a, b):
    """Equal batches, field by field (tensors exactly, dicts key by key)."""
    if isinstance(a, (StudentBatch, CachedTeacherBatch)):
        assert type(a) is type(b)
        for f in fields(a):
            _assert_same(getattr(a, f.name), getattr(b, f.name))
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif a is None:
        assert b is None
    else:
        assert a.dtype == b.dtype and torch.equal(a, b)


def _copy_store(data, tmp_path):
    path = str(tmp_path / "copy.zarr")
    shutil.copytree(data["store"], path)
    return path, zarr.open_group(path, mode="r+")


def test_student_input_from_timm_model():
    model = timm.create_model("test_resnet")
    student = StudentInput.from_model(model)
    cfg = model.pretrained_cfg
    assert student.size == tuple(cfg["input_size"][1:]) and student.crop_pct == cfg["crop_pct"]
    assert student.interpolation == cfg["interpolation"] and student.mean == tuple(cfg["mean"])
    assert StudentInput.from_model(model, img_size=24).size == (24, 24)


def test_replayed_view_is_the_cached_view(data):
    teacher = data["teachers"][RESNET]
    pre = teacher.preprocessing
    at_teacher = StudentInput(size=pre.input_size, interpolation=pre.interpolation, mean=pre.mean, std=pre.std)
    config = StreamConfig(batch_size=24, seed=5, teacher_ids=(RESNET,))
    batches = _epoch(StudentStream(data["dataset"], data["store"], at_teacher, config), 0)[:3]
    # The teacher, re-run on the replayed views, gives the cached top-k logits: the same crops.
    for batch in batches:
        logits, _ = teacher(normalize(batch.images, pre.mean, pre.std))
        values, index = logits.log_softmax(-1).topk(TOPK, dim=-1)
        cached = batch.teachers[RESNET]
        assert torch.equal(index, cached.topk_index)
        torch.testing.assert_close(values, cached.topk_logprob, rtol=2e-3, atol=2e-3)

    # Any other student resolution replays the same boxes; extra sizes come back as the teacher's crops.
    extra = (*pre.input_size, pre.interpolation)
    config = replace(config, extra_sizes=(extra, (24, 20, "bicubic")))
    other = _epoch(StudentStream(data["dataset"], data["store"], _student((24, 20), "bicubic"), config), 0)[:3]
    keys, boxes, flips = (data["group"][name][:] for name in ("samples/key", "views/box", "views/flip"))
    for batch, first in zip(other, batches):
        assert batch.images.shape[1:] == (3, 24, 20) and batch.images.dtype == torch.uint8
        assert torch.equal(batch.extra_images[extra], first.images)
        assert torch.equal(batch.extra_images[24, 20, "bicubic"], batch.images)
        for i in range(len(batch)):
            row, view = int(batch.rows[i]), int(batch.views[i])
            want = render_view(_image(data, keys[row]), boxes[row, view], bool(flips[row, view]), (24, 20), "bicubic")
            assert torch.equal(batch.images[i], want)


def test_joined_targets_belong_to_their_row_and_view(data):
    group = data["group"]
    arrays = {(tid, name): group[f"teachers/{tid}/{name}"][:] for tid in (RESNET, VIT)
              for name in ("topk_logprob", "topk_index", "log_leftover")}
    features, labels = group[f"teachers/{RESNET}/features"][:], group["samples/label"][:]
    config = StreamConfig(batch_size=32, seed=1, crops_per_image=2, teacher_ids=(RESNET, VIT))
    stream = StudentStream(data["dataset"], data["store"], _student(), config)
    assert stream.temperatures == (1.0, 2.0)
    info = stream.teacher_info()
    assert info[RESNET]["feature_dim"] == features.shape[-1] and info[RESNET]["feature_views"] == FEATURE_VIEWS
    assert info[VIT]["feature_dim"] is None and info[RESNET]["num_classes"] == 1000

    batches = _epoch(stream, 0)
    assert len(batches) == stream.steps_per_epoch() == 600 // 32
    for batch in batches:
        rows, views = batch.rows.numpy(), batch.views.numpy()
        assert np.array_equal(batch.labels.numpy(), labels[rows])
        for tid in (RESNET, VIT):
            got = batch.teachers[tid]
            assert np.array_equal(got.topk_logprob.numpy(), arrays[tid, "topk_logprob"][rows, views].astype(np.float32))
            assert np.array_equal(got.topk_index.numpy(), arrays[tid, "topk_index"][rows, views])
            assert np.array_equal(got.log_leftover.numpy(), arrays[tid, "log_leftover"][rows, views])
        resnet = batch.teachers[RESNET]
        mask = views < FEATURE_VIEWS
        assert np.array_equal(resnet.feature_mask.numpy(), mask)
        assert np.array_equal(resnet.features.numpy()[mask], features[rows[mask], views[mask]].astype(np.float32))
        assert not resnet.features.numpy()[~mask].any()
        assert batch.teachers[VIT].features is None and batch.teachers[VIT].feature_mask is None


def test_views_cover_all_before_repeating(data):
    def views_per_row(crops, epochs):
        stream = StudentStream(data["dataset"], data["store"], _student((16, 16)),
                               StreamConfig(batch_size=20, seed=2, crops_per_image=crops))
        seen = []
        for epoch in epochs:
            batches = _epoch(stream, epoch)
            rows = torch.cat([b.rows for b in batches]).numpy()
            views = torch.cat([b.views for b in batches]).numpy()
            assert len(rows) == crops * 300  # 300 samples, crops_per_image examples each
            per_row = {}
            for row, view in zip(rows, views):
                per_row.setdefault(int(row), []).append(int(view))
            seen.append(per_row)
        return seen

    one = views_per_row(1, range(V + 1))
    for row in one[0]:
        assert sorted(one[e][row][0] for e in range(V)) == list(range(V))
        assert one[V][row] == one[0][row]  # the permutation starts over after V epochs
    two = views_per_row(2, range(2))
    for row in two[0]:
        assert len(set(two[0][row])) == 2  # two different views in the same epoch
        assert sorted(two[0][row] + two[1][row]) == list(range(V))


def test_shard_order_and_rank_partition(data):
    dataset = data["dataset"]
    stream = StudentStream(dataset, data["store"], _student(), StreamConfig(batch_size=16))
    assert stream.epoch_shards(0) != stream.epoch_shards(1)
    assert sorted(stream.epoch_shards(0)) == list(range(8))
    for world in (2, 3):
        streams = [StudentStream(dataset, data["store"], _student((8, 8)), StreamConfig(batch_size=16),
                                 rank=r, world_size=world) for r in range(world)]
        steps = {s.steps_per_epoch() for s in streams}
        # Fewest examples any rank can get: the floor(8 / W) smallest shards.
        assert steps == {(20 + 40 * (8 // world - 1)) // 16}
        for epoch in (0, 1):
            parts = [s.epoch_shards(epoch) for s in streams]
            assert sorted(sum(parts, [])) == list(range(8))
            for stream, shards in zip(streams, parts):
                batches = _epoch(stream, epoch)
                assert len(batches) == stream.steps_per_epoch()
                shard_of_rows = set((torch.cat([b.rows for b in batches]) // 40).tolist())
                assert shard_of_rows <= set(shards)


def test_same_batches_with_spawned_workers_and_on_resume(data):
    # A small buffer and window, so that batches 9+ need few of the chunks that batches 0-8 used.
    config = StreamConfig(batch_size=28, seed=7, crops_per_image=2, teacher_ids=(RESNET, VIT),
                          extra_sizes=((12, 12, "bicubic"),), shuffle_buffer=40, shards_in_flight=2, chunk_size=8)
    in_process = StudentStream(data["dataset"], data["store"], _student((16, 16)), config)
    reference = _epoch(in_process, 1)
    with StudentStream(data["dataset"], data["store"], _student((16, 16)),
                       replace(config, loader_workers=2)) as spawned:
        for _ in range(2):  # the persistent workers serve a second pass the same way
            batches = _epoch(spawned, 1)
            assert len(batches) == len(reference) == 600 // 28
            for a, b in zip(batches, reference):
                _assert_same(a, b)
        assert torch.equal(_epoch(spawned, 2)[0].images, _epoch(in_process, 2)[0].images)

    # A resumed epoch is the tail of the uninterrupted one, and reads only the chunks it still needs.
    start = 9
    resumed_stream = StudentStream(data["dataset"], data["store"], _student((16, 16)), config)
    resumed = _epoch(resumed_stream, 1, start_step=start)
    assert len(resumed) == len(reference) - start
    for a, b in zip(resumed, reference[start:]):
        _assert_same(a, b)
    assert resumed_stream.stats.chunks_read < in_process.stats.chunks_read / 2  # in_process read 1.x epochs


@pytest.fixture(scope="module")
def broken(data):
    """The first three shards, the first with one truncated JPEG that only decoding finds: (dataset, row, key)."""
    src = data["dataset"].shards
    path = data["root"] / "broken" / src[0].name
    path.parent.mkdir()
    broken_key = None
    with tarfile.open(src[0].url) as tin, tarfile.open(path, "w") as tout:
        for info in tin.getmembers():
            payload = tin.extractfile(info).read()
            if broken_key is None and info.name.endswith(".jpg"):
                broken_key, payload = info.name[: -len(".jpg")], payload[: len(payload) // 3]
            info.size = len(payload)
            tout.addfile(info, io.BytesIO(payload))
    row = [raw.key for raw in iter_shard(str(path))].index(broken_key)  # shard 0: row = position
    return index_dataset([str(path), src[1].url, src[2].url]), row, broken_key


def test_labels_only_skips_undecodable_and_wraps_around(broken):
    dataset, broken_row, broken_key = broken
    config = StreamConfig(batch_size=20, seed=4)
    stream = StudentStream(dataset, None, _student((16, 16)), config)
    assert stream.steps_per_epoch() == 6  # from the index: 120 samples, one of which will not decode
    batches = _epoch(stream, 0)
    assert len(batches) == 6 and all(len(b) == 20 for b in batches)
    assert stream.stats.undecodable == 1 and stream.stats.undecodable_samples[0].startswith(broken_key)
    rows = torch.cat([b.rows for b in batches])
    assert broken_row not in rows.tolist() and len(set(rows.tolist())) == 119
    # 119 examples for 120 slots: the stream wrapped around, its last example is the epoch's first.
    assert stream.stats.wraps == 1 and rows[-1] == rows[0]
    # Fresh views every epoch, ids e * c + j, drawn like sample_views of the policy.
    assert set(batches[0].views.tolist()) == {0} and set(_epoch(stream, 3)[0].views.tolist()) == {3}
    policy = ViewPolicy(num_views=1, seed=4)
    boxes, flips = sample_views(replace(policy, num_views=4), "mnist/000001", 20, 18)
    box, flip = policy_view(policy, "mnist/000001", 3, 20, 18)
    assert np.array_equal(box, boxes[3]) and flip == flips[3]
    # Resuming counts the shards it skips (decoding them) and gives the same tail.
    resumed_stream = StudentStream(dataset, None, _student((16, 16)), config)
    for a, b in zip(_epoch(resumed_stream, 0, start_step=4), batches[4:], strict=True):
        _assert_same(a, b)


def test_refuses_a_store_of_another_dataset(data):
    subset = DatasetIndex(shards=data["dataset"].shards[:3], class_names=data["dataset"].class_names)
    with pytest.raises(StoreError, match=r"another dataset: shard names differ \(store has 8 shards, dataset has 3"):
        StudentStream(subset, data["store"], _student(), StreamConfig(batch_size=8))


def test_refuses_a_version_1_store(data, tmp_path, version_1_store):
    """A format-1 store of the very same shards is refused, not read with format-2 arithmetic."""
    path = version_1_store(tmp_path / "v1.zarr", data["dataset"], teacher_ids=(RESNET,))
    with pytest.raises(StoreError, match=r"is a format-1 teacher cache .*rebuild it in format 2"):
        StudentStream(data["dataset"], path, _student(), StreamConfig(batch_size=8, teacher_ids=(RESNET,)))


def test_key_mismatch_names_shard_position_and_keys(data, tmp_path):
    path, group = _copy_store(data, tmp_path)
    real = group["samples/key"][45]
    group["samples/key"][45] = "mnist/bogus"
    stream = StudentStream(data["dataset"], path, _student(), StreamConfig(batch_size=20))
    with pytest.raises(DatasetError, match=rf"shard val-000001.tar, position 5: the tar has sample '{real}', "
                                           r"the store has 'mnist/bogus'"):
        _epoch(stream, 0)


def test_incomplete_teacher_is_refused(data, tmp_path):
    path, group = _copy_store(data, tmp_path)
    group[f"teachers/{VIT}/done"][2] = False
    with pytest.raises(StoreError, match=r"teacher 'test_vit' is not complete .*1 shard\(s\) missing: val-000002.tar"):
        StudentStream(data["dataset"], path, _student(), StreamConfig(batch_size=8, teacher_ids=(VIT,)))
    with pytest.raises(StoreError, match="no teacher 'nope'"):
        StudentStream(data["dataset"], path, _student(), StreamConfig(batch_size=8, teacher_ids=("nope",)))
    StudentStream(data["dataset"], path, _student(), StreamConfig(batch_size=8, teacher_ids=(RESNET,)))


def test_out_of_range_label_names_the_key(data):
    stream = StudentStream(data["dataset"], data["store"], _student(), StreamConfig(batch_size=20, num_classes=5))
    with pytest.raises(DatasetError, match=r"shard val-\d+\.tar: sample 'mnist/\d{6}' has label [5-9], "
                                           r"expected \[0, 5\)"):
        _epoch(stream, 0)


def test_invalid_samples_in_the_store_are_skipped(data, tmp_path):
    path, group = _copy_store(data, tmp_path)
    dropped = [3, 130]
    for row in dropped:
        group["samples/valid"][row] = False
    stream = StudentStream(data["dataset"], path, _student((8, 8)), StreamConfig(batch_size=2))
    assert stream.steps_per_epoch() == 149  # 298 valid samples
    rows = torch.cat([b.rows for b in _epoch(stream, 0)]).tolist()
    assert len(rows) == 298 and not set(rows) & set(dropped)
    assert stream.stats.skipped_invalid == 2


def test_eval_mode_gives_every_sample_once_centre_cropped(data):
    student = _student((24, 24), crop_pct=0.875)
    stream = StudentStream(data["dataset"], None, student, StreamConfig(batch_size=32), eval_mode=True)
    batches = _epoch(stream, 0)
    assert [len(b) for b in batches] == [32] * 9 + [12] and stream.steps_per_epoch() == 10
    rows = torch.cat([b.rows for b in batches]).tolist()
    assert rows == sorted(rows) and len(set(rows)) == 300
    assert set(torch.cat([b.views for b in batches]).tolist()) == {-1}
    keys = data["group"]["samples/key"][:]
    side = int(round(20 * 0.875))  # digits are 20 x 20
    lo = (20 - side) // 2
    box = np.array([lo / 20, lo / 20, (lo + side) / 20, (lo + side) / 20], np.float32)
    for batch in batches[:2]:
        for i in range(len(batch)):
            want = render_view(_image(data, keys[int(batch.rows[i])]), box, False, (24, 24), "bilinear")
            assert torch.equal(batch.images[i], want)
    for a, b in zip(_epoch(stream, 1), batches, strict=True):
        _assert_same(a, b)
    halves = [torch.cat([b.rows for b in _epoch(StudentStream(data["dataset"], None, student,
                                                                StreamConfig(batch_size=32), rank=r, world_size=2,
                                                                eval_mode=True), 0)]).tolist() for r in range(2)]
    assert not set(halves[0]) & set(halves[1]) and sorted(halves[0] + halves[1]) == sorted(rows)
    with pytest.raises(ValueError, match="store_path=None"):
        StudentStream(data["dataset"], data["store"], student, StreamConfig(batch_size=32), eval_mode=True)


def _shards_per_batch(batches, rows_per_shard=40):
    return [len(set((b.rows // rows_per_shard).tolist())) for b in batches]


def test_batches_mix_many_shards_with_bounded_memory(data):
    mixed = StudentStream(data["dataset"], data["store"], _student((8, 8)),
                          StreamConfig(batch_size=20, seed=3, shards_in_flight=4, shuffle_buffer=30, chunk_size=8))
    batches = _epoch(mixed, 0)
    assert min(_shards_per_batch(batches)) >= 3 and np.mean(_shards_per_batch(batches)) >= 4
    rows = torch.cat([b.rows for b in batches]).tolist()
    assert len(rows) == len(set(rows)) == 300  # every sample once
    # Held examples: the buffer, plus the chunks being read (one per open shard) and those in flight.
    assert mixed._pool.peak <= 30 + 4 * 8 + 4 * 8
    # One shard at a time, no buffer: a batch spans one or two shards.
    serial = StudentStream(data["dataset"], data["store"], _student((8, 8)),
                           StreamConfig(batch_size=20, seed=3, shards_in_flight=1, shuffle_buffer=1))
    assert max(_shards_per_batch(_epoch(serial, 0))) <= 2
