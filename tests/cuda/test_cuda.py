"""The CUDA paths, on a machine with a GPU (`make test-cuda`). CI has none: the default selection leaves these
out, and asking for them where no GPU is fails rather than skips.

Each test compares the GPU with a reference that does not share its device: transformers on the same GPU
(the native model), or this engine on the CPU (the demo pair, every kind of routing).
"""

from __future__ import annotations

import pytest
import torch

from collab_decode.backends.base import ModelInput, SeqChunk
from collab_decode.backends.native import NativeBackend
from collab_decode.demo import checkpoint_dir
from collab_decode.demo.task import is_correct, problems
from collab_decode.demo.tokenizer import chat_prompt
from collab_decode.engine.config import EngineConfig
from collab_decode.engine.loading import build_engine
from collab_decode.pairs import pair_routers
from collab_decode.sampling import SamplingParams
from tests.utils import ARCH_CONFIGS, make_hf_model, save_hf_model

pytestmark = pytest.mark.cuda

TABLE = [13, 2, 27, 8, 19, 0, 5, 30, 11, 22]  # non-contiguous, out of order, uses block 0
CHUNKS = [20, 1, 1, 1, 1]  # a prefill, then cached decode steps
POLICIES = ["large", "neural", "entropy:0.3", "step-entropy:0.6", "speculative:3"]
NUM_PROBLEMS = 16


@pytest.fixture(scope="module")
def cuda() -> str:
    if not torch.cuda.is_available():
        pytest.fail("the cuda tests need a CUDA device (make test-cuda on a machine with a GPU)")
    return "cuda"


def native_logits(model_dir, dtype: str, device: str, ids: list[int]) -> list[torch.Tensor]:
    """Each chunk's logits (n, V) from the native backend, over a paged cache, chunks as CHUNKS."""
    backend = NativeBackend.from_pretrained(model_dir, dtype=dtype, device=device)
    backend.init_cache(32, 4)
    out, start = [], 0
    for n in CHUNKS:
        result = backend.forward(ModelInput([SeqChunk(0, ids[start:start + n], start, TABLE, all_positions=True)]))
        out.append(result.all_logits[0].float().cpu())
        start += n
    return out


@torch.no_grad()
def hf_logits(arch: str, dtype: torch.dtype, device: str, ids: list[int]) -> list[torch.Tensor]:
    from transformers import DynamicCache

    model = make_hf_model(arch).to(device=device, dtype=dtype)
    cache = DynamicCache(config=model.config)
    tokens = torch.tensor([ids], device=device)
    out, start = [], 0
    for n in CHUNKS:
        out.append(model(tokens[:, start:start + n], past_key_values=cache, use_cache=True).logits[0].float().cpu())
        start += n
    return out


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("arch", list(ARCH_CONFIGS))
def test_native_matches_transformers_on_the_gpu(cuda, arch, tmp_path):
    ids = torch.randint(0, 97, (sum(CHUNKS),), generator=torch.Generator().manual_seed(1)).tolist()
    model_dir = save_hf_model(tmp_path, arch)
    reference = hf_logits(arch, torch.float32, cuda, ids)
    assert max_diff(native_logits(model_dir, "float32", cuda, ids), reference) <= 1e-4
    # bfloat16: no further from the float32 reference than transformers' own bfloat16 is (its rounding differs)
    native_bf16 = max_diff(native_logits(model_dir, "bfloat16", cuda, ids), reference)
    hf_bf16 = max_diff(hf_logits(arch, torch.bfloat16, cuda, ids), reference)
    print(f"{arch}: bfloat16 max |diff| to float32: native {native_bf16:.4f}, transformers {hf_bf16:.4f}")
    assert native_bf16 <= 2 * hf_bf16 + 1e-3


def demo_engine(device: str, **options):
    """The demo pair with its shipped router on `device`; `options`: build_engine's (backend, dtype, compile)."""
    return build_engine(checkpoint_dir("small"), checkpoint_dir("large"), device=device, config=EngineConfig(),
                        routers=pair_routers("demo"), **options)


