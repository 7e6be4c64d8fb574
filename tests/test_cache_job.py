"""The cache job end to end on an embedded Ray: real tar shards, real teachers, a real Zarr store."""
import io
import math
import os
import tarfile
import time

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from jobs.cache_teachers import CacheJob, ShardWorker, run_cache_job, teachers_with_work
from pipeline.cache.compat import StoreError
from pipeline.cache.store import CacheConfig, CacheStore
from pipeline.cache.topk import kl_divergence
from pipeline.cache.verify import verify_store
from pipeline.data.images import decode_sample
from pipeline.data.shards import DatasetError, ImageDecodeError, iter_shard
from pipeline.data.views import ViewPolicy, normalize, render_view
from pipeline.train.losses import TeacherTargets
from teachers import TeacherSpecError, load_teacher, parse_teacher_spec

TEACHERS = ["test_resnet,img_size=32,batch_size=8", "test_vit,img_size=32,batch_size=8,features=false"]
SHARD_SIZES = (5, 5, 3)


def _jpeg(rng, size=(24, 20)):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three shards (5, 5, 3 samples); shard 1 holds a corrupt image and a sample without cls."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for shard, count in enumerate(SHARD_SIZES):
        with tarfile.open(root / f"train-{shard:06d}.tar", "w") as tar:
            for i in range(count):
                key = f"img/s{shard}_{i}"
                image = _jpeg(rng)
                if (shard, i) == (1, 1):
                    image = image[: len(image) // 3]  # truncated JPEG
                _add(tar, f"{key}.jpg", image)
                if (shard, i) != (1, 3):
                    _add(tar, f"{key}.cls", str(i % 3).encode())
    return str(root)


def _job(shards, store, teachers=TEACHERS, views=3, **kw):
    config = CacheConfig(views=ViewPolicy(num_views=views, seed=1), topk=kw.pop("topk", 5),
                         temperatures=(1.0, 4.0), feature_views=2)
    return CacheJob(shards=shards, store=str(store), teachers=[parse_teacher_spec(t) for t in teachers],
                    config=config, random_init=True, **kw)


def _arrays(path):
    store = CacheStore.open(str(path))
    names = ["samples/key", "samples/label", "samples/valid", "views/box", "views/flip"]
    for tid in store.teacher_ids:
        names += [f"teachers/{tid}/{a}" for a in ("topk_logprob", "topk_index", "log_leftover", "features", "done")
                  if a in store.teacher(tid)]
    return {name: store.group[name][:] for name in names}


def _assert_identical(a, b, names=None):
    for name in names or a:
        assert np.array_equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory, ray_local):
    """An uninterrupted run with both teachers."""
    path = tmp_path_factory.mktemp("ref") / "cache.zarr"
    summary = run_cache_job(_job(shards, path), progress=False)
    return path, summary


def test_uninterrupted_run_fills_every_row(reference, shards):
    path, summary = reference
    assert summary.failed == {} and summary.shards_done == 3 and summary.shards_skipped == 0
    assert summary.samples == 13 and summary.invalid == 2 and summary.views == 3
    assert summary.bytes_on_disk > 0
    assert summary.bytes_per_view["test_resnet"] > 0 and summary.feature_bytes_per_view["test_resnet"] > 0
    assert summary.feature_bytes_per_view["test_vit"] == 0
    arrays = _arrays(path)
    keys = arrays["samples/key"].reshape(3, 5)
    assert list(keys[2]) == ["img/s2_0", "img/s2_1", "img/s2_2", "", ""]  # padding after a short shard
    valid = arrays["samples/valid"].reshape(3, 5)
    assert valid.sum() == 11 and not valid[1, 1] and not valid[1, 3] and not valid[2, 3:].any()
    assert list(arrays["samples/label"][:5]) == [0, 1, 2, 0, 1]
    assert arrays["samples/label"][8] == -1  # no cls
    logprob = arrays["teachers/test_resnet/topk_logprob"]
    valid_rows = arrays["samples/valid"]
    assert logprob.dtype == np.float16 and np.isfinite(logprob).all() and (logprob[valid_rows] < 0).all()
    # Top-k log-probabilities are sorted, and each view of a valid sample got its own outputs.
    assert (np.diff(logprob[valid_rows].astype(np.float32), axis=-1) <= 0).all()
    assert not np.array_equal(logprob[0, 0], logprob[0, 1])
    assert not logprob[~valid_rows].any()  # invalid rows stay empty
    # The leftover: a probability mass in (0, 1) at every temperature (1000 classes, top-5).
    leftover = np.exp(arrays["teachers/test_resnet/log_leftover"][valid_rows].astype(np.float64))
    assert leftover.shape[-1] == 2 and ((leftover > 0) & (leftover < 1)).all()
    top_mass = np.exp(logprob[valid_rows].astype(np.float64)).sum(-1)
    assert np.allclose(top_mass + leftover[..., 0], 1.0, atol=1e-3)  # at T = 1 they add up to 1
    assert arrays["teachers/test_resnet/features"].shape[1] == 2
    # The outputs are the teachers' live outputs on the stored views.
    report = verify_store(str(path), num_samples=8)
    assert report.ok and report.checked == 16, report.mismatches
    for tid in ("test_resnet", "test_vit"):
        check = report.teachers[tid]
        assert check.checked == 8 and check.max_kl < 1e-6 and check.max_leftover_rel_error < 1e-4
        assert check.max_logprob_error < 1e-2
    assert report.teachers["test_resnet"].min_feature_cosine > 0.999
    assert report.teachers["test_vit"].min_feature_cosine is None  # cached without features


