"""Connecting to Ray: an embedded local instance by default, a running cluster with an address."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Use the current Ray connection if there is one, else start (and later stop) one.

    With no address an embedded Ray starts on this machine, with its dashboard off
    (and bound to loopback if enabled). ``RAY_ADDRESS`` is ignored for the embedded
    case so that a stray environment variable never sends work to another cluster.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        os.environ.pop("RAY_ADDRESS", None)
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, dashboard_host="127.0.0.1",
                 log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()
