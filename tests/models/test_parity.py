"""The native model against transformers, in float32, for every architecture of tests/utils.py.

Each reference runs the tokens through Hugging Face in the same chunks the native backend sees (a
prefill, then cached steps with a DynamicCache), because dynamic NTK scaling derives its frequencies
from the length reached at each step: the keys cached at step t keep step t's rotation. A fresh HF
model serves each reference since its dynamic rotary state survives between calls.
"""

from __future__ import annotations

import pytest
import torch

from collab_decode.backends.base import ModelInput, ModelOutput, SeqChunk
from collab_decode.backends.native import NativeBackend
from tests.utils import ARCH_CONFIGS, TINY, make_hf_model, save_hf_model

ATOL = 1e-4  # native vs transformers
SAME_ATOL = 1e-5  # native vs native, same math on different cache layouts
VOCAB = 97
NUM_BLOCKS, BLOCK_SIZE = 32, 4
TABLE = [13, 2, 27, 8, 19, 0, 5, 30, 11, 22]  # non-contiguous, out of order, uses block 0: 40 slots


@pytest.fixture(scope="module", params=list(ARCH_CONFIGS))
def arch_backend(request, tmp_path_factory) -> tuple[str, NativeBackend]:
    arch = request.param
    backend = NativeBackend.from_pretrained(save_hf_model(tmp_path_factory.mktemp(arch), arch))
    return arch, backend


@pytest.fixture
def arch(arch_backend) -> str:
    return arch_backend[0]


