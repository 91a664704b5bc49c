"""Worker pickers: ``picker(RouteRequest) -> worker_id``, one of ``request.candidates``.

These pick without looking at the prompt; the KV-cache-aware router plugs in through the
same callable signature. ``candidates`` is never empty (the frontend answers "no worker"
itself) and is ordered by registration.
"""

from __future__ import annotations

import random

from orchestrator.frontend.types import RouteRequest, WorkerPicker


class RoundRobin:
    """Cycles through the candidates: request k goes to candidates[k % len(candidates)]."""

    def __init__(self) -> None:
        self._next = 0

    def __call__(self, request: RouteRequest) -> str:
        candidates = request.candidates
        choice = candidates[self._next % len(candidates)]
        self._next += 1
        return choice


class RandomPicker:
    """A uniformly random candidate; ``seed`` makes the sequence of choices reproducible."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def __call__(self, request: RouteRequest) -> str:
        return self._rng.choice(request.candidates)


PICKERS = {"round_robin": RoundRobin, "random": RandomPicker}


def make_picker(name: str) -> WorkerPicker:
    try:
        return PICKERS[name]()
    except KeyError:
        raise ValueError(
            f"unknown worker picker {name!r}; choose one of {sorted(PICKERS)}") from None


__all__ = ["PICKERS", "RandomPicker", "RoundRobin", "make_picker"]
