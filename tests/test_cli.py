"""`collab-decode generate` as a user runs it: real model directories, JSON out, every flag's effect checked
against transformers (greedy generate from the same token ids) and the tokenizer's decode.

One run is a subprocess (what a user types); the others call `main(argv)` in this process, the same code path
without paying a torch import per run.
"""

from __future__ import annotations

import json
from pathlib import Path
import os
import re
import subprocess
import sys

import pytest
import torch

from collab_decode.cli import HIGHLIGHT, RESET, build_parser, main
from collab_decode.engine.args import engine_from_args
from collab_decode.routing import parse_routing
from tests.backends.test_remote_cli import REMOTE_FLAGS_CHECKED
from tests.utils import make_pair, save_lm_with_swapped_ids

PROMPT = "Ann has 3"  # the tiny small and large models continue it differently
EOS = 0  # the demo tokenizer's <|endoftext|>: eos of the tiny models and the demo pair


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "collab_decode.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """main(argv) in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def cli_json(capsys, *args: str) -> dict:
    code, out, err = cli(capsys, "generate", *args, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def demo():
    from collab_decode.demo import checkpoint_dir
    from collab_decode.demo.task import problems
    from collab_decode.demo.tokenizer import chat_prompt

    question = problems("heldout", 1)[0].question
    return checkpoint_dir("small"), checkpoint_dir("large"), question, chat_prompt(question)


def prompt_ids(model_dir, prompt: str) -> list[int]:
    """The ids the CLI feeds the engine: the model's tokenizer, special tokens added (as without --chat)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))(prompt)["input_ids"]


def decode(model_dir, ids: list[int]) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir)).decode(ids, skip_special_tokens=True)


def hf_greedy(model_dir, prompt: str, max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of the CLI's prompt ids, ended by EOS (kept) or max_new_tokens."""
    from transformers import AutoModelForCausalLM

    ids = prompt_ids(model_dir, prompt)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
    return out[0, len(ids):].tolist()


def hf_step_probs(model_dir, prompt: str, output: list[int]) -> torch.Tensor:
    """The model's softmax (temperature 1) at each output position, teacher-forced: (len(output), V)."""
    from transformers import AutoModelForCausalLM

    ids = prompt_ids(model_dir, prompt)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids + output])).logits[0, len(ids) - 1:-1]
    return logits.softmax(-1)


