"""Places worker actors on the Ray cluster and stops them.

Placement: on a cluster with GPUs each worker holds one GPU through Ray's resources (so Ray
spreads prefill and decode workers over separate GPUs); without GPUs each worker asks for an
equal share of the machine's CPUs (so N workers fit on one small machine). Every actor gets
the name ``ferry-worker-<id>`` in the ``ferry`` namespace so a restarted control plane can find
it, and ``max_restarts=0``: the control plane, not Ray, decides what replaces a dead worker.

Stopping: each worker's ``stop`` (it unlinks its shared-memory KV arena), then ``ray.kill``.
A worker that died without stopping (SIGKILL, OOM) leaves its arena in /dev/shm; after
stopping all workers, :meth:`ControlPlane.stop_all` removes the arenas on this machine whose
creator process is gone (workers on other machines remove theirs when the next worker there
starts).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray

from orchestrator.worker_actor import WorkerActor, WorkerEndpoint, WorkerSpec

log = logging.getLogger(__name__)


@dataclass
class RunningWorker:
    spec: WorkerSpec
    actor: object
    endpoint: WorkerEndpoint


def worker_resources(num_workers: int) -> dict:
    resources = ray.available_resources()
    if resources.get("GPU", 0) >= 1:
        return {"num_gpus": 1, "num_cpus": 1}
    cpus = ray.cluster_resources().get("CPU", 1)
    return {"num_cpus": max(0.01, min(1.0, cpus / max(1, num_workers)))}


class ControlPlane:
    def __init__(self) -> None:
        self.workers: dict[str, RunningWorker] = {}
        self._remote = ray.remote(WorkerActor)

    def start_workers(self, specs: list[WorkerSpec], timeout_s: float = 600.0) -> list[WorkerEndpoint]:
        """Create one actor per spec, build their engines in parallel, and start their servers."""
        opts = worker_resources(len(specs))
        actors = []
        for spec in specs:
            actor = self._remote.options(name=f"ferry-worker-{spec.worker_id}", namespace="ferry",
                                         max_restarts=0, **opts).remote(spec)
            actors.append((spec, actor))
        try:
            endpoints = ray.get([a.start.remote() for _, a in actors], timeout=timeout_s)
        except Exception:
            for _, actor in actors:
                ray.kill(actor, no_restart=True)
            raise
        for (spec, actor), ep in zip(actors, endpoints, strict=True):
            self.workers[spec.worker_id] = RunningWorker(spec, actor, ep)
        return endpoints

    def alive(self, worker_id: str, timeout_s: float = 5.0) -> bool:
        try:
            ray.get(self.workers[worker_id].actor.ping.remote(), timeout=timeout_s)
            return True
        except Exception:  # noqa: BLE001 - any failure means not alive
            return False

    def stop_worker(self, worker_id: str, timeout_s: float = 5.0) -> None:
        running = self.workers.pop(worker_id)
        try:
            ray.get(running.actor.stop.remote(), timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - it is killed below anyway
            log.warning("worker %s did not stop cleanly: %s", worker_id, exc)
        ray.kill(running.actor, no_restart=True)

    def stop_all(self) -> None:
        for worker_id in list(self.workers):
            self.stop_worker(worker_id)
        from workers.server.kv_transport import remove_stale_arenas

        try:
            removed = remove_stale_arenas()
        except OSError as exc:  # best effort: the next worker start retries
            log.warning("removing the KV arenas of dead workers failed: %s", exc)
        else:
            if removed:
                log.info("removed the KV arenas of dead workers: %s", ", ".join(removed))
