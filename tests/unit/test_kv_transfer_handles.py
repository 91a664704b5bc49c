"""HandleRegistry: unique ids, TTL on a fake clock, exactly-once on_release (never under the
lock), leases that hold a handle pinned through release and TTL, thread safety."""

from __future__ import annotations

import threading

import pytest

from kvcache.transfer.errors import HandleNotFound
from kvcache.transfer.handles import HandleRegistry, KvHandleInfo


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(ttl=10.0):
    released: list[KvHandleInfo] = []
    clock = FakeClock()
    registry = HandleRegistry(ttl, released.append, clock=clock)
    return registry, released, clock


def create(registry, first=0, tokens=35):
    n = -(-tokens // 16)
    return registry.create(list(range(first, first + n)), list(range(900, 900 + tokens // 16)),
                           tokens, 16, "prefill-0", "127.0.0.1:5000")


def test_create_returns_a_frozen_validated_handle_with_a_unique_id():
    registry, _, _ = make()
    a, b = create(registry), create(registry, first=10)
    assert a.handle_id != b.handle_id
    assert a == KvHandleInfo(a.handle_id, "prefill-0", (0, 1, 2), (900, 901), 35, 16,
                             "127.0.0.1:5000")
    assert registry.get(a.handle_id) is a and len(registry) == 2
    other = HandleRegistry(1.0, lambda info: None)
    assert create(other).handle_id not in {a.handle_id, b.handle_id}
    with pytest.raises(AttributeError):
        a.num_tokens = 3


def test_handle_validation_names_the_field():
    registry, _, _ = make()
    with pytest.raises(ValueError, match="needs 3 block ids, got 2"):
        registry.create([0, 1], [1, 2], 35, 16, "w", "a:1")
    with pytest.raises(ValueError, match="needs 2 block hashes \\(full blocks only\\), got 3"):
        registry.create([0, 1, 2], [1, 2, 3], 35, 16, "w", "a:1")
    with pytest.raises(ValueError, match="block_ids must be distinct"):
        registry.create([0, 0, 2], [1, 2], 35, 16, "w", "a:1")
    with pytest.raises(ValueError, match="worker_id must be a non-empty string"):
        registry.create([0, 1, 2], [1, 2], 35, 16, "", "a:1")
    with pytest.raises(ValueError, match="num_tokens must be a positive integer"):
        registry.create([], [], 0, 16, "w", "a:1")
    with pytest.raises(ValueError, match="not a uint64 hash"):
        registry.create([0, 1, 2], [1, 2**64], 35, 16, "w", "a:1")
    assert len(registry) == 0


def test_release_calls_on_release_exactly_once():
    registry, released, _ = make()
    a = create(registry)
    assert registry.release(a.handle_id) is True
    assert released == [a]
    assert registry.release(a.handle_id) is False
    assert registry.release("never-created") is False
    assert released == [a] and len(registry) == 0


def test_get_names_why_a_handle_is_gone():
    registry, _, clock = make(ttl=10)
    a, b = create(registry), create(registry, first=5)
    registry.release(a.handle_id)
    with pytest.raises(HandleNotFound, match="was released; its blocks are no longer pinned"):
        registry.get(a.handle_id)
    with pytest.raises(HandleNotFound, match="'nope' is unknown on this worker") as info:
        registry.get("nope")
    assert info.value.code == "NOT_FOUND"
    clock.now += 10
    with pytest.raises(HandleNotFound, match=r"expired \(not released within its TTL of 10 s\)"):
        registry.get(b.handle_id)


def test_ttl_expiry_on_a_fake_clock():
    registry, released, clock = make(ttl=10)
    a = create(registry)
    clock.now += 5
    b = create(registry, first=5)
    assert registry.expires_at(b.handle_id) == 115.0
    clock.now = 109.999
    assert registry.expire() == [] and released == []
    clock.now = 110.0
    assert registry.expire() == [a] and released == [a]
    assert registry.get(b.handle_id) is b
    clock.now = 115.0
    assert registry.expire() == [b] and released == [a, b]
    assert registry.expire() == [] and registry.release(b.handle_id) is False
    assert released == [a, b]


def test_a_get_past_the_ttl_releases_the_handle_itself():
    registry, released, clock = make(ttl=1)
    a = create(registry)
    clock.now += 1
    with pytest.raises(HandleNotFound, match="expired"):
        registry.get(a.handle_id)
    assert released == [a]
    assert registry.expire() == [] and released == [a]


def test_release_all_at_shutdown():
    registry, released, _ = make()
    a, b = create(registry), create(registry, first=5)
    assert registry.release_all() == [a, b]
    assert released == [a, b] and len(registry) == 0
    with pytest.raises(HandleNotFound, match="released at worker shutdown"):
        registry.get(a.handle_id)


def test_a_lease_defers_on_release_until_it_closes():
    registry, released, _ = make(ttl=10)
    a = create(registry)
    lease = registry.lease(a.handle_id)
    assert lease.alive and lease.info is a
    assert registry.release(a.handle_id) is True
    assert not lease.alive and lease.ended_reason == "released"
    assert released == []  # the stream still reads the blocks
    with pytest.raises(HandleNotFound, match="was released"):
        registry.lease(a.handle_id)
    assert registry.release(a.handle_id) is False
    lease.close()
    assert released == [a]
    lease.close()  # closing twice is harmless
    assert released == [a]


def test_a_leased_handle_outlives_its_ttl_until_the_lease_closes():
    registry, released, clock = make(ttl=10)
    a = create(registry)
    with registry.lease(a.handle_id) as first, registry.lease(a.handle_id):
        clock.now += 50
        assert registry.expire() == [] and first.alive
        assert registry.get(a.handle_id) is a  # a lease holds it
    assert released == []
    assert registry.expire() == [a] and released == [a]


def test_on_release_runs_outside_the_lock():
    """on_release may call back into the registry (a non-reentrant lock would deadlock)."""
    seen = []
    registry = None

    def on_release(info):
        seen.append((info.handle_id, len(registry), registry.release(info.handle_id)))

    registry = HandleRegistry(5.0, on_release)
    a = create(registry)
    worker = threading.Thread(target=registry.release, args=(a.handle_id,))
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive()
    assert seen == [(a.handle_id, 0, False)]


def test_on_release_errors_are_logged_not_raised(caplog):
    def on_release(info):
        raise RuntimeError("engine queue closed")

    registry = HandleRegistry(5.0, on_release)
    a = create(registry)
    assert registry.release(a.handle_id) is True
    assert "on_release failed for KV handle" in caplog.text


def test_concurrent_release_expire_and_lease_release_each_handle_exactly_once():
    clock = FakeClock()
    counts: dict[str, int] = {}
    count_lock = threading.Lock()

    def on_release(info):
        with count_lock:
            counts[info.handle_id] = counts.get(info.handle_id, 0) + 1

    registry = HandleRegistry(1.0, on_release, clock=clock)
    handles = [create(registry, first=i * 3) for i in range(400)]
    clock.now += 2  # every handle is past its TTL: expire races release and lease
    barrier = threading.Barrier(6)

    def releaser(part):
        barrier.wait()
        for h in handles[part::2]:
            registry.release(h.handle_id)

    def expirer():
        barrier.wait()
        for _ in range(50):
            registry.expire()

    def leaser():
        barrier.wait()
        for h in handles:
            try:
                registry.lease(h.handle_id).close()
            except HandleNotFound:
                pass

    threads = [threading.Thread(target=releaser, args=(p,)) for p in (0, 1)]
    threads += [threading.Thread(target=expirer) for _ in range(2)]
    threads += [threading.Thread(target=leaser) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    registry.expire()
    assert counts == {h.handle_id: 1 for h in handles}
    assert len(registry) == 0


def test_bad_ttl_is_refused():
    with pytest.raises(ValueError, match="ttl_s must be a positive number"):
        HandleRegistry(0, lambda info: None)
