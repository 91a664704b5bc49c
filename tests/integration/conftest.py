"""Fixtures for integration tests: real servers, owned and stopped by the test that starts them.

``nats_server``: one real ``nats-server`` with JetStream per test module, on a free port of
127.0.0.1 with its store in a temporary folder. Teardown stops it by pid and checks that the
process is gone and the folder removed. The stream FERRY_KV persists across the tests of a
module: use distinct worker ids per test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.nats_server import NatsServer


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def child_nats_pids() -> set[int]:
    """Pids of the nats-server processes this test process started and still has."""
    found = set()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            comm, rest = (entry / "stat").read_text().rsplit(")", 1)
        except OSError:
            continue
        if comm.endswith("(nats-server") and int(rest.split()[1]) == os.getpid():
            found.add(int(entry.name))
    return found


@pytest.fixture(scope="module")
def nats_server():
    server = NatsServer().start()
    pid, folder = server.pid, server.store_dir.parent
    try:
        yield server
    finally:
        server.stop()
    assert not pid_alive(pid), f"nats-server pid {pid} still running after stop()"
    assert not folder.exists(), f"{folder} left behind"
