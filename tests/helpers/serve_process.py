"""Runs ``ferry serve`` as a child process for end-to-end tests and stops it by pid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil


class ServeProcess:
    def __init__(self, *args: str, env: dict | None = None, startup_timeout: float = 240) -> None:
        cmd = [sys.executable, "-m", "orchestrator.cli", "serve", "--http-port", "0",
               "--grpc-port", "0", "--kserve-grpc-port", "0", "--print-json", *args]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=full_env,
                                     cwd=Path(__file__).resolve().parents[2])
        self.lines: list[str] = []
        self.ready: dict | None = None
        self._event = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._event.wait(startup_timeout) or self.ready is None:
            self.stop()
            raise RuntimeError("ferry serve did not start:\n" + "".join(self.lines[-40:]))
        self.descendants = {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("FERRY_READY "):
                self.ready = json.loads(line[len("FERRY_READY "):])
                self._event.set()
        self._event.set()

    @property
    def http(self) -> str:
        return self.ready["http"]

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def alive(pids) -> set[int]:
    out = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(pids, timeout: float = 30) -> set[int]:
    deadline = time.monotonic() + timeout
    while (left := alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left
