"""The transformers fallback: same numbers as the native backend, exact rollback, and an architecture
the native backend refuses running through the engine with greedy output equal to transformers' own."""

from __future__ import annotations

import pytest
import torch

from collab_decode.backends.base import ModelInput, SeqChunk
from collab_decode.backends.hf import TransformersBackend
from collab_decode.backends.native import NativeBackend
from collab_decode.engine.engine import Engine
from collab_decode.sampling import SamplingParams
from tests.utils import save_hf_model

ATOL = 1e-4


def chunk(seq_id: int, token_ids: list[int], num_cached: int, all_positions: bool = False) -> SeqChunk:
    # 8 blocks of 4 tokens per sequence: enough for these tests; the transformers backend ignores them
    return SeqChunk(seq_id, token_ids, num_cached, list(range(8 * seq_id, 8 * seq_id + 8)), all_positions)


def run(backend, *chunks: SeqChunk):
    return backend.forward(ModelInput(list(chunks)))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_hf_model(tmp_path_factory.mktemp("llama"), "llama")


def test_matches_native_on_prefill_decode_and_ragged_batch(llama_dir):
    hf = TransformersBackend.from_pretrained(llama_dir)
    native = NativeBackend.from_pretrained(llama_dir)
    native.init_cache(num_blocks=16, block_size=4)
    assert hf.kv_bytes_per_token() == 0 and hf.vocab_size == native.vocab_size
    assert hf.config.hidden_size == native.config.hidden_size
    steps = [
        [chunk(0, [3, 5, 7, 11, 13, 17], 0, all_positions=True)],  # prefill
        [chunk(0, [19], 6)],  # decode
        [chunk(0, [23], 7), chunk(1, [2, 4, 6, 8, 10], 0, all_positions=True)],  # ragged: decode + prefill
    ]
    for chunks in steps:
        a, b = run(hf, *chunks), run(native, *chunks)
        assert a.logits.dtype == torch.float32 and a.logits.shape == (len(chunks), hf.vocab_size)
        torch.testing.assert_close(a.logits, b.logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(a.hidden, b.hidden, atol=ATOL, rtol=0)
        assert a.all_logits.keys() == b.all_logits.keys()
        for seq_id in a.all_logits:
            torch.testing.assert_close(a.all_logits[seq_id], b.all_logits[seq_id], atol=ATOL, rtol=0)
            torch.testing.assert_close(a.all_hidden[seq_id], b.all_hidden[seq_id], atol=ATOL, rtol=0)
    ids = torch.tensor([1, 2, 3])
    torch.testing.assert_close(hf.embed(ids), native.embed(ids))


@pytest.mark.parametrize("arch, overrides", [("llama", {}), ("mistral", {"sliding_window": 4})],
                         ids=["crop", "sliding-window-replay"])
def test_rollback_equals_a_fresh_run(tmp_path, arch, overrides):
    backend = TransformersBackend.from_pretrained(save_hf_model(tmp_path, arch, **overrides))
    prompt, drafts = [3, 5, 7, 11, 13], [20, 21, 22, 23]
    run(backend, chunk(0, prompt, 0))
    for i, token in enumerate(drafts):  # decode 4 tokens
        run(backend, chunk(0, [token], len(prompt) + i))
    kept = prompt + drafts[:1]
    rolled = run(backend, chunk(0, [40, 41], len(kept), all_positions=True))  # 3 drafts rejected
    fresh = run(backend, chunk(1, kept + [40, 41], 0, all_positions=True))
    torch.testing.assert_close(rolled.logits, fresh.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(rolled.all_logits[0], fresh.all_logits[1][-2:], atol=1e-5, rtol=0)
    assert backend.caches[0].token_ids == kept + [40, 41]


def test_chunk_past_what_was_sent_is_refused(llama_dir):
    backend = TransformersBackend.from_pretrained(llama_dir)
    run(backend, chunk(0, [1, 2, 3], 0))
    with pytest.raises(ValueError, match="never sent"):
        run(backend, chunk(0, [4], 5))
    backend.release(0)
    assert backend.caches == {}


def test_unloadable_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a model directory"):
        TransformersBackend.from_pretrained(tmp_path / "missing")
    (tmp_path / "config.json").write_text('{"model_type": "no-such-arch"}')
    with pytest.raises(ValueError, match=f"cannot load {tmp_path}"):
        TransformersBackend.from_pretrained(tmp_path)


class IdTokenizer:
    """The least the engine needs of a tokenizer, for token-id prompts."""

    eos_token_id = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(map(str, ids))


def save_gpt2(path, seed: int = 0):
    """A tiny random GPT-2 (an architecture the native backend refuses), saved as safetensors."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=95, eos_token_id=96)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(str(path), safe_serialization=True)
    return model


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=num_tokens, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


@torch.inference_mode()
def next_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([token_ids])).logits[0, -1].log_softmax(-1)


PROMPTS = [[1, 2, 3], [5, 8, 13, 21, 34]]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def test_gpt2_through_the_engine_equals_transformers_greedy(tmp_path):
    model = save_gpt2(tmp_path)
    with pytest.raises(ValueError):
        NativeBackend.from_pretrained(tmp_path)  # the reason this backend exists
    backend = TransformersBackend.from_pretrained(tmp_path)
    assert backend.eos_token_ids == (96,) and backend.config.hidden_size == 32
    engine = Engine(backend, IdTokenizer(97))
    results = engine.generate(PROMPTS, GREEDY)
    for prompt, result in zip(PROMPTS, results):
        assert result.token_ids == hf_greedy(model, prompt, 8)
    assert backend.caches == {}  # every finished sequence was released


@pytest.mark.parametrize("routing", ["speculative:3", "random:0.5"])
def test_gpt2_pair_greedy_routing(tmp_path, routing):
    # speculative rollback (crop) and the large model's lazy catch-up, both through the engine
    models = {"small": save_gpt2(tmp_path / "small", seed=1), "large": save_gpt2(tmp_path / "large", seed=2)}
    small = TransformersBackend.from_pretrained(tmp_path / "small")
    large = TransformersBackend.from_pretrained(tmp_path / "large")
    engine = Engine(small, IdTokenizer(97), large=large)
    results = engine.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0),
                              routing=routing)
    for prompt, result in zip(PROMPTS, results):
        assert set(result.provenance) == {"small", "large"}
        for i, (token, source) in enumerate(zip(result.token_ids, result.provenance)):
            prefix = prompt + result.token_ids[:i]
            assert token == int(next_logprobs(models[source], prefix).argmax()), f"token {i}: not {source}'s choice"
            # speculative reports every committed token's logprob under the large model
            scorer = models["large"] if routing.startswith("speculative") else models[source]
            assert abs(result.logprobs[i] - float(next_logprobs(scorer, prefix)[token])) < 1e-4
        if routing.startswith("speculative"):  # lossless: greedy equals the large model alone
            assert result.token_ids == hf_greedy(models["large"], prompt, 8)
    assert small.caches == {} and large.caches == {}


def test_abort_releases_the_cache(llama_dir):
    backend = TransformersBackend.from_pretrained(llama_dir)
    engine = Engine(backend, IdTokenizer(backend.vocab_size))
    seq_id = engine.add_request([1, 2, 3], SamplingParams(max_tokens=4, temperature=0))
    engine.step()
    assert seq_id in backend.caches
    engine.abort(seq_id)
    assert backend.caches == {}
