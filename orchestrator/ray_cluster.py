"""Joining or starting the Ray instance Ferry's control plane runs on.

``connect(address=None)`` starts a local, single-machine Ray (bound to 127.0.0.1, no
dashboard, a small object store, no usage stats) and reports that Ferry owns it, so
``disconnect`` stops it; with an address (``auto`` or ``HOST:PORT``) it joins that cluster and
leaves it running on exit.
"""

from __future__ import annotations

import logging
import os

LOCAL_ENV = {
    # keeps every socket of a single-machine Ray on 127.0.0.1 (never for a real cluster)
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
}


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to Ray; True when this call started a local instance that Ferry must stop.

    Ray reads LOCAL_ENV when it is first imported: callers starting a local Ray set it before
    anything imports ray (``ferry serve`` does); it is set here too for a first import."""
    if address is None:
        for key, value in LOCAL_ENV.items():
            os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        return False
    ray.init(address="local", include_dashboard=False, object_store_memory=100 * 2**20,
             num_cpus=num_cpus, logging_level=logging.WARNING, log_to_driver=True,
             configure_logging=True)
    return True


def disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
