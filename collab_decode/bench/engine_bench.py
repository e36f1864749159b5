"""Engine benchmark: our native engine against transformers `generate` (with its KV cache) on the same model.

Our engine runs twice: eager, and with decode steps through torch.compile (`--compile`).
For each model size (built in code, random init, Llama architecture) and batch size, all run the same
greedy decode of `max_tokens` new tokens from the same prompts, alternating (contenders and batch sizes
inside each repeat), best of `repeats`. Reports
decode tokens/s (output tokens / wall time, prefill included) and the ratios, measured side by side in
this one run. Prints a table and writes JSON.

    python -m collab_decode.bench.engine_bench [--sizes 5M 20M] [--batch-sizes 1 16] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

SIZES = {  # name -> (hidden, layers, intermediate, heads, kv heads)
    "5M": (256, 6, 768, 4, 2),
    "20M": (512, 6, 1536, 8, 4),
}


def build_model(size: str, path: Path, vocab_size: int = 512):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, inter, heads, kv = SIZES[size]
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(path))
    return model


def time_hf(model, prompts: torch.Tensor, max_tokens: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=max_tokens,
                       min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def time_native(engine, prompts: torch.Tensor, max_tokens: int) -> float:
    from collab_decode.sampling import SamplingParams

    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    results = engine.generate(prompts.tolist(), sampling)
    elapsed = time.perf_counter() - start
    assert all(len(r.token_ids) == max_tokens for r in results)
    return elapsed


class _IdTokenizer:
    """The engine needs only these from a tokenizer when prompts are token ids."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.eos_token_id = vocab_size, None

    def __len__(self):
        return self.vocab_size

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def run(sizes: list[str], batch_sizes: list[int], prompt_len: int, max_tokens: int, repeats: int) -> list[dict]:
    from collab_decode.backends.native import NativeBackend
    from collab_decode.bench.measure import timed_config
    from collab_decode.engine.engine import Engine

    rows = []
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            hf_model = build_model(size, Path(tmp))
            engines = {}
            for mode, compile in (("native", False), ("native_compiled", True)):
                backend = NativeBackend.from_pretrained(tmp, compile=compile)
                engines[mode] = Engine(backend, _IdTokenizer(backend.vocab_size),
                                       timed_config(small_kv_bytes=512 << 20))
            num_params = sum(p.numel() for p in hf_model.parameters())
            prompts = {batch: torch.randint(1, 512, (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
                       for batch in batch_sizes}
            for batch in batch_sizes:  # warm up (and compile)
                time_hf(hf_model, prompts[batch][:, :8], 4)
                for engine in engines.values():
                    time_native(engine, prompts[batch], 8)
            times = {batch: {"hf": [], **{mode: [] for mode in engines}} for batch in batch_sizes}
            for repeat in range(repeats):
                # alternate contenders and batch sizes, so a busy moment of this shared machine hits every
                # figure that a ratio is taken between
                for batch in batch_sizes:
                    times[batch]["hf"].append(time_hf(hf_model, prompts[batch], max_tokens))
                    for mode, engine in engines.items():
                        times[batch][mode].append(time_native(engine, prompts[batch], max_tokens))
                print(f"{size}: repeat {repeat + 1}/{repeats} done", flush=True)
            for batch in batch_sizes:
                row = {"size": size, "num_params": num_params, "batch": batch, "prompt_len": prompt_len,
                       "max_tokens": max_tokens, "threads": torch.get_num_threads()}
                for mode, seconds in times[batch].items():
                    row[f"{mode}_tokens_per_s"] = round(batch * max_tokens / min(seconds), 1)
                for mode in engines:
                    row[f"{mode}_over_hf"] = round(row[f"{mode}_tokens_per_s"] / row["hf_tokens_per_s"], 2)
                rows.append(row)
                print(f"{size:>4} ({num_params / 1e6:.1f}M) batch {batch:>2}: "
                      f"transformers {row['hf_tokens_per_s']:8.1f} tok/s"
                      + "".join(f"  {m} {row[f'{m}_tokens_per_s']:8.1f} tok/s ({row[f'{m}_over_hf']:.2f}x)"
                                for m in engines),
                      flush=True)
    for size in sizes:
        by_batch = {r["batch"]: r for r in rows if r["size"] == size}
        if 1 in by_batch and len(by_batch) > 1:
            top = max(by_batch)
            for mode in ("native", "native_compiled"):
                scale = by_batch[top][f"{mode}_tokens_per_s"] / by_batch[1][f"{mode}_tokens_per_s"]
                print(f"{size}: {mode} batch-{top} aggregate / batch-1 = {scale:.2f}x")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench_results/engine_bench.json")
    args = parser.parse_args(argv)
    rows = run(args.sizes, args.batch_sizes, args.prompt_len, args.max_tokens, args.repeats)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
