"""`collab-decode serve` as users run it: flags, then a real process that serves and stops on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import httpx
import pytest
import torch

from collab_decode.cli import build_parser, main
from collab_decode.serve.cli import API_KEY_ENV, resolve_defaults, served_model_name, serving_addresses
from collab_decode.serve.engine_core import STREAM_INTERVAL_S
from collab_decode.serve.limits import Limits
from collab_decode.serve.requests import ServedModel
from collab_decode.serve.server import ServeConfig
from tests.backends.test_remote_cli import REMOTE_FLAGS_CHECKED
from tests.utils import make_pair


def test_serve_flags_and_defaults():
    args = resolve_defaults(build_parser().parse_args(["serve"]))
    assert (args.pair, args.host, args.port, args.grpc_port) == ("demo", "127.0.0.1", 8000, 50051)
    # the demo pair ships a neural router: it routes by default
    assert args.default_policy == "neural" and args.api_key is None and args.max_queue == 256
    assert served_model_name(args) == "demo"
    args = resolve_defaults(build_parser().parse_args(["serve", "--small", "/m/tiny", "--large", "/m/big"]))
    assert args.pair is None and served_model_name(args) == "tiny+big"
    assert args.default_policy == "entropy:0.009"  # no router for this pair
    args = resolve_defaults(build_parser().parse_args(["serve", "--small", "/m/tiny", "--large", "/m/big",
                                                       "--router", "mine=/r/mine"]))
    assert args.default_policy == "neural"
    args = resolve_defaults(build_parser().parse_args(["serve", "--model", "/m/one", "--max-queue", "4"]))
    assert args.default_policy == "small" and served_model_name(args) == "one" and args.max_queue == 4


class RecordingServer:
    """Stands in for the network servers only: keeps what `serve` built (engine, model, config), then returns
    as a server does after SIGTERM. The engine is real: `serve` hands over an EngineProcess, whose builder
    (run by the engine process in a real server) is called here."""

    built: list["RecordingServer"] = []

    def __init__(self, engine, model, config):
        from collab_decode.serve.engine_core import EngineProcess

        assert isinstance(engine, EngineProcess), "serve must put the engine in a process of its own"
        self.engine, self.model, self.config = engine.build(), model, config  # what that process would build
        self.process = engine
        self.port, self.grpc_port = config.port, config.grpc_port
        RecordingServer.built.append(self)

    async def run_until_signal(self, announce=None):
        announce(self)


@pytest.fixture
def serve(monkeypatch, capsys):
    """Run `collab-decode serve ARGS` in this process; returns (what it built, what it printed)."""
    monkeypatch.setattr("collab_decode.serve.server.Server", RecordingServer)

    def run(*args):
        assert main(["serve", *map(str, args)]) == 0
        return RecordingServer.built[-1], capsys.readouterr().out
    return run


def test_every_serve_flag_reaches_the_server_or_the_engine(serve, monkeypatch, tmp_path):
    from collab_decode.backends.hf import TransformersBackend
    from collab_decode.backends.native import NativeBackend
    from collab_decode.demo import checkpoint_dir

    from tests.test_cli import save_routers

    small, large = make_pair(tmp_path)
    routers = save_routers(tmp_path, 32, "a", "r2")
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    server, printed = serve(
        "--small", small, "--large", large, "--backend", "transformers", "--dtype", "bfloat16", "--device", "cpu",
        "--block-size", 8, "--small-kv-mib", 3, "--large-kv-mib", 5, "--default-policy", "entropy:0.5",
        "--step-delimiter", ";", "--max-num-seqs", 5, "--max-num-batched-tokens", 77, "--max-model-len", 100,
        "--host", "0.0.0.0", "--port", 1234, "--grpc-port", 4321, "--api-key", "k", "--max-queue", 7,
        "--served-model-name", "mine", "--router", f"r1={routers[0]}", "--router", str(routers[1]),
        "--log-level", "debug", "--threads", 2, "--drain-timeout", 7.5, "--max-body-bytes", 1000,
        "--max-prompt-chars", 900, "--max-prompt-tokens", 80, "--max-output-tokens", 70, "--max-stop", 3,
        "--max-stop-chars", 9, "--max-messages", 6, "--request-timeout", 30, "--header-timeout", 2.5,
        "--idle-timeout", 3.5, "--chunk-threads", 3, "--chunk-threads-max-batch", 2, "--large-wait-steps", 4,
        "--large-wait-min-batch", 3, "--stream-interval-ms", 7.5, "--no-enable-prefix-caching")
    assert torch.get_num_threads() == 2  # set by the engine's builder, before the models load
    torch.set_num_threads(1)  # what the test suite runs with
    limits = Limits(max_body_bytes=1000, max_prompt_chars=900, max_prompt_tokens=80, max_output_tokens=70, max_stop=3,
                    max_stop_chars=9, max_messages=6, request_timeout_s=30.0, header_timeout_s=2.5, idle_timeout_s=3.5)
    assert server.config == ServeConfig(host="0.0.0.0", port=1234, grpc_port=4321, api_key="k", max_queue=7,
                                        log_level="debug", drain_timeout_s=7.5, limits=limits)
    assert server.model == ServedModel(name="mine", small_dir=str(small), large_dir=str(large), routers=("r1", "r2"))
    assert server.process.stream_interval_s == 0.0075
    engine = server.engine
    assert set(engine.backends) == {"small", "large"}
    for backend in engine.backends.values():
        assert isinstance(backend, TransformersBackend) and backend.dtype == torch.bfloat16
        assert backend.device.type == "cpu"
    c = engine.config
    assert (c.block_size, c.small_kv_bytes, c.large_kv_bytes, c.default_policy, c.step_delimiter) == \
        (8, 3 << 20, 5 << 20, "entropy:0.5", ";")
    assert (c.scheduler.max_num_seqs, c.scheduler.max_num_batched_tokens, c.scheduler.max_model_len) == (5, 77, 100)
    assert (c.chunk_threads, c.chunk_threads_max_batch) == (3, 2)
    assert (c.large_wait_steps, c.large_wait_min_batch) == (4, 3)
    assert not c.enable_prefix_caching
    assert "serving 'mine' (default policy entropy:0.5): REST http://0.0.0.0:1234/v1, gRPC 0.0.0.0:4321; " \
           "API key required" in printed
    assert serving_addresses(printed) == ("http://0.0.0.0:1234", "0.0.0.0:4321")  # what bench and soak read
    # one model, compiled; the API key from the environment; every server default
    server, printed = serve("--model", small, "--compile")
    assert server.config == ServeConfig(api_key="from-env")
    assert server.process.stream_interval_s == STREAM_INTERVAL_S
    assert server.model == ServedModel(name="small", small_dir=str(small), large_dir=None)
    backend = server.engine.backends["small"]
    assert isinstance(backend, NativeBackend) and backend._compiled is not None and len(server.engine.backends) == 1
    assert server.engine.config.default_policy == "small"
    assert server.engine.config.chunk_threads == len(os.sched_getaffinity(0))  # serve's default: every core
    assert server.engine.config.enable_prefix_caching and server.engine.kv["small"].prefix_caching
    # no model named: the demo pair, under its default policy
    monkeypatch.delenv(API_KEY_ENV)
    for args in ((), ("--pair", "demo")):
        server, printed = serve(*args)
        assert server.model == ServedModel(name="demo", small_dir=str(checkpoint_dir("small")),
                                           large_dir=str(checkpoint_dir("large")))
        assert server.config == ServeConfig() and server.engine.config.default_policy == "neural"
        assert "; API key required" not in printed


SERVE_FLAGS_CHECKED = {
    "--model", "--pair", "--small", "--large", "--backend", "--dtype", "--device", "--compile", "--block-size",
    "--small-kv-mib", "--large-kv-mib", "--default-policy", "--step-delimiter", "--max-num-seqs",
    "--max-num-batched-tokens", "--max-model-len", "--host", "--port", "--grpc-port", "--api-key", "--max-queue",
    "--served-model-name", "--router", "--log-level", "--threads", "--help", "--drain-timeout", "--max-body-bytes",
    "--max-prompt-chars", "--max-prompt-tokens", "--max-output-tokens", "--max-stop", "--max-stop-chars",
    "--max-messages", "--request-timeout", "--header-timeout", "--idle-timeout", "--chunk-threads",
    "--chunk-threads-max-batch", "--large-wait-steps", "--large-wait-min-batch", "--stream-interval-ms",
    "--enable-prefix-caching", "--no-enable-prefix-caching",
}


def test_bad_serve_numbers_exit_2_before_any_model_loads(capsys):
    for flag, value in (("--stream-interval-ms", "-1"), ("--threads", "0")):
        assert main(["serve", flag, value]) == 2
        assert f"{flag} must be >= " in capsys.readouterr().err


def test_every_serve_flag_is_checked_here():
    """A new flag of `serve` fails this until the test above checks where it goes and it joins the list."""
    parser = build_parser()._subparsers._group_actions[0].choices["serve"]
    flags = {s for a in parser._actions for s in a.option_strings if s.startswith("--")}
    assert flags == SERVE_FLAGS_CHECKED | REMOTE_FLAGS_CHECKED  # the --large-* flags: tests/backends/test_remote_cli.py


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
        assert models["data"][0]["id"] == "demo" and models["data"][0]["default_policy"] == "neural"
        # a request that names no routing gets the shipped router: the README's question, right, mostly small
        question = ("Ann has 352 marbles. (a) She finds 179 more. (b) Then she gives away 86. How many marbles "
                    "does Ann have now?")
        answer = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": "Bearer k"}, timeout=60, json={
            "model": "demo", "max_tokens": 256, "temperature": 0,
            "messages": [{"role": "user", "content": question}]}).json()
        assert answer["choices"][0]["message"]["content"].endswith("So the answer is 445.")
        assert 0 < answer["usage"]["large_tokens"] < 0.1 * answer["usage"]["completion_tokens"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
