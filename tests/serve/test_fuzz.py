"""The REST API fuzzed from its own OpenAPI schema (schemathesis) against a real server on loopback (uvicorn,
RequestGuard, FastAPI, the engine: `limited_server`, whose small limits keep every request cheap).

Each operation gets three kinds of request: what the schema allows (most of it nonsense the server must
refuse with a 400), what the schema forbids (must be a 4xx), and plausible requests (good values for every
field, drawn at random: prompts, sampling, n, echo, logprobs, routing, streaming...) with now and then one
field from the schema's generator in place of its good value, so that most of them reach the engine.
Checked on every answer: no 5xx at all (the server is healthy: the documented 503/504 are for draining, a
dead engine and timeouts), a status the schema documents, its content type and body schema, negative data
refused; a 200 completion's choices end ("stop"/"length"), a stream ends with [DONE] and no error event;
every request answers within STUCK_S. After the run: nothing in flight, every KV block free, /health 200.

Requests per operation: twice COLLAB_DECODE_FUZZ_EXAMPLES (default 100 in `make test`, ~30 s in all; `make fuzz`
sets 1000). A failure prints the request as a curl command and hypothesis' @seed to replay it.
"""

from __future__ import annotations

import json
import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import checks
from schemathesis.generation.modes import GenerationMode

from tests.serve.conftest import PROMPT, SMALL_LIMITS

NUM_EXAMPLES = int(os.environ.get("COLLAB_DECODE_FUZZ_EXAMPLES", "100"))
STUCK_S = 60.0  # a request not answered by then is stuck (every one here is a few tokens)
CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance, checks.negative_data_rejection]
VOCAB = 447  # the demo pair's vocabulary

# ---- plausible request bodies --------------------------------------------------------------------
TOKEN = st.integers(0, VOCAB - 1)
TEXT = st.one_of(st.sampled_from([PROMPT, "Ann has", "12 + 7 =", " ", "\n\n"]), st.text(min_size=1, max_size=40))
ROUTING = st.sampled_from(["small", "large", "entropy:0.3", "confidence:0.8", "step-entropy:1.0", "random:0.5",
                           "speculative:3", "neural", {"policy": "entropy", "threshold": 0.5},
                           {"policy": "speculative", "k": 2}])
TEMPERATURE = st.one_of(st.floats(0, 2), st.sampled_from([0.0, 1e-45, 1e-30, 1e-8]))
SAMPLING = {"temperature": TEMPERATURE, "top_p": st.floats(0.05, 1.0), "top_k": st.integers(0, 50),
            "seed": st.integers(-2**63, 2**64 - 4), "n": st.integers(1, 3), "stream": st.booleans(),
            "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "routing": ROUTING,
            "stop": st.one_of(st.text(min_size=1, max_size=4), st.lists(st.text(min_size=1, max_size=4),
                                                                         max_size=SMALL_LIMITS.max_stop)),
            "stop_token_ids": st.lists(TOKEN, max_size=SMALL_LIMITS.max_stop), "ignore_eos": st.booleans(),
            "return_provenance": st.booleans(), "user": st.text(max_size=8)}
COMPLETION = st.fixed_dictionaries({"model": st.just("demo"), "prompt": st.one_of(
    TEXT, st.lists(TOKEN, min_size=1, max_size=30), st.lists(TEXT, min_size=1, max_size=3),
    st.lists(st.lists(TOKEN, min_size=1, max_size=10), min_size=1, max_size=3))}, optional={
    **SAMPLING, "max_tokens": st.integers(0, SMALL_LIMITS.max_output_tokens), "logprobs": st.integers(0, 5),
    "prompt_logprobs": st.integers(0, 5), "echo": st.booleans(), "return_tokens_as_token_ids": st.booleans()})
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer"]),
                                 "content": st.one_of(TEXT, st.lists(st.fixed_dictionaries(
                                     {"type": st.just("text"), "text": TEXT}), max_size=2))})
CHAT = st.fixed_dictionaries({"model": st.just("demo"), "messages": st.lists(
    MESSAGE, min_size=1, max_size=SMALL_LIMITS.max_messages)}, optional={
    **SAMPLING, "max_tokens": st.integers(1, SMALL_LIMITS.max_output_tokens),
    "max_completion_tokens": st.integers(1, SMALL_LIMITS.max_output_tokens), "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 5)})
PLAUSIBLE = {"/v1/completions": COMPLETION, "/v1/chat/completions": CHAT}


def _plausible(operation, good_bodies):
    """Good bodies; one in three takes one field from the schema's own generator instead."""
    def mix(drawn):
        case, body, pick = drawn
        generated = sorted(case.body.items()) if isinstance(case.body, dict) else []
        if generated and pick % 3 == 0:
            key, value = generated[pick % len(generated)]
            body = {**body, key: value}
        case.body = body
        return case
    return st.tuples(operation.as_strategy(GenerationMode.POSITIVE), good_bodies, st.integers(0, 2**16)).map(mix)


def _strategy(operation, path: str):
    strategies = [operation.as_strategy(GenerationMode.POSITIVE)]
    if operation.body or operation.path_parameters:  # nothing to get wrong in an operation without inputs
        strategies.append(operation.as_strategy(GenerationMode.NEGATIVE))
    if path in PLAUSIBLE:
        strategies += [_plausible(operation, PLAUSIBLE[path])] * 2  # half of all: these reach the engine
    return st.one_of(strategies)


def _check_completed(case, response) -> None:
    """A 200 generation: every choice ended; a stream: ends with [DONE], no error event on the way."""
    if response.status_code != 200 or case.operation.path not in PLAUSIBLE:
        return
    if response.headers["content-type"][0].startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", response.text[-500:]
        chunks = [json.loads(event) for event in events[:-1]]
        assert not [c for c in chunks if "error" in c], response.text[-500:]
        finished = [choice for c in chunks for choice in c["choices"] if choice.get("finish_reason")]
    else:
        finished = response.json()["choices"]
    assert finished and all(c["finish_reason"] in ("stop", "length") for c in finished), response.text[-500:]


@pytest.fixture(scope="module")
def schema(limited_server):
    schema = schemathesis.openapi.from_url(f"{limited_server.url}/openapi.json")
    schema.config.max_stream_events = 10**6  # schemathesis reads 20 SSE events and hangs up: read every stream whole
    return schema


@pytest.mark.parametrize("method, path", [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                                          ("GET", "/v1/models"), ("GET", "/v1/models/{name}"), ("GET", "/health"),
                                          ("GET", "/metrics")])
def test_rest_api_holds_under_fuzzing(limited_server, schema, method, path):
    operation = schema[path][method]

    @settings(max_examples=NUM_EXAMPLES * 2, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=_strategy(operation, path))
    def fuzz(case):
        response = case.call(timeout=STUCK_S)
        case.validate_response(response, checks=CHECKS)
        _check_completed(case, response)

    fuzz()
    limited_server.wait_idle(timeout=STUCK_S)  # nothing in flight, every KV block back in its pool
    assert httpx.get(f"{limited_server.url}/health", timeout=STUCK_S).json() == {"status": "ok"}