@pytest.fixture
def backend(arch_backend) -> NativeBackend:
    backend = arch_backend[1]
    backend.init_cache(NUM_BLOCKS, BLOCK_SIZE)  # every test starts from zeroed storage
    return backend


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def hf_chunked(arch: str, token_ids: list[int], chunk_lens: list[int], **overrides
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """HF logits (n, V) and last-layer hidden states (n, H) of each chunk, fed in order over one cache."""
    from transformers import DynamicCache

    assert sum(chunk_lens) == len(token_ids)
    model = make_hf_model(arch, **overrides)
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([token_ids])
    logits, hidden, start = [], [], 0
    for n in chunk_lens:
        out = model(ids[:, start:start + n], past_key_values=cache, use_cache=True, output_hidden_states=True)
        assert torch.allclose(model.lm_head(out.hidden_states[-1]), out.logits)  # the last is after the norm
        logits.append(out.logits[0])
        hidden.append(out.hidden_states[-1][0])
        start += n
    return logits, hidden


def step(backend: NativeBackend, *chunks: SeqChunk) -> ModelOutput:
    return backend.forward(ModelInput(list(chunks)))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    diff = (actual.float() - expected.float()).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"


def test_prefill_matches_hf_at_every_position(arch, backend):
    ids = random_ids(20, seed=1)
    out = step(backend, SeqChunk(0, ids, 0, TABLE, all_positions=True))
    (ref_logits,), (ref_hidden,) = hf_chunked(arch, ids, [20])
    assert out.all_logits[0].shape == (20, VOCAB)
    assert_close(out.all_logits[0], ref_logits)
    assert_close(out.all_hidden[0], ref_hidden)
    assert_close(out.logits[0], ref_logits[-1])


def test_decode_over_cache_matches_hf_incremental(arch, backend):
    ids = random_ids(26, seed=2)
    out = step(backend, SeqChunk(0, ids[:20], 0, TABLE, all_positions=True))
    ref_logits, _ = hf_chunked(arch, ids, [20] + [1] * 6)
    assert_close(out.all_logits[0], ref_logits[0])
    for t in range(20, 26):
        out = step(backend, SeqChunk(0, [ids[t]], t, TABLE))
        assert_close(out.logits[0], ref_logits[t - 19][0])


def test_last_hidden_is_hf_final_hidden_state(arch, backend):
    ids = random_ids(21, seed=3)
    prefill = step(backend, SeqChunk(0, ids[:20], 0, TABLE))
    decode = step(backend, SeqChunk(0, ids[20:], 20, TABLE))
    _, ref_hidden = hf_chunked(arch, ids, [20, 1])
    assert prefill.hidden.shape == (1, TINY["hidden_size"])
    assert_close(prefill.hidden[0], ref_hidden[0][-1])
    assert_close(decode.hidden[0], ref_hidden[1][-1])
    assert_close(backend.model.logits(decode.hidden), decode.logits)


def test_ragged_batch_matches_hf_per_sequence(arch, backend):
    """Three sequences on interleaved blocks, prefills and decodes mixed in the same forwards."""
    tables = {0: [13, 8, 5, 22, 31], 1: [2, 19, 30, 29, 16], 2: [27, 0, 11, 28, 9]}
    ids = {0: random_ids(19, seed=4), 1: random_ids(20, seed=5), 2: random_ids(17, seed=6)}
    # per step, each sequence's (num_cached, num_new); lengths cross max_position_embeddings=16 of
    # llama-dynamic at different steps, so one forward mixes sequences with different rope bases
    schedule = [
        {1: (0, 7), 2: (0, 9)},  # two prefills from scratch
        {0: (0, 11), 1: (7, 1), 2: (9, 5)},  # prefill, decode, chunk on top of a cache
        {0: (11, 6), 1: (8, 10), 2: (14, 1)},  # two chunks and a decode
        {0: (17, 1), 1: (18, 1), 2: (15, 1)},  # batched decodes of different lengths and table sizes
        {0: (18, 1), 1: (19, 1), 2: (16, 1)},
    ]
    got: dict[int, list[torch.Tensor]] = {0: [], 1: [], 2: []}
    for plan in schedule:
        chunks = [SeqChunk(s, ids[s][c:c + n], c, tables[s], all_positions=True) for s, (c, n) in plan.items()]
        out = step(backend, *chunks)
        for row, s in enumerate(plan):
            got[s].append(out.all_logits[s])
            assert_close(out.logits[row], out.all_logits[s][-1], atol=SAME_ATOL)
    for s in ids:
        chunk_lens = [plan[s][1] for plan in schedule if s in plan]
        ref_logits, _ = hf_chunked(arch, ids[s], chunk_lens)
        for actual, expected in zip(got[s], ref_logits, strict=True):
            assert_close(actual, expected)


def test_ragged_batch_read_at_last_rows_equals_every_row(arch, backend):
    """A forward nobody reads at every position (no all_positions) runs the last layer's projection and MLP on
    each sequence's last row only: its logits and hidden states, and the K/V every layer leaves in the cache
    (the last layer's too, for every row), equal those of the same forwards read at every position."""
    tables = {0: [13, 8, 5, 22, 31], 1: [2, 19, 30, 29, 16], 2: [27, 0, 11, 28, 9]}
    ids = {0: random_ids(19, seed=4), 1: random_ids(20, seed=5), 2: random_ids(17, seed=6)}
    # mixed batches, then chunks that are the whole batch (their last query alone, over every key)
    schedule = [{1: (0, 7), 2: (0, 9)}, {0: (0, 11), 1: (7, 1), 2: (9, 5)}, {0: (11, 6), 1: (8, 10), 2: (14, 1)},
                {1: (18, 2)}, {0: (17, 2)}, {2: (0, 17)}]
    runs = []
    for all_positions in (True, False):
        backend.init_cache(NUM_BLOCKS, BLOCK_SIZE)
        outs = [step(backend, *(SeqChunk(s, ids[s][c:c + n], c, tables[s], all_positions=all_positions)
                                for s, (c, n) in plan.items())) for plan in schedule]
        runs.append((outs, [t.clone() for t in backend.cache.k + backend.cache.v]))
    (every, every_cache), (last, last_cache) = runs
    for a, b in zip(every, last):
        assert_close(b.logits, a.logits, atol=SAME_ATOL)
        assert_close(b.hidden, a.hidden, atol=SAME_ATOL)
    for a, b in zip(every_cache, last_cache, strict=True):
        assert_close(b, a, atol=SAME_ATOL)


def test_last_layer_mlp_runs_on_the_rows_read(backend):
    """Earlier layers run every row of a chunk (their outputs feed the next layer's K/V); the last layer's MLP
    only each sequence's last row, unless a chunk is read at every position."""
    layers = backend.model.model.layers
    rows: list[tuple[int, int]] = []  # (layer, rows its MLP ran)
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, args, i=i: rows.append((i, args[0].shape[0])))
             for i, layer in enumerate(layers)]
    try:
        ids = random_ids(21, seed=17)
        step(backend, SeqChunk(0, ids[:12], 0, TABLE), SeqChunk(1, ids[12:], 0, [1, 3, 4]))
        assert rows == [(i, 21) for i in range(len(layers) - 1)] + [(len(layers) - 1, 2)]
        rows.clear()
        step(backend, SeqChunk(0, ids[:12], 0, TABLE, all_positions=True), SeqChunk(1, ids[12:], 0, [1, 3, 4]))
        assert rows == [(i, 21) for i in range(len(layers))]
    finally:
        for hook in hooks:
            hook.remove()


def test_decodes_padded_to_the_longest_table(arch, backend):
    """Batched decodes: short tables are padded with block 0 while block 0 holds another's keys; a
    one-token prompt runs with the decodes."""
    short, long, single = random_ids(3, seed=7), random_ids(14, seed=8), random_ids(1, seed=12)
    step(backend, SeqChunk(0, short[:2], 0, [5]), SeqChunk(1, long[:13], 0, [0, 3, 1, 2]))
    out = step(backend, SeqChunk(0, short[2:], 2, [5]), SeqChunk(1, long[13:], 13, [0, 3, 1, 2]),
               SeqChunk(2, single, 0, [6]))
    assert_close(out.logits[0], hf_chunked(arch, short, [2, 1])[0][1][0])
    assert_close(out.logits[1], hf_chunked(arch, long, [13, 1])[0][1][0])
    assert_close(out.logits[2], hf_chunked(arch, single, [1])[0][0][0])