def _manifest_copy(shards, root):
    """The shards copied under ``root`` with a manifest, so that a shard can be damaged after indexing."""
    import shutil

    from pipeline.data.shards import index_dataset, write_manifest

    shutil.copytree(shards, root)
    write_manifest(str(root / "train.json"), "train", index_dataset(str(root)).shards, None)
    return str(root / "train.json")


def test_resume_after_failed_shard_is_bit_identical(reference, shards, tmp_path):
    """Shard 1 is replaced on disk by one with other keys (the fault comes from outside the job): it fails
    after its retries, the others are cached; with the shard restored, the rerun caches only shard 1."""
    manifest = _manifest_copy(shards, tmp_path / "data")
    original = (tmp_path / "data" / "train-000001.tar").read_bytes()
    rng = np.random.default_rng(5)
    with tarfile.open(tmp_path / "data" / "train-000001.tar", "w") as tar:
        for i in range(5):
            _add(tar, f"other/{i}.jpg", _jpeg(rng))
    path = tmp_path / "cache.zarr"
    first = run_cache_job(_job(manifest, path, max_retries=1), progress=False)
    assert list(first.failed) == ["train-000001.tar"] and "differ" in first.failed["train-000001.tar"]
    assert list(first.retried) == ["train-000001.tar"] and first.shards_done == 2
    (tmp_path / "data" / "train-000001.tar").write_bytes(original)
    second = run_cache_job(_job(manifest, path), progress=False)
    assert second.failed == {} and second.shards_done == 1 and second.shards_skipped == 2
    _assert_identical(_arrays(path), _arrays(reference[0]))
    third = run_cache_job(_job(manifest, path), progress=False)
    assert third.shards_done == 0 and third.shards_skipped == 3


@pytest.mark.slow
def test_stuck_shard_is_timed_out_retried_and_reported(reference, shards, tmp_path):
    """Shard 2 is a named pipe that no one writes (a read that never returns): with --shard-timeout its worker
    is killed and replaced and the shard retried, then reported as failed; the other shards are cached and,
    with the real shard back, a rerun completes the store, equal to the reference."""
    manifest = _manifest_copy(shards, tmp_path / "data")
    tar = tmp_path / "data" / "train-000002.tar"
    original = tar.read_bytes()
    tar.unlink()
    os.mkfifo(tar)
    path = tmp_path / "cache.zarr"
    start = time.monotonic()
    first = run_cache_job(_job(manifest, path, max_retries=1, shard_timeout=3), progress=False)
    took = time.monotonic() - start
    assert first.shards_done == 2 and list(first.failed) == ["train-000002.tar"], first.lines()
    assert "timed out after 3 s" in first.failed["train-000002.tar"]
    assert took < 180, took  # two bounded tries (and a worker start), not a wait forever
    tar.unlink()
    tar.write_bytes(original)
    second = run_cache_job(_job(manifest, path), progress=False)
    assert second.failed == {} and second.shards_done == 1
    _assert_identical(_arrays(path), _arrays(reference[0]))


@pytest.mark.parametrize("decode_workers", [1, 3])
def test_store_is_the_same_whatever_the_number_of_decode_threads(reference, shards, tmp_path, decode_workers):
    path = tmp_path / "cache.zarr"
    summary = run_cache_job(_job(shards, path, decode_workers=decode_workers), progress=False)
    assert summary.failed == {} and summary.invalid == 2
    _assert_identical(_arrays(path), _arrays(reference[0]))


