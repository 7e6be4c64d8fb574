"""Test session setup: offline, no telemetry, no GPU, deterministic."""
import os

# Set before anything imports timm or ray: pretrained lookups must never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train's controller takes one reported checkpoint per health check (every 2 s by default), and a report
# waits for the previous one to be taken: runs that checkpoint every few steps would mostly wait.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the whole test session (starting Ray costs seconds and ~0.7 GB)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture
def version_1_store():
    """Writes a store in format 1 (fp16 top-k logits + fp32 logsumexp) with plain zarr, as regla-distill
    wrote them before format 2: ``make(path, dataset, teacher_ids=("t",), views=2, topk=3, temperatures=(1.0,))``."""
    import numpy as np
    import zarr

    def make(path, dataset, teacher_ids=("t",), views=2, topk=3, temperatures=(1.0,)):
        rows, chunk, shards = dataset.num_rows, dataset.rows_per_shard, len(dataset.shards)
        root = zarr.open_group(str(path), mode="w-", zarr_format=3)
        samples = root.create_group("samples")
        samples.create_array("key", shape=(rows,), chunks=(chunk,), dtype=str, fill_value="")
        samples.create_array("label", shape=(rows,), chunks=(chunk,), dtype="int32", fill_value=-1)
        samples.create_array("valid", shape=(rows,), chunks=(chunk,), dtype="bool", fill_value=True)
        samples.create_array("done", shape=(shards,), chunks=(1,), dtype="bool", fill_value=True)
        root.create_group("views").create_array("box", shape=(rows, views, 4), chunks=(chunk, views, 4),
                                                dtype="float32", fill_value=0.0)
        root["views"].create_array("flip", shape=(rows, views), chunks=(chunk, views), dtype="bool", fill_value=False)
        policy = {"num_views": views, "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3], "flip_prob": 0.5,
                  "center_view": False, "center_crop_fraction": 0.875, "seed": 0}
        records = {}
        for tid in teacher_ids:
            group = root.create_group(f"teachers/{tid}")
            group.create_array("topk_logits", shape=(rows, views, topk), chunks=(chunk, views, topk),
                               dtype="float16", fill_value=0.0)[:] = np.float16(16.0)
            group.create_array("topk_index", shape=(rows, views, topk), chunks=(chunk, views, topk),
                               dtype="int16", fill_value=0)
            group.create_array("logsumexp", shape=(rows, views, len(temperatures)),
                               chunks=(chunk, views, len(temperatures)), dtype="float32", fill_value=16.0)
            group.create_array("done", shape=(shards,), chunks=(1,), dtype="bool", fill_value=True)
            records[tid] = {"spec": {"model_name": tid}, "num_classes": 1000, "feature_dim": 8}
        root.attrs.update({
            "format": "regla-distill-teacher-cache", "format_version": 1, "created": "2025-01-01T00:00:00+00:00",
            "library_versions": {}, "teachers": records,
            "config": {"views": policy, "topk": topk, "temperatures": list(temperatures), "feature_views": views},
            "dataset": {"fingerprint": dataset.fingerprint(), "rows_per_shard": chunk,
                        "num_samples": dataset.num_samples, "class_names": None,
                        "urls": [s.url for s in dataset.shards]},
        })
        return str(path)

    return make


@pytest.fixture(scope="session")
def ray_cluster():
    """A real two-node Ray cluster on loopback (head: 1 CPU, dashboard and Jobs API on 127.0.0.1;
    worker node: 1 CPU), stopped at the end by its own pids."""
    from services import start_ray_cluster

    cluster = start_ray_cluster([1, 1])
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 API server on 127.0.0.1 (a free port), stopped at the end."""
    from services import S3Server, free_port

    server = S3Server(free_port())
    server.start()
    yield server
    server.stop()
