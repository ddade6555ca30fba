"""Connect to a Ray cluster, or start an embedded local one when none is given."""

from __future__ import annotations

import os

from cellfm.config import RayConfig


def init_ray(cfg: RayConfig) -> None:
    """`ray.address` or RAY_ADDRESS (set by `ray job submit`) -> join that cluster; else start
    Ray in-process with `ray.num_cpus` logical CPUs (more than the cores on small machines, so
    Ray Data always has CPU left beside the training workers)."""
    import ray
    import ray.data

    if ray.is_initialized():
        return
    # Our own one-line progress logs replace Ray Data's per-operator bars, which flood job logs.
    ray.data.DataContext.get_current().enable_progress_bars = False
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=True)