def test_adding_a_teacher_computes_only_that_teacher(reference, shards, tmp_path):
    path = tmp_path / "cache.zarr"
    run_cache_job(_job(shards, path, teachers=TEACHERS[:1]), progress=False)
    before = _arrays(path)
    summary = run_cache_job(_job(shards, path, teachers=TEACHERS), progress=False)
    assert summary.shards_done == 3
    after = _arrays(path)
    _assert_identical(before, after)  # the first teacher and the views are untouched
    _assert_identical(after, _arrays(reference[0]))  # and the new teacher matches a joint run


def test_workers_get_only_the_teachers_with_work_left(reference, shards, tmp_path):
    """A teacher complete on every shard is not loaded again on the workers."""
    extra = "test_convnext,img_size=32,batch_size=8"
    assert [s.teacher_id for s in teachers_with_work(_job(shards, reference[0], teachers=[*TEACHERS, extra]))] == [
        "test_convnext"]
    assert teachers_with_work(_job(shards, reference[0])) == []
    assert len(teachers_with_work(_job(shards, tmp_path / "new.zarr"))) == 2


def test_teacher_that_fails_to_load_on_a_worker_fails_its_shards_with_its_error(reference, shards, tmp_path):
    missing = parse_teacher_spec(f"test_resnet@{tmp_path}/gone.safetensors,img_size=32")
    worker = ShardWorker(str(reference[0]), [missing.to_dict()], random_init=False, seed=0, device="cpu",
                         threads=torch.get_num_threads(), decode_workers=1)
    assert worker.teachers == {}
    with pytest.raises(TeacherSpecError, match="'test_resnet' failed to load on this worker.*gone.safetensors"):
        worker.process(0, f"{shards}/train-000000.tar", "", ["test_resnet"])


def test_store_of_other_views_or_dataset_refuses_to_mix(reference, shards, tmp_path):
    path = reference[0]
    with pytest.raises(StoreError, match="other settings.*num_views"):
        run_cache_job(_job(shards, path, views=4), progress=False)
    with pytest.raises(StoreError, match="another dataset"):
        run_cache_job(_job(f"{shards}/train-{{000000..000001}}.tar", path), progress=False)


def test_changed_teacher_weights_are_refused(reference, shards, tmp_path):
    weights = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), weights)
    with pytest.raises(StoreError, match="already has a teacher 'test_resnet'"):
        run_cache_job(_job(shards, reference[0], teachers=[f"test_resnet@{weights},img_size=32,batch_size=8"]),
                      progress=False)


def test_bad_shards_fail_before_any_work(tmp_path, ray_local):
    with pytest.raises(DatasetError):
        run_cache_job(_job(str(tmp_path / "missing-{0..2}.tar"), tmp_path / "c.zarr"), progress=False)
    assert not (tmp_path / "c.zarr").exists()


def test_shard_whose_keys_differ_from_its_manifest_fails(shards, tmp_path, ray_local):
    """A shard rewritten after its manifest (same count, other keys) is refused, not cached misaligned."""
    import shutil

    from pipeline.data.shards import index_dataset, write_manifest

    data = tmp_path / "data"
    shutil.copytree(shards, data)
    write_manifest(str(data / "train.json"), "train", index_dataset(str(data)).shards, None)
    rng = np.random.default_rng(5)
    with tarfile.open(data / "train-000002.tar", "w") as tar:  # same 3 samples, renamed
        for i in range(3):
            _add(tar, f"other/{i}.jpg", _jpeg(rng))
            _add(tar, f"other/{i}.cls", b"0")
    summary = run_cache_job(_job(str(data / "train.json"), tmp_path / "c.zarr", max_retries=0), progress=False)
    assert list(summary.failed) == ["train-000002.tar"]
    assert "differ from its manifest" in summary.failed["train-000002.tar"]
    store = CacheStore.open(str(tmp_path / "c.zarr"))
    assert not store.teacher_done("test_resnet")[2] and not store.samples_done()[2]


def _confident_resnet(path, images: torch.Tensor) -> None:
    """Save a 1000-class test_resnet whose head is scaled so that on ``images`` its top logits reach 25-30:
    20 classes get rows scaled to a median top logit of 27.5, the other 980 to logits of spread ~2."""
    model = timm.create_model("test_resnet").eval()
    head = model.get_classifier()
    strong = torch.randperm(1000, generator=torch.Generator().manual_seed(1))[:20]
    weak = torch.ones(1000, dtype=torch.bool)
    weak[strong] = False
    with torch.no_grad():
        logits = model(images)
        scale = torch.full((1000,), 2.0 / float(logits[:, weak].std()))
        scale[strong] = 27.5 / float(logits[:, strong].amax(-1).median())
        head.weight.mul_(scale[:, None])
        head.bias.mul_(scale)
    save_file(model.state_dict(), str(path))


