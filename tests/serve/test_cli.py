"""`collab-decode serve` as users run it: flags, then a real process that serves and stops on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import httpx

from collab_decode.cli import build_parser
from collab_decode.serve.cli import resolve_defaults, served_model_name


def test_serve_flags_and_defaults():
    args = resolve_defaults(build_parser().parse_args(["serve"]))
    assert (args.pair, args.host, args.port, args.grpc_port) == ("demo", "127.0.0.1", 8000, 50051)
    assert args.default_policy == "entropy:0.009" and args.api_key is None and args.max_queue == 256
    assert served_model_name(args) == "demo"
    args = resolve_defaults(build_parser().parse_args(["serve", "--small", "/m/tiny", "--large", "/m/big"]))
    assert args.pair is None and served_model_name(args) == "tiny+big"
    args = resolve_defaults(build_parser().parse_args(["serve", "--model", "/m/one", "--max-queue", "4"]))
    assert args.default_policy == "small" and served_model_name(args) == "one" and args.max_queue == 4


def test_serve_process_answers_and_stops_on_sigterm():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLLAB_DECODE_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-m", "collab_decode.cli", "serve", "--port", "0", "--grpc-port", "0",
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    try:
        line = proc.stdout.readline()
        m = re.search(r"REST http://127\.0\.0\.1:(\d+)/v1, gRPC 127\.0\.0\.1:(\d+); API key required", line)
        assert m, line
        url = f"http://127.0.0.1:{m.group(1)}"
        assert httpx.get(f"{url}/health", timeout=30).json() == {"status": "ok"}
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401  # the key came from the environment
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer k"}, timeout=30).json()
        assert models["data"][0]["id"] == "demo" and models["data"][0]["default_policy"] == "entropy:0.009"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
