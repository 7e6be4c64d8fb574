"""The driver at ImageNet scale (1.28M samples in 1024 shards, a manifest alone): nothing per sample in Python.

Each driver step runs under tracemalloc: a Python object per sample (a key string, a list entry)
would cost tens of MB at this size; the steps stay far below that. Timings are in
benchmarks/bench_driver.py, not here.
"""
import importlib.util
import os
import tracemalloc

import pytest
import zarr

from jobs.cache_teachers import pending_work, prepare_store, teachers_with_work
from jobs.train_student import plan_run
from pipeline.cache.report import format_report, store_report
from pipeline.cache.store import CacheStore
from pipeline.data.shards import index_dataset
from pipeline.train.train_config import TrainConfig

_spec = importlib.util.spec_from_file_location(
    "bench_driver", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_driver.py"))
bench_driver = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_driver)

LIMIT = 16 * 2**20  # bytes of Python allocations per step; 1.28M per-sample objects would need far more


def _peak(step):
    tracemalloc.start()
    try:
        result = step()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    manifest = bench_driver.write_manifest(str(root / "shards"))
    return manifest, str(root / "cache.zarr"), root


def test_driver_steps_hold_nothing_per_sample(imagenet):
    manifest, store, root = imagenet
    dataset, peak = _peak(lambda: index_dataset(manifest))
    assert dataset.num_samples == 1_281_167 and len(dataset.shards) == 1024 and peak < LIMIT
    job = bench_driver._job(manifest, store)
    _, peak = _peak(lambda: prepare_store(job, dataset))
    assert peak < LIMIT
    work, peak = _peak(lambda: (teachers_with_work(job), pending_work(job, CacheStore.open(store))))
    assert len(work[0]) == 2 and len(work[1]) == 1024 and peak < LIMIT
    lines, peak = _peak(lambda: format_report(store_report(store)))
    assert "1281167 samples in 1024 shards" in "\n".join(lines) and peak < LIMIT

    bench_driver.mark_complete(store)
    assert zarr.open_group(store)["samples/valid"].shape == (1024 * 1252,)
    config = TrainConfig(shards=[manifest], store=store, out=str(root / "run"), model="regla_t")
    plan, peak = _peak(lambda: plan_run(config))
    assert plan["num_classes"] == 1000 and set(plan["teachers"]) == {"vit", "resnet"} and peak < LIMIT
