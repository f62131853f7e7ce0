"""Starts `vllm serve` in a subprocess, waits until it answers, and stops it again.

Used by `adaspkv demo`, the benchmarks and the engine tests, so that all of them run the server the
way a user does: the `vllm` command of this environment, its own process group, a health check.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import requests
from pydantic import Field

from vllm_adaspkv.errors import AdaspkvError
from vllm_adaspkv.format import StrictModel
from vllm_adaspkv.format.strict import AsTuple, LaxPath, PathText


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def vllm_command() -> Path:
    """The `vllm` console script installed beside this Python."""
    path = Path(sys.executable).with_name("vllm")
    if not path.exists():
        raise FileNotFoundError(
            f"no `vllm` command next to {sys.executable}; run scripts/setup_venv.sh "
            "(or `make test`) to install vLLM into .venv"
        )
    return path


class ServerConfig(StrictModel):
    model: PathText
    log_file: LaxPath
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, lt=65536)] = 0  # 0: pick a free port
    served_model_name: str | None = None
    extra_args: Annotated[tuple[str, ...], AsTuple] = ()
    env: dict[str, str] = {}
    startup_timeout_s: Annotated[float, Field(gt=0)] = 600.0


def _terminate_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies, so that even a killed demo (SIGKILL,
    where no clean-up runs) leaves no server behind. Linux's PR_SET_PDEATHSIG, which fires when the
    *thread* that started the server ends: start servers from a thread that outlives them (the main one)."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class ServerStartError(AdaspkvError):
    """`vllm serve` did not come up; the message ends with its log's last lines."""


class VllmServer:
    """Context manager: `with VllmServer(config) as server: server.base_url`."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.port = config.port or free_port(config.host)
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [str(vllm_command()), "serve", self.config.model,
               "--host", self.config.host, "--port", str(self.port)]
        if self.config.served_model_name:
            cmd += ["--served-model-name", self.config.served_model_name]
        return cmd + list(self.config.extra_args)

    def start(self) -> VllmServer:
        self.config.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.config.log_file, "wb")  # noqa: SIM115 - owned by the child process
        env = {**os.environ, **self.config.env}
        # A process group of its own: stop() ends the API server and the engine it spawned.
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            preexec_fn=_terminate_with_parent if sys.platform == "linux" else None,
        )
        log.close()
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(
                    f"`vllm serve` exited with code {self.process.returncode} before it was "
                    f"ready; last lines of {self.config.log_file}:\n{self.log_tail()}"
                )
            try:
                if requests.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1.0)
        raise ServerStartError(
            f"`vllm serve` did not answer {self.base_url}/health within "
            f"{self.config.startup_timeout_s:.0f} s; last lines of {self.config.log_file}:\n"
            f"{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.config.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