@pytest.fixture(scope="module")
def engines(cuda):
    return demo_engine(cuda), demo_engine("cpu")


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return [chat_prompt(p.question) for p in problems("heldout", NUM_PROBLEMS)]


def greedy() -> SamplingParams:
    return SamplingParams(max_tokens=400, temperature=0.0)  # room for every solution


@pytest.mark.parametrize("policy", POLICIES)
def test_the_demo_pair_writes_on_the_gpu_what_it_writes_on_the_cpu(engines, prompts, policy):
    """Same tokens, same writer per token, every KV block back. float32 on both devices: only a near-tie of
    two logits could flip a greedy token, and the demo models are sure of theirs."""
    gpu, cpu = (engine.generate(prompts, greedy(), policy) for engine in engines)
    same = sum(g.token_ids == c.token_ids and g.provenance == c.provenance for g, c in zip(gpu, cpu))
    right = [sum(is_correct(r.text, p.answer) for p, r in zip(problems("heldout", NUM_PROBLEMS), rs))
             for rs in (gpu, cpu)]
    large = sum(r.stats["large_tokens"] for r in gpu) / sum(len(r.token_ids) for r in gpu)
    print(f"{policy}: {same}/{len(prompts)} identical, right {right[0]} (gpu) / {right[1]} (cpu), "
          f"large share {large:.3f}")
    assert same == len(prompts)
    for engine in engines:
        assert all(kv.num_used_blocks == 0 for kv in engine.kv.values())


def test_batched_equals_one_at_a_time_on_the_gpu(engines, prompts):
    gpu = engines[0]
    batched = gpu.generate(prompts[:6], greedy(), "neural")
    alone = [gpu.generate([p], greedy(), "neural")[0] for p in prompts[:6]]
    assert [b.token_ids for b in batched] == [a.token_ids for a in alone]
    assert [b.provenance for b in batched] == [a.provenance for a in alone]


def test_a_seeded_request_samples_the_same_on_the_gpu_alone_or_batched(engines, prompts):
    """Each seeded request draws from its own generator on the GPU: the batch around it changes nothing."""
    gpu = engines[0]
    seeded = SamplingParams(max_tokens=60, temperature=1.0, top_p=0.9, seed=7)
    others = [SamplingParams(max_tokens=60, temperature=1.0, seed=100 + i) for i in range(4)]
    alone = gpu.generate([prompts[0]], seeded, "entropy:0.3")[0]
    batched = gpu.generate(prompts[:5], [seeded] + others, "entropy:0.3")[0]
    assert batched.token_ids == alone.token_ids and batched.provenance == alone.provenance
    assert gpu.generate([prompts[0]], seeded, "entropy:0.3")[0].token_ids == alone.token_ids


def test_compiled_and_transformers_backends_on_the_gpu_write_what_the_native_eager_one_does(engines, prompts):
    """`--compile` (decode steps through torch.compile: Triton kernels on the GPU) and `--backend transformers`."""
    want = {policy: engines[0].generate(prompts[:6], greedy(), policy) for policy in ("large", "neural")}
    for kind in ("compile", "transformers"):
        engine = demo_engine("cuda", compile=True) if kind == "compile" else demo_engine("cuda", backend="transformers")
        for policy, results in want.items():
            got = engine.generate(prompts[:6], greedy(), policy)
            same = sum(g.token_ids == w.token_ids and g.provenance == w.provenance for g, w in zip(got, results))
            print(f"{kind}, {policy}: {same}/6 identical to native eager")
            assert same == 6
        assert all(kv.num_used_blocks == 0 for kv in engine.kv.values())


