"""The API key: only `Authorization: Bearer KEY` (REST and gRPC), the docs and schema behind it, and no
filesystem path in what the server says about its models."""

from __future__ import annotations

import grpc
import httpx
import pytest

from collab_decode.demo import checkpoint_dir
from collab_decode.serve.grpc_gen import collab_decode_pb2 as pb
from collab_decode.serve.grpc_gen import collab_decode_pb2_grpc as pb_grpc
from tests.serve.conftest import API_KEY, PROMPT
from tests.serve.test_errors import assert_openai_error

GOOD = {"model": "demo", "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
REFUSED = {"bare key": API_KEY, "wrong key": f"Bearer {API_KEY}x", "another scheme": f"Basic {API_KEY}",
           "bearer alone": "Bearer", "key as scheme": f"{API_KEY} Bearer"}


@pytest.mark.parametrize("case", list(REFUSED))
def test_only_a_bearer_key_is_accepted(guarded_server, case):
    url = f"{guarded_server.url}/v1/completions"
    error = assert_openai_error(httpx.post(url, json=GOOD, headers={"Authorization": REFUSED[case]}, timeout=60), 401)
    assert error["code"] == "invalid_api_key"
    for header in (f"Bearer {API_KEY}", f"bearer {API_KEY}"):  # the scheme is case-insensitive (RFC 7235)
        assert httpx.post(url, json=GOOD, headers={"Authorization": header}, timeout=60).status_code == 200


@pytest.mark.parametrize("case", list(REFUSED))
def test_grpc_only_a_bearer_key_is_accepted(guarded_server, case):
    with grpc.insecure_channel(guarded_server.grpc_target) as channel:
        stub = pb_grpc.CollabDecodeStub(channel)
        request = pb.GenerateRequest(text=PROMPT, sampling=pb.SamplingParams(max_tokens=2))
        for call in (lambda m: stub.Generate(request, metadata=m, timeout=60),
                     lambda m: stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=m, timeout=60)):
            with pytest.raises(grpc.RpcError) as e:
                call((("authorization", REFUSED[case]),))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Generate(request, metadata=(("authorization", f"Bearer {API_KEY}"),), timeout=60).text


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_docs_and_schema_are_behind_the_key(guarded_server, server, path):
    assert_openai_error(httpx.get(f"{guarded_server.url}{path}"), 401)
    assert_openai_error(httpx.get(f"{guarded_server.url}{path}", headers={"Authorization": API_KEY}), 401)
    keyed = httpx.get(f"{guarded_server.url}{path}", headers={"Authorization": f"Bearer {API_KEY}"})
    assert keyed.status_code == 200
    assert httpx.get(f"{server.url}{path}").status_code == 200  # no key set: open
    if path == "/openapi.json":
        assert "/v1/completions" in keyed.json()["paths"]


def test_health_and_metrics_stay_open(guarded_server):
    assert httpx.get(f"{guarded_server.url}/health").status_code == 200
    assert httpx.get(f"{guarded_server.url}/metrics").status_code == 200


def test_no_filesystem_path_in_model_listings(server):
    paths = [str(checkpoint_dir("small")), str(checkpoint_dir("large")), str(checkpoint_dir("small").parent)]
    listing = httpx.get(f"{server.url}/v1/models")
    card = httpx.get(f"{server.url}/v1/models/demo")
    for r in (listing, card):
        assert r.status_code == 200 and not any(p in r.text for p in paths), r.text
    entry = listing.json()["data"][0]
    assert entry["id"] == "demo" and (entry["small_model"], entry["large_model"]) == ("small", "large")
    with grpc.insecure_channel(server.grpc_target) as channel:
        info = pb_grpc.CollabDecodeStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=60)
    assert (info.model, info.small_model, info.large_model) == ("demo", "small", "large")
    assert not any(p in str(info) for p in paths)
