"""Connecting to Ray: an embedded local instance by default, a running cluster with an address."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Use the current Ray connection if there is one, else start (and later stop) one.

    With no address an embedded Ray starts on this machine, with its dashboard off
    (and bound to loopback if enabled) and Ray's own logs cut to errors: without a
    dashboard, Ray Train's state checks would warn every few seconds. ``address="local"``
    and dropping ``RAY_ADDRESS`` keep it embedded even when a ``ray start`` cluster runs
    on this machine: work never goes to another cluster unless an address is given.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        os.environ.pop("RAY_ADDRESS", None)
        # Ray Train's preemption watcher (one more process per run) has nothing to watch on one machine.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 dashboard_host="127.0.0.1", log_to_driver=True,
                 logging_config=ray.LoggingConfig(log_level="ERROR"))
    try:
        yield
    finally:
        ray.shutdown()
