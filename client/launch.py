"""Start the two servers as child processes on loopback and wait until they serve.

Used by `qwen2vl-flux demo` and by the tests, so both exercise the same entry
points a user runs. Needs the server extra installed (torch, transformers, diffusers).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc


def child_environment(overrides: dict | None) -> dict:
    """This process's environment with `overrides` applied; a value of None unsets that variable."""
    return {k: v for k, v in dict(os.environ, **(overrides or {})).items() if v is not None}


class ServerFailed(RuntimeError):
    """A server process exited or did not become SERVING in time."""


class ServerProcess:
    scratch_root: str | Path | None = None
    """Where each server's directory (port file, log) is made; None: the system's temp directory."""

    def __init__(self, role: str, checkpoints: str | Path, *extra_args: str, log_path: str | Path | None = None,
                 env: dict | None = None, host: str = "127.0.0.1", port: int | None = None,
                 inherit_output: bool = False, python: str | None = None):
        """`port` None picks a free one; `inherit_output` writes the server's logs to this
        process's terminal instead of `log_path`; `python` runs it with another interpreter
        (a virtual environment's); an `env` value of None unsets that variable."""
        if role not in ("encoder", "generator"):
            raise ValueError(f"role must be encoder or generator, got {role!r}")
        self.role, self.checkpoints, self.extra_args = role, str(checkpoints), list(extra_args)
        self._dir = tempfile.mkdtemp(prefix=f"qwen2vl-flux-{role}-", dir=self.scratch_root)
        self.port_file = Path(self._dir) / "port"
        self.log_path = Path(log_path) if log_path else Path(self._dir) / "server.log"
        self.env = env
        self.host, self.inherit_output = host, inherit_output
        self.python = python or sys.executable
        self.process: subprocess.Popen | None = None
        self.port: int | None = port
        self._bound = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def start(self) -> "ServerProcess":
        """Start the process; a restart keeps the port it had, so clients find it again."""
        self.port_file.unlink(missing_ok=True)
        self._bound = False
        args = [self.python, "-m", f"qwen2vl_flux.{self.role}_server", "--checkpoints", self.checkpoints,
                "--host", self.host, "--port", str(self.port or 0), "--port-file", str(self.port_file),
                *self.extra_args]
        env = child_environment(self.env)
        if self.inherit_output:
            self.process = subprocess.Popen(args, env=env)
            return self
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    def wait_serving(self, timeout: float = 180.0) -> "ServerProcess":
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if self.port_file.exists():
                self.port = int(self.port_file.read_text())
                self.port_file.unlink()
                self._bound = True
            if self._bound:
                with grpc.insecure_channel(self.address) as channel:
                    try:
                        status = health_pb2_grpc.HealthStub(channel).Check(
                            health_pb2.HealthCheckRequest(service=""), timeout=2).status
                    except grpc.RpcError:
                        status = None
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return self
            time.sleep(0.1)
        raise ServerFailed(f"{self.role} did not report SERVING within {timeout:.0f} s; {self._where_logs()}")

    def _check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise ServerFailed(f"{self.role} exited with code {code}; {self._where_logs()}")

    def _where_logs(self) -> str:
        if self.inherit_output:
            return "its log is above"
        return f"log: {self.log_path}\n{self.log_tail()}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def log_records(self) -> list[dict]:
        """The JSON log lines written so far (the servers' default --log-format), parsed."""
        return [json.loads(line) for line in self.log_path.read_text(errors="replace").splitlines()
                if line.startswith("{")]

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def remove_files(self) -> None:
        """Remove the directory of its port file (and log, unless `log_path` was given), once
        stopped: kept until then, and after a failure, so a failed start's log is there to read."""
        shutil.rmtree(self._dir, ignore_errors=True)


@contextlib.contextmanager
def serving_pair(checkpoints: str | Path, on_serving=None):
    """Encoder and generator on `checkpoints`, both SERVING inside the block, stopped after it.
    `on_serving(server)` is called as each one comes up."""
    servers = [ServerProcess(role, checkpoints) for role in ("encoder", "generator")]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_serving()
            if on_serving is not None:
                on_serving(server)
        yield servers
    finally:
        for server in servers:
            server.stop()
    for server in servers:   # not reached after a failure, whose message names the log
        server.remove_files()