def test_decode_padding_never_reads_another_sequences_blocks(arch, backend):
    """NaN K/V in a block no sequence of the batch owns (a failed request's) cannot reach the batch through
    the padding of a short table: masked keys still meet their values as 0 * value."""
    short, long = random_ids(3, seed=7), random_ids(14, seed=8)
    step(backend, SeqChunk(0, short[:2], 0, [5]), SeqChunk(1, long[:13], 0, [3, 1, 2, 4]))
    for cache in backend.cache.k + backend.cache.v:
        cache[0] = float("nan")
    out = step(backend, SeqChunk(0, short[2:], 2, [5]), SeqChunk(1, long[13:], 13, [3, 1, 2, 4]))
    assert_close(out.logits[0], hf_chunked(arch, short, [2, 1])[0][1][0])
    assert_close(out.logits[1], hf_chunked(arch, long, [13, 1])[0][1][0])


@pytest.mark.parametrize("arch", ["llama-linear", "llama3"])
def test_positions_beyond_max_position_embeddings(arch, tmp_path):
    """The static cos/sin table grows past max_position_embeddings (8 here) when a sequence does."""
    backend = NativeBackend.from_pretrained(save_hf_model(tmp_path, arch, max_position_embeddings=8))
    backend.init_cache(NUM_BLOCKS, BLOCK_SIZE)
    ids = random_ids(22, seed=13)
    out = step(backend, SeqChunk(0, ids[:20], 0, TABLE, all_positions=True))
    decode = step(backend, SeqChunk(0, ids[20:21], 20, TABLE))
    chunk = step(backend, SeqChunk(0, ids[21:], 21, TABLE))
    ref_logits, _ = hf_chunked(arch, ids, [20, 1, 1], max_position_embeddings=8)
    assert_close(out.all_logits[0], ref_logits[0])
    assert_close(decode.logits[0], ref_logits[1][0])
    assert_close(chunk.logits[0], ref_logits[2][0])


def test_truncate_then_redo_equals_fresh_run(arch, backend):
    prompt, old, new = random_ids(20, seed=9), random_ids(5, seed=10), random_ids(4, seed=11)
    step(backend, SeqChunk(0, prompt, 0, TABLE))
    for i, tok in enumerate(old):
        step(backend, SeqChunk(0, [tok], 20 + i, TABLE))
    # roll back the last 3 of the 5 decoded tokens: keep prompt + old[:2], then decode other tokens
    kept = prompt + old[:2]
    redo = [step(backend, SeqChunk(0, [tok], len(kept) + i, TABLE)).logits[0] for i, tok in enumerate(new)]

    backend.init_cache(NUM_BLOCKS, BLOCK_SIZE)
    fresh_table = [4, 9, 1, 7, 3, 12, 6, 20]
    step(backend, SeqChunk(0, prompt, 0, fresh_table))
    for i, tok in enumerate(old[:2] + new):
        fresh = step(backend, SeqChunk(0, [tok], 20 + i, fresh_table)).logits[0]
        if i >= 2:
            assert_close(redo[i - 2], fresh, atol=SAME_ATOL)
    ref_logits, _ = hf_chunked(arch, kept + new, [20] + [1] * 6)
    for i, logits in enumerate(redo):
        assert_close(logits, ref_logits[3 + i][0])


@pytest.mark.parametrize("arch", ["llama-bias"])
def test_compiled_decode_matches_hf(arch, tmp_path):
    """compile=True: decode-only forwards run through torch.compile, where a one-row product is a fused
    sum over the weight and several rows take the swapped-operand product (models.llama.Linear).
    One sequence decoding alone, then three decoding together at different lengths, against HF."""
    backend = NativeBackend.from_pretrained(save_hf_model(tmp_path, arch), compile=True)
    backend.init_cache(NUM_BLOCKS, BLOCK_SIZE)
    tables = {0: TABLE, 1: [1, 3, 4, 6, 7, 9], 2: [10, 12, 14, 15, 16, 17]}
    ids = {0: random_ids(24, seed=14), 1: random_ids(14, seed=15), 2: random_ids(9, seed=16)}
    step(backend, SeqChunk(0, ids[0][:20], 0, tables[0]))
    alone = [step(backend, SeqChunk(0, [ids[0][t]], t, tables[0])).logits[0] for t in (20, 21)]
    step(backend, SeqChunk(1, ids[1][:12], 0, tables[1]), SeqChunk(2, ids[2][:7], 0, tables[2]))
    together = [step(backend, *(SeqChunk(s, [ids[s][n]], n, tables[s])
                                for s, n in ((0, 22 + i), (1, 12 + i), (2, 7 + i))))
                for i in range(2)]
    ref = {0: hf_chunked(arch, ids[0], [20, 1, 1, 1, 1])[0], 1: hf_chunked(arch, ids[1], [12, 1, 1])[0],
           2: hf_chunked(arch, ids[2], [7, 1, 1])[0]}
    assert_close(alone[0], ref[0][1][0])
    assert_close(alone[1], ref[0][2][0])
    for i, out in enumerate(together):
        for row, s in enumerate((0, 1, 2)):
            assert_close(out.logits[row], ref[s][(3 if s == 0 else 1) + i][0])
