"""Engine benchmark: our native engine against transformers `generate` (with its KV cache) on the same model.

For each model size (built in code, random init, Llama architecture) and batch size, both run the same
greedy decode of `max_tokens` new tokens from the same prompts, alternating, best of `repeats`. Reports
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
    from collab_decode.engine.config import EngineConfig
    from collab_decode.engine.engine import Engine

    rows = []
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            hf_model = build_model(size, Path(tmp))
            backend = NativeBackend.from_pretrained(tmp)
            engine = Engine(backend, _IdTokenizer(backend.vocab_size), EngineConfig(small_kv_bytes=512 << 20))
            num_params = sum(p.numel() for p in hf_model.parameters())
            for batch in batch_sizes:
                prompts = torch.randint(1, 512, (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
                time_native(engine, prompts[:, :8], 4)  # warm up both
                time_hf(hf_model, prompts[:, :8], 4)
                hf_s, native_s = [], []
                for _ in range(repeats):
                    hf_s.append(time_hf(hf_model, prompts, max_tokens))
                    native_s.append(time_native(engine, prompts, max_tokens))
                row = {"size": size, "num_params": num_params, "batch": batch, "prompt_len": prompt_len,
                       "max_tokens": max_tokens, "threads": torch.get_num_threads(),
                       "hf_tokens_per_s": round(batch * max_tokens / min(hf_s), 1),
                       "native_tokens_per_s": round(batch * max_tokens / min(native_s), 1)}
                row["native_over_hf"] = round(row["native_tokens_per_s"] / row["hf_tokens_per_s"], 2)
                rows.append(row)
                print(f"{size:>4} ({num_params / 1e6:.1f}M) batch {batch:>2}: native {row['native_tokens_per_s']:8.1f} tok/s"
                      f"  transformers {row['hf_tokens_per_s']:8.1f} tok/s  ratio {row['native_over_hf']:.2f}x", flush=True)
    for size in sizes:
        by_batch = {r["batch"]: r for r in rows if r["size"] == size}
        if 1 in by_batch and len(by_batch) > 1:
            top = max(by_batch)
            scale = by_batch[top]["native_tokens_per_s"] / by_batch[1]["native_tokens_per_s"]
            print(f"{size}: native batch-{top} aggregate / batch-1 = {scale:.2f}x")
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
