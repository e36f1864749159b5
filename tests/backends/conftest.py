"""What the remote backend's tests share: demo prompts, a local reference engine, a collab-decode server that
serves the demo large model alone (an endpoint, like `collab-decode serve --model LARGE_DIR`), an engine
whose large model is such an endpoint, and the comparison of remote with local greedy outputs."""

from __future__ import annotations

import contextlib

import pytest

from collab_decode.backends.remote import RemoteConfig
from collab_decode.demo import checkpoint_dir
from collab_decode.demo.task import problems
from collab_decode.demo.tokenizer import chat_prompt
from collab_decode.engine.config import MIB, EngineConfig
from collab_decode.engine.loading import build_engine
from collab_decode.sampling import SamplingParams
from collab_decode.serve.requests import ServedModel
from collab_decode.serve.server import ServeConfig
from tests.serve.conftest import running_server

ENDPOINT_MODEL = "demo-large"
GREEDY = SamplingParams(max_tokens=400, temperature=0.0)
NEAR_TIE = 1e-3  # a remote token may differ from the local one only where the local top-2 margin is below this


def engine_config(**overrides) -> EngineConfig:
    return EngineConfig(**{"small_kv_bytes": 16 * MIB, "large_kv_bytes": 16 * MIB, **overrides})


def demo_prompts(tokenizer, num: int, offset: int = 0) -> tuple[list, list[list[int]]]:
    """Held-out demo problems and their chat prompts as token ids (what `demo eval` runs)."""
    probs = problems("heldout", num, offset)
    return probs, [tokenizer(chat_prompt(p.question), add_special_tokens=False)["input_ids"] for p in probs]


def local_pair():
    return build_engine(checkpoint_dir("small"), checkpoint_dir("large"), config=engine_config())


def remote_pair(url: str, **remote):
    """The demo small model here, the large one behind `url` (the demo large directory gives the tokenizer)."""
    config = RemoteConfig(url=url, **{"timeout_s": 60.0, "connect_timeout_s": 30.0, **remote})
    return build_engine(checkpoint_dir("small"), checkpoint_dir("large"), config=engine_config(), remote=config)


@contextlib.contextmanager
def large_endpoint(port: int = 0, api_key: str | None = None):
    """A collab-decode server serving the demo large model alone, on loopback."""
    engine = build_engine(checkpoint_dir("large"), config=engine_config(small_kv_bytes=64 * MIB))
    model = ServedModel(name=ENDPOINT_MODEL, small_dir=str(checkpoint_dir("large")), large_dir=None)
    config = ServeConfig(port=port, grpc_port=0, log_level="warning", api_key=api_key)
    with running_server(config, engine, model) as server:
        yield server


@pytest.fixture(scope="package")
def local_engine():
    """The demo pair, both models local: the reference."""
    return local_pair()


def top2_margin(engine, token_ids: list[int]) -> float:
    """The local large model's logit margin between its two likeliest next tokens after `token_ids`."""
    seq_id = engine.add_request(token_ids, SamplingParams(max_tokens=1, temperature=0.0, logprobs=2), "large")
    seq = engine.seqs[seq_id]
    while not seq.finished:
        engine.step()
    (_, first), (_, second) = seq.top_logprobs[0][:2]
    return first - second


def assert_greedy_matches(engine, prompt_ids: list[int], local_ids: list[int], remote_ids: list[int]) -> None:
    """Remote output equals local, or first differs where the local large model's top-2 margin < NEAR_TIE."""
    if remote_ids == local_ids:
        return
    i = next((i for i, (a, b) in enumerate(zip(local_ids, remote_ids)) if a != b), min(len(local_ids), len(remote_ids)))
    margin = top2_margin(engine, prompt_ids + local_ids[:i])
    assert margin < NEAR_TIE, (f"remote output differs at token {i} ({local_ids[i:i + 3]} local, {remote_ids[i:i + 3]} "
                               f"remote) where the local top-2 margin is {margin:.2e}, not a near tie")
