"""The features the pipeline writes are the features the online neural router computes at the same position
while decoding (to 1e-5 before the dataset's float16 rounding), on a trace that mixes both models' tokens."""

from __future__ import annotations

import pytest
import torch

import collab_decode.routing.neural as neural
from collab_decode.labels import files
from collab_decode.labels.forcing import teacher_force
from collab_decode.labels.traces import Trace
from collab_decode.routing.features import LOOKUP_SIZE
from collab_decode.routing.neural import RouterMLP, save_router
from collab_decode.sampling import SamplingParams
from tests.labels.conftest import assert_blocks_free, label_run, pair_engine, write_queries

TOP_K = 8


def online_features(engine, prompt, routing, monkeypatch, max_tokens=24, on_host=True):
    """Decode one prompt greedily under `routing`; every feature row the neural router computed, in order: on the
    host (NeuralRoute._host_features, as a CPU engine at batch 1 does) or with the torch ops (router_features)."""
    seen = []
    owner, name = (neural.NeuralRoute, "_host_features") if on_host else (neural, "router_features")
    real = getattr(owner, name)

    def spy(*args, **kwargs):
        features = real(*args, **kwargs)
        seen.append(torch.tensor([features]) if on_host else features.clone())
        return features

    host_max_rows = neural.HOST_MAX_ROWS
    monkeypatch.setattr(owner, name, spy)
    monkeypatch.setattr(neural, "HOST_MAX_ROWS", host_max_rows if on_host else 0)
    out = engine.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), routing)[0]
    monkeypatch.setattr(owner, name, real)
    monkeypatch.setattr(neural, "HOST_MAX_ROWS", host_max_rows)
    return out, torch.cat(seen)


@pytest.mark.parametrize("on_host", [True, False])
@pytest.mark.parametrize("lookup", [False, True])
def test_pipeline_features_equal_the_online_routers(tmp_path, pair, monkeypatch, lookup, on_host):
    """With the prompt lookup, the online router's last LOOKUP_SIZE columns are the pipeline's `lookup` rows. The
    online features computed on the host (batch 1 on a CPU) and with the torch ops."""
    torch.manual_seed(0)
    save_router(tmp_path / "router", RouterMLP(32, TOP_K, width=16, prompt_lookup=lookup),
                {"hidden_size": 32, "top_k": TOP_K, "width": 16, "num_layers": 2, "threshold": 0.5,
                 "prompt_lookup": lookup})
    engine = pair_engine(pair, routers={"r": tmp_path / "router"})
    text = "Ann has 352 marbles. How many marbles does Ann have? Ann has 352 marbles and 35 more."
    prompt = engine.tokenizer(text, add_special_tokens=True)["input_ids"]
    # a threshold at the median score routes about half the tokens: the trace mixes small and large tokens
    _, scores_run = online_features(engine, prompt, "neural:r:1.0", monkeypatch, on_host=on_host)
    with torch.no_grad():
        scores = torch.sigmoid(engine.router_context.routers["r"].model(scores_run))
    out, online = online_features(engine, prompt, f"neural:r:{float(scores.median()):.6f}", monkeypatch,
                                  on_host=on_host)
    assert {"small", "large"} <= set(out.provenance), out.provenance

    trace = Trace(0, prompt, out.token_ids, out.finish_reason)
    rows = teacher_force(engine, [trace], top_k=TOP_K, max_tokens_per_forward=7)  # chunked, unlike decoding
    assert_blocks_free(engine)
    written = torch.cat([rows.features, rows.lookup], dim=-1) if lookup else rows.features
    assert online.shape == written.shape == (len(out.token_ids), 2 * 32 + TOP_K + (LOOKUP_SIZE if lookup else 0))
    torch.testing.assert_close(written, online, rtol=0, atol=1e-5)
    assert rows.lookup.shape == (len(out.token_ids), LOOKUP_SIZE) and (rows.lookup[:, 0] > 0).any()  # matches
    # where the large model wrote, the small model's proposal (its top-1) differs or not; either way the
    # online router saw the embedding of that proposal, as the pipeline does
    assert rows.mismatch.any()


def test_dataset_features_are_the_online_features_in_float16(tmp_path, pair, monkeypatch):
    torch.manual_seed(1)
    engine = pair_engine(pair)
    queries = write_queries(tmp_path / "q.jsonl", [{"id": "a", "prompt": "Ann has 352 marbles."}])
    run = label_run(engine, queries, tmp_path / "out", verifier="exact", top_k=TOP_K, max_tokens=20)
    run.run(["traces", "forcing"])
    trace = run.traces(0)[0]
    save_router(tmp_path / "router", RouterMLP(32, TOP_K, width=16),
                {"hidden_size": 32, "top_k": TOP_K, "width": 16, "num_layers": 2})
    online_engine = pair_engine(pair, routers={"r": tmp_path / "router"})
    # the trace is the large model's: replay it online by routing everything to the large model is not
    # possible (no router runs), so decode with the small model fed the trace, one position at a time
    written = files.read_tensors(run.path("forcing", 0))["features"]
    for pos in range(len(trace.response_ids)):
        prefix = trace.prompt_ids + trace.response_ids[:pos]
        _, online = online_features(online_engine, prefix, "neural:r:1.0", monkeypatch, max_tokens=1)
        # float16 keeps 11 significant bits: within half a unit of the last one (plus the 1e-5 of above)
        torch.testing.assert_close(written[pos].float(), online[0], rtol=2 ** -11, atol=1e-5)
    assert written.dtype == torch.float16
    assert_blocks_free(online_engine)