def _topk_target(logits: torch.Tensor, index: torch.Tensor, t: float) -> torch.Tensor:
    """float64 log-probabilities of the best a top-k cache can hold: the exact probabilities of the classes in
    ``index``, the exact mass of the others (summed in log space) spread uniformly over them."""
    log_p = torch.log_softmax(logits.double() / t, dim=-1)
    rest = torch.logsumexp(log_p.scatter(1, index, -math.inf), dim=-1, keepdim=True) - math.log(
        logits.shape[-1] - index.shape[-1])
    return rest.expand_as(log_p).clone().scatter_(1, index, log_p.gather(1, index))


def _leftover(log_probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(log_probs.double().scatter(1, index, -math.inf), dim=-1).exp()


def test_confident_teacher_is_rebuilt_exactly_from_the_store(shards, tmp_path, ray_local):
    """A checkpoint with top logits of 25-30 over 1000 classes, cached by the real job: the distribution the
    training loss rebuilds from the store equals the live softmax's top-k target on the same rendered views
    (KL < 1e-4 nats, leftover within 1%) at T = 1 and 4, where fp16 logits + logsumexp (format 1) lose it."""
    samples = [(shard, position, raw) for shard in range(3)
               for position, raw in enumerate(iter_shard(f"{shards}/train-{shard:06d}.tar"))]
    images = {}
    for shard, position, raw in samples:
        try:
            images[shard * 5 + position] = decode_sample(raw)
        except ImageDecodeError:
            pass
    cfg = timm.create_model("test_resnet").pretrained_cfg
    whole = [render_view(image, np.array([0, 0, 1, 1], np.float32), False, (32, 32)) for image in images.values()]
    weights = tmp_path / "confident.safetensors"
    _confident_resnet(weights, normalize(torch.stack(whole), cfg["mean"], cfg["std"]))
    spec = f"test_resnet@{weights},img_size=32,batch_size=8,features=false"
    summary = run_cache_job(_job(shards, tmp_path / "cache.zarr", teachers=[spec]), progress=False)
    assert summary.failed == {}

    store = CacheStore.open(str(tmp_path / "cache.zarr"))
    teacher = load_teacher(parse_teacher_spec(spec))
    pre = teacher.preprocessing
    rows = np.flatnonzero(store.cached_rows("test_resnet"))
    entries = [(row, view) for row in rows for view in range(store.config.views.num_views)]
    boxes, flips = store.group["views/box"], store.group["views/flip"]
    crops = [render_view(images[row], boxes[row, view], bool(flips[row, view]), pre.input_size, pre.interpolation)
             for row, view in entries]
    live, _ = teacher(normalize(torch.stack(crops), pre.mean, pre.std))
    top = live.topk(5, dim=-1)
    assert 25 <= top.values[:, 0].median() <= 30 and (top.values[:, 0] >= 20).all()

    outputs = {shard: store.read_teacher("test_resnet", shard) for shard in range(store.num_shards)}
    cached = [outputs[row // 5] for row, _ in entries]
    positions = [(row % 5, view) for row, view in entries]
    targets = TeacherTargets(
        topk_logprob=torch.tensor(np.stack([o.topk_logprob[p, v] for o, (p, v) in zip(cached, positions)])).float(),
        topk_index=torch.tensor(np.stack([o.topk_index[p, v] for o, (p, v) in zip(cached, positions)])).long(),
        log_leftover=torch.tensor(np.stack([o.log_leftover[p, v] for o, (p, v) in zip(cached, positions)])),
        temperatures=store.config.temperatures, num_classes=1000)
    assert torch.equal(targets.topk_index, top.indices)
    for t in store.config.temperatures:
        true, rebuilt = _topk_target(live, top.indices, t), targets.log_probs(t)
        true_leftover = _leftover(true, top.indices)
        assert kl_divergence(true, rebuilt).max() < 1e-4, t
        assert ((_leftover(rebuilt, top.indices) / true_leftover - 1).abs() < 0.01).all(), t

    # At T = 1 the teacher is confident: little mass outside the top-5, which format 1 (fp16 top-k logits,
    # exact logsumexp, leftover = 1 - sum(p)) loses on most views of the same logits.
    true_leftover = _leftover(_topk_target(live, top.indices, 1.0), top.indices)
    assert (true_leftover < 1e-2).all()
    lse = torch.logsumexp(live.double(), dim=-1, keepdim=True)
    format1_leftover = (1 - (top.values.half().double() - lse).exp().sum(-1)).clamp_min(0)
    assert ((format1_leftover / true_leftover - 1).abs() > 0.01).float().mean() > 0.5
