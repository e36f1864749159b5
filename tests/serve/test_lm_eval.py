"""lm-evaluation-harness itself (`local-completions`, batch size 8) against the real `collab-decode serve --pair
demo`: a generation task (exact match of the worked solution's answer) and a loglikelihood task (multiple
choice: echo + logprobs over token-id prompts, the large model scoring), both on held-out demo problems
written locally (tests/serve/lm_eval_harness.py). The demo large model answers ~99% of held-out problems (the
small one alone: none of these 40); on the multiple choice the large model is right on all of 100, the small
one on ~40%, chance ~30%: 0.9 holds only if the server scores with the large model. About a minute (plus
lm-eval's environment, built once): `make test-lmeval`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from collab_decode.demo import checkpoint_dir
from tests.backends.vllm_server import free_port
from tests.serve.lm_eval_harness import (GEN_TASK, MC_TASK, ensure_lm_eval_python, lm_eval_command, offline_env,
                                         read_results, write_tasks)

pytestmark = pytest.mark.lmeval

NUM_GEN, NUM_MC = 40, 100
MIN_GEN_ACCURACY, MIN_MC_ACCURACY = 0.9, 0.9
BATCH_SIZE = 8
START_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """`collab-decode serve --pair demo` in a process group of its own, on free loopback ports."""
    port, log = free_port(), tmp_path_factory.mktemp("serve") / "serve.log"
    cli = Path(sys.executable).parent / "collab-decode"
    cmd = [str(cli), "serve", "--pair", "demo", "--host", "127.0.0.1", "--port", str(port), "--grpc-port",
           str(free_port()), "--log-level", "warning"]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(process, url, log)
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)


def _wait_healthy(process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not healthy after {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")


def test_lm_eval_generation_and_loglikelihood_accuracy(demo_server, tmp_path):
    python = ensure_lm_eval_python()
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_tasks(tasks, NUM_GEN, NUM_MC)
    cmd = lm_eval_command(python, demo_server, checkpoint_dir("large"), tasks, tmp_path / "out", BATCH_SIZE)
    run = subprocess.run(cmd, env=offline_env(tmp_path), capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert run.returncode == 0, f"{' '.join(cmd)}\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    results = read_results(tmp_path / "out")
    gen, mc = results[GEN_TASK]["exact_match,answer"], results[MC_TASK]["acc,none"]
    print(f"\n{' '.join(cmd)}\n{run.stdout}\nlm-eval on the demo pair (batch size {BATCH_SIZE}): "
          f"{GEN_TASK} exact_match {gen:.3f} ({NUM_GEN} problems), {MC_TASK} acc {mc:.3f} ({NUM_MC} problems)")
    assert gen >= MIN_GEN_ACCURACY and mc >= MIN_MC_ACCURACY, (gen, mc)
    metrics = httpx.get(f"{demo_server}/metrics").text
    assert 'collab_decode_kv_blocks_used{pool="small"} 0.0' in metrics
    assert 'collab_decode_kv_blocks_used{pool="large"} 0.0' in metrics