def test_generate_json_equals_transformers_greedy(pair):
    """The one subprocess run: the default policy is `small`, greedy by default, --max-tokens honoured."""
    out = run_cli("generate", "--model", str(pair[0]), "--prompt", PROMPT, "--max-tokens", "12", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    expected = hf_greedy(pair[0], PROMPT, 12)
    assert EOS not in expected  # so the output must run to --max-tokens
    assert set(result) == {"text", "token_ids", "provenance", "finish_reason", "stats"}
    assert result["token_ids"] == expected and result["finish_reason"] == "length"
    assert result["text"] == decode(pair[0], expected)
    assert result["provenance"] == ["small"] * 12
    assert result["stats"] == {"small_tokens": 12, "large_tokens": 0, "large_calls": 0, "catchup_tokens": 0,
                               "preemptions": 0, "large_waits": 0, "cached_tokens": 0, "large_share": 0.0}


def test_policies_equal_each_model_alone(capsys, pair):
    small, large = pair
    models = ["--small", small, "--large", large, "--prompt", PROMPT, "--max-tokens", "10"]
    for policy, model_dir in (("small", small), ("large", large)):
        result = cli_json(capsys, *models, "--policy", policy)
        assert result["token_ids"] == hf_greedy(model_dir, PROMPT, 10), policy
        assert result["provenance"] == [policy] * len(result["token_ids"])
        assert result["stats"]["large_share"] == (1.0 if policy == "large" else 0.0)
    # --default-policy picks the policy when --policy is not given
    result = cli_json(capsys, *models, "--default-policy", "large")
    assert result["token_ids"] == hf_greedy(large, PROMPT, 10) and result["stats"]["large_tokens"] == 10
    # a policy that mixes: provenance and stats add up
    result = cli_json(capsys, *models, "--policy", "random:0.5", "--seed", "3")
    stats = result["stats"]
    assert stats["small_tokens"] == result["provenance"].count("small") > 0
    assert stats["large_tokens"] == result["provenance"].count("large") > 0
    assert stats["large_share"] == stats["large_tokens"] / 10 and stats["large_calls"] == stats["large_tokens"]


def test_sampling_flags(capsys, pair):
    model = ["--model", pair[0], "--prompt", PROMPT, "--max-tokens", "16"]
    greedy = hf_greedy(pair[0], PROMPT, 16)
    assert EOS not in greedy

    def ids(*flags):
        return cli_json(capsys, *model, *flags)["token_ids"]

    seeded = ids("--temperature", "1", "--seed", "1")
    assert seeded == ids("--temperature", "1", "--seed", "1")  # reproducible
    assert seeded != ids("--temperature", "1", "--seed", "2")  # the seed matters
    assert seeded != greedy
    assert ids("--temperature", "0.001", "--seed", "1") == greedy  # the temperature's value matters
    assert ids("--temperature", "1", "--seed", "1", "--top-k", "1") == greedy
    assert ids("--temperature", "1", "--seed", "1", "--top-p", "1e-9") == greedy
    # top-k 5 / top-p 0.05 at temperature 1 (near-uniform tiny models): every token from the cut set
    sampled = ids("--temperature", "1", "--seed", "1", "--top-k", "5")
    probs = hf_step_probs(pair[0], PROMPT, sampled)
    assert all(t in row.topk(5).indices.tolist() for t, row in zip(sampled, probs))
    sampled = ids("--temperature", "1", "--seed", "1", "--top-p", "0.05")
    probs = hf_step_probs(pair[0], PROMPT, sampled)
    for t, row in zip(sampled, probs):  # the tokens above t hold less than top_p
        assert float(row[row > row[t]].sum()) < 0.05


def test_stop_strings_chat_and_the_demo_pair(capsys, demo):
    small, large, question, chat = demo
    reference = hf_greedy(large, chat, 400)
    text = decode(large, reference)
    assert reference[-1] == EOS
    result = cli_json(capsys, "--pair", "demo", "--policy", "large", "--prompt", chat)  # --max-tokens: the context
    assert result["token_ids"] == reference and result["text"] == text and result["finish_reason"] == "stop"
    stop = decode(large, reference[40:43])
    cut = text.index(stop)
    result = cli_json(capsys, "--pair", "demo", "--policy", "large", "--prompt", chat, "--stop", "@@@@",
                      "--stop", stop)
    assert result["text"] == text[:cut] and result["finish_reason"] == "stop"
    assert result["token_ids"] == reference[:len(result["token_ids"])]
    # --chat wraps a bare question in the chat template (its tokenization is checked elsewhere)
    result = cli_json(capsys, "--pair", "demo", "--policy", "small", "--prompt", question, "--chat",
                      "--max-tokens", "20")
    assert len(result["token_ids"]) == 20 or result["finish_reason"] == "stop"


def test_context_and_cache_limits(capsys, pair, demo):
    _, large, _, chat = demo
    n = len(prompt_ids(pair[0], PROMPT))
    # --max-model-len: the default --max-tokens is what the context leaves; a longer request is refused
    result = cli_json(capsys, "--model", pair[0], "--prompt", PROMPT, "--max-model-len", n + 7)
    assert result["token_ids"] == hf_greedy(pair[0], PROMPT, 7) and result["finish_reason"] == "length"
    code, _, err = cli(capsys, "generate", "--model", pair[0], "--prompt", PROMPT, "--max-model-len", n + 7,
                       "--max-tokens", 8)
    assert code == 2 and f"exceeds the context length {n + 7}" in err
    # KV memory is given in MiB and split into whole blocks: a request fits exactly when its tokens do
    config = json.loads((large / "config.json").read_text())
    per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"] * 4  # K, V fp32

    def capacity(mib, block_size=16):
        return (mib << 20) // (per_token * block_size) * block_size

    m = len(prompt_ids(large, chat))
    assert m < capacity(1, 100) < capacity(1) < capacity(2) < 512  # all below the model's context
    for flags, fits in [(("--small-kv-mib", 1), capacity(1)), (("--small-kv-mib", 2), capacity(2)),
                        (("--small-kv-mib", 1, "--block-size", 100), capacity(1, 100))]:
        code, _, err = cli(capsys, "generate", "--model", large, "--prompt", chat, "--max-tokens", fits - m, *flags)
        assert code == 0, (flags, err)
        code, _, err = cli(capsys, "generate", "--model", large, "--prompt", chat, "--max-tokens", fits + 1 - m, *flags)
        assert code == 2 and "more KV cache than the pools hold" in err, (flags, err)
    for total, code_expected in ((capacity(1), 0), (capacity(1) + 1, 2)):  # the large model's pool alike
        code, _, err = cli(capsys, "generate", "--pair", "demo", "--policy", "large", "--prompt", chat,
                           "--max-tokens", total - m, "--large-kv-mib", 1)
        assert code == code_expected and (code == 0 or "more KV cache than the pools hold" in err), err


def test_engine_flags_reach_the_engine(pair, tmp_path):
    """Flags whose effect a single prompt cannot show: the engine engine_from_args builds carries them."""
    from collab_decode.backends.hf import TransformersBackend
    from collab_decode.backends.native import NativeBackend

    routers = save_routers(tmp_path, 32, "one", "two")
    args = build_parser().parse_args([
        "generate", "--small", str(pair[0]), "--large", str(pair[1]), "--prompt", "x", "--backend", "transformers",
        "--dtype", "bfloat16", "--block-size", "8", "--small-kv-mib", "3", "--large-kv-mib", "5",
        "--max-num-seqs", "5", "--max-num-batched-tokens", "77", "--max-model-len", "100", "--step-delimiter", ";",
        "--default-policy", "entropy:0.5", "--router", f"first={routers[0]}", "--router", str(routers[1]),
        "--chunk-threads", "2", "--chunk-threads-max-batch", "3", "--large-wait-steps", "2",
        "--large-wait-min-batch", "5", "--no-enable-prefix-caching"])
    engine = engine_from_args(args)
    assert list(engine.router_context.routers) == ["first", "two"]  # NAME=DIR, or the directory's name
    assert all(isinstance(b, TransformersBackend) and b.dtype == torch.bfloat16 for b in engine.backends.values())
    c = engine.config
    assert (c.block_size, c.small_kv_bytes, c.large_kv_bytes, c.step_delimiter, c.default_policy) == \
        (8, 3 << 20, 5 << 20, ";", "entropy:0.5")
    assert (c.scheduler.max_num_seqs, c.scheduler.max_num_batched_tokens, c.scheduler.max_model_len) == (5, 77, 100)
    assert (c.chunk_threads, c.chunk_threads_max_batch) == (2, 3)
    assert (c.large_wait_steps, c.large_wait_min_batch) == (2, 5)
    assert not c.enable_prefix_caching
    assert engine.max_model_len == 100
    args = build_parser().parse_args(["generate", "--model", str(pair[0]), "--prompt", "x", "--compile",
                                      "--device", "cpu", "--dtype", "float16", "--max-num-batched-tokens", "9"])
    engine = engine_from_args(args, policy_needs_large=False)
    backend = engine.backends["small"]
    assert isinstance(backend, NativeBackend) and backend._compiled is not None and backend.dtype == torch.float16
    assert backend.device.type == "cpu" and "large" not in engine.backends
    assert engine.kv["small"].pool.num_blocks == (256 << 20) // (backend.kv_bytes_per_token() * 16)
    assert engine.config.enable_prefix_caching and engine.kv["small"].prefix_caching  # on unless turned off
    if not torch.cuda.is_available():  # --device reaches torch: a CUDA device is asked for
        with pytest.raises((RuntimeError, AssertionError), match="(?i)cuda"):
            engine_from_args(build_parser().parse_args(["generate", "--model", str(pair[0]), "--prompt", "x",
                                                        "--device", "cuda"]))


def test_the_demo_pair_loads_its_shipped_router_unless_routers_are_given(tmp_path):
    """`--pair demo` alone: the router requests name `demo` (router_models/demo) is loaded, and `neural` alone
    uses it; with --router, only the routers given."""
    from collab_decode.pairs import SHIPPED_ROUTERS

    args = build_parser().parse_args(["generate", "--pair", "demo", "--prompt", "x"])
    engine = engine_from_args(args)
    assert list(engine.router_context.routers) == ["demo"]
    assert engine.router_for(parse_routing("neural")).model is engine.router_context.routers["demo"].frozen
    assert SHIPPED_ROUTERS["demo"]["demo"].resolve() == (Path(__file__).parents[1] / "router_models" / "demo").resolve()
    (mine,) = save_routers(tmp_path, 64, "mine")
    args = build_parser().parse_args(["generate", "--pair", "demo", "--prompt", "x", "--router", str(mine)])
    assert list(engine_from_args(args).router_context.routers) == ["mine"]


GENERATE_FLAGS_CHECKED = {
    "--model", "--pair", "--small", "--large", "--backend", "--dtype", "--device", "--compile", "--block-size",
    "--small-kv-mib", "--large-kv-mib", "--default-policy", "--step-delimiter", "--max-num-seqs",
    "--max-num-batched-tokens", "--max-model-len", "--max-tokens", "--temperature", "--top-p", "--top-k", "--seed",
    "--stop", "--prompt", "--policy", "--chat", "--json", "--help", "--router", "--chunk-threads",
    "--chunk-threads-max-batch", "--large-wait-steps", "--large-wait-min-batch", "--enable-prefix-caching",
    "--no-enable-prefix-caching",
}


def save_routers(tmp_path, hidden_size: int, *names: str) -> list:
    """Tiny random neural router checkpoints for a small model of `hidden_size`."""
    from collab_decode.routing.neural import RouterMLP, save_router

    paths = []
    for name in names:
        save_router(tmp_path / name, RouterMLP(hidden_size, top_k=4, width=8),
                    {"hidden_size": hidden_size, "top_k": 4, "width": 8, "num_layers": 2})
        paths.append(tmp_path / name)
    return paths


def test_every_generate_flag_is_checked_here():
    """A new flag of `generate` fails this until a test above checks its effect and it joins the list."""
    gen = build_parser()._subparsers._group_actions[0].choices["generate"]
    flags = {s for a in gen._actions for s in a.option_strings if s.startswith("--")}
    # the --large-* flags are checked in tests/backends/test_remote_cli.py
    assert flags == GENERATE_FLAGS_CHECKED | REMOTE_FLAGS_CHECKED


def test_terminal_output_highlights_the_large_models_tokens(capsys, pair):
    flags = ["--small", pair[0], "--large", pair[1], "--policy", "random:0.5", "--seed", "3", "--prompt", PROMPT,
             "--max-tokens", "16"]
    result = cli_json(capsys, *flags)
    code, out, err = cli(capsys, "generate", *flags)
    assert code == 0, err
    body, summary = out.rsplit("\n\n[random:0.5] ", 1)
    assert body.replace(HIGHLIGHT, "").replace(RESET, "") == result["text"]
    pieces = re.findall(re.escape(HIGHLIGHT) + "(.*?)" + re.escape(RESET), body, re.S)
    large = [t for t, s in zip(result["token_ids"], result["provenance"]) if s == "large"]
    assert pieces == [p for p in (decode(pair[0], [t]) for t in large) if p]
    s = result["stats"]
    assert summary.startswith(f"16 tokens: {s['small_tokens']} small, {s['large_tokens']} large")


def test_bad_input_gives_a_clear_error(capsys, pair, tmp_path):
    code, _, err = cli(capsys, "generate", "--model", pair[0], "--prompt", "x", "--policy", "entropy:oops")
    assert code == 2 and "bad argument 'oops'" in err
    code, _, err = cli(capsys, "generate", "--model", tmp_path / "nope", "--prompt", "x")
    assert code == 2 and "does not exist" in err


def test_pair_with_different_tokenizers_is_refused_before_loading(capsys, pair, tmp_path):
    other = save_lm_with_swapped_ids(tmp_path / "other")
    (other / "model.safetensors").write_bytes(b"not loaded")  # would fail loudly if weights were read first
    code, _, err = cli(capsys, "generate", "--small", pair[0], "--large", other, "--policy", "large", "--prompt", "x")
    assert code == 2 and "do not share a tokenizer" in err