def test_bfloat16_on_the_gpu_serves_every_policy(cuda, prompts):
    """Both models in bfloat16: every request ends normally, every block comes back, and routing keeps the large
    model's accuracy as closely as in float32 (rounding may flip a near-tie, so answers may differ a little)."""
    engine = demo_engine(cuda, dtype="bfloat16")
    right = {}
    for policy in POLICIES:
        results = engine.generate(prompts, greedy(), policy)
        assert all(r.finish_reason in ("stop", "length") for r in results), [r.error for r in results]
        right[policy] = sum(is_correct(r.text, p.answer) for p, r in zip(problems("heldout", NUM_PROBLEMS), results))
        assert all(kv.num_used_blocks == 0 for kv in engine.kv.values())
    print(f"bfloat16, right of {NUM_PROBLEMS}: {right}")
    assert right["large"] >= NUM_PROBLEMS - 2 and right["neural"] >= right["large"] - 2


def test_labels_on_the_gpu_equal_the_cpus(cuda, tmp_path):
    """Every stage of the label pipeline with the models on the GPU: the same mismatches and labels as on the
    CPU, features equal to float rounding (the dataset stores float16)."""
    from collab_decode.labels.dataset import read_dataset
    from collab_decode.labels.settings import parse_steps
    from tests.labels.conftest import assert_blocks_free, chat_queries, label_run, write_queries
    from tests.utils import make_engine, make_pair

    pair = make_pair(tmp_path / "pair", initializer_range=0.1)
    queries = write_queries(tmp_path / "q.jsonl", chat_queries(5, answers=True))
    data = {}
    for device in (cuda, "cpu"):
        engine = make_engine(*pair, device=device)
        run = label_run(engine, queries, tmp_path / device, answer_checker="tests.labels.checkers:even_length")
        for stage in parse_steps("all"):
            run.run_stage(stage)
            assert_blocks_free(engine)
        data[device] = read_dataset(tmp_path / device).tensors
    gpu, cpu = data[cuda], data["cpu"]
    assert gpu.keys() == cpu.keys()
    for name in gpu:
        if gpu[name].is_floating_point():
            assert torch.allclose(gpu[name].float(), cpu[name].float(), atol=1e-2, rtol=1e-2), name
        else:
            assert torch.equal(gpu[name], cpu[name]), name


MARBLES = ("Ann has 352 marbles. (a) She finds 179 more. (b) Then she gives away 86. "
           "How many marbles does Ann have now?")


@pytest.fixture(scope="module")
def gpu_server(cuda):
    """`collab-decode serve` with both models on the GPU (its engine process spawned, as users run it)."""
    from collab_decode.bench.suite import ServerProcess

    routers = [f"{name}={path}" for name, path in pair_routers("demo").items()]
    server = ServerProcess(str(checkpoint_dir("small")), str(checkpoint_dir("large")), 1, routers, device=cuda)
    yield server
    server.stop()


def test_the_server_on_the_gpu_answers_as_the_cpu_engine_does(gpu_server, engines):
    """REST (the openai client, whole and streamed) and gRPC (the generated stubs) against the CPU engine."""
    import grpc
    import openai

    from collab_decode.serve.grpc_gen import collab_decode_pb2 as pb
    from collab_decode.serve.grpc_gen import collab_decode_pb2_grpc as pb_grpc

    cpu = engines[1]
    want = cpu.generate([chat_prompt(MARBLES)], greedy(), "neural")[0]
    assert want.text.rstrip().endswith("445.")
    client = openai.OpenAI(base_url=gpu_server.url + "/v1", api_key="none")
    messages = [{"role": "user", "content": MARBLES}]
    model = client.models.list().data[0].id
    got = client.chat.completions.create(model=model, messages=messages, max_tokens=400, temperature=0,
                                         extra_body={"routing": "neural"})
    assert got.choices[0].message.content == want.text
    chunks = client.chat.completions.create(model=model, messages=messages, max_tokens=400, temperature=0,
                                            stream=True, extra_body={"routing": "neural"})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    with grpc.insecure_channel(gpu_server.grpc_target) as channel:
        reply = pb_grpc.CollabDecodeStub(channel).Generate(pb.GenerateRequest(
            chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=MARBLES)]),
            sampling=pb.SamplingParams(max_tokens=400, temperature=0), routing="neural"), timeout=120)
    assert list(reply.token_ids) == want.token_ids
