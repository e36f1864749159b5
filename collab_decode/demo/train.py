"""Train the demo pair on the CPU: `collab-decode demo train [--which small|large|both]`.

Data flow: task.problems('train') -> chat-formatted text -> batches of whole problems, one per
padded row (loss only on solution tokens) -> LlamaForCausalLM (transformers) with AdamW and a cosine
schedule -> periodic greedy accuracy on validation problems (held-out seeds, a slice apart from the
one `demo eval` reports on) -> save_pretrained (safetensors + config + tokenizer) and a train log.

Both models are real Hugging Face Llama checkpoints. Deterministic for a seed and thread count,
up to the wall-clock budget, which decides how many steps run.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from collab_decode.demo.task import make_problem
from collab_decode.demo.tokenizer import EOS, build_tokenizer, chat_prompt

RUN_TOTALS = ("steps", "tokens_seen", "minutes")  # summed over the runs that led to a checkpoint (--resume)
VALIDATION_OFFSET = 500_000  # held-out problems [offset, offset + n) guide training; `demo eval` uses [0, n)


@dataclass(frozen=True)
class DemoModelSpec:
    """Architecture and training budget of one demo model."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    learning_rate: float
    max_minutes: float  # wall-clock training budget
    stop_accuracy: float  # stop early once validation accuracy reaches this
    eval_every_minutes: float  # validation interval; short for the small model, which must stop in time
    batch_size: int = 8


SPECS = {
    # head_dim 64 so that vLLM's CPU attention can serve the large model (see DESIGN.md).
    # Depth sets batch-1 decode latency on the CPU more than width does: 7 layers against 2 narrow ones
    # gives the >= 4x large/small latency ratio the demo needs.
    "large": DemoModelSpec(256, 768, 7, 4, 2, 64, learning_rate=2e-3, max_minutes=95, stop_accuracy=0.99,
                           eval_every_minutes=8),
    "small": DemoModelSpec(64, 256, 2, 2, 1, 64, learning_rate=3e-3, max_minutes=12, stop_accuracy=0.50,
                           eval_every_minutes=1.5),
}


def llama_config(spec: DemoModelSpec, vocab_size: int, eos_token_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, head_dim=spec.head_dim,
        max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
    )


class ProblemBatches:
    """Training problems as padded batches of whole problems, one per row, each starting at position 0
    as it does when served; labels are -100 on the prompt and on padding.

    A problem never straddles two rows: the solution copies its amounts from the question, which must
    be in view. Problems are drawn `BUCKET` batches at a time and sorted by length before batching, so
    rows of a batch have similar lengths and little compute goes to padding.
    """

    BUCKET = 8

    def __init__(self, tokenizer, batch_size: int, start_index: int = 0):
        self.tokenizer, self.batch_size, self.next_index = tokenizer, batch_size, start_index
        self.pad_id = tokenizer.eos_token_id
        self.ready: list[list[tuple[list[int], list[int]]]] = []

    def _problem(self) -> tuple[list[int], list[int]]:
        p = make_problem(self.next_index)
        self.next_index += 1
        prompt_ids = self.tokenizer(chat_prompt(p.question))["input_ids"]
        solution_ids = self.tokenizer(p.solution + EOS)["input_ids"]
        return prompt_ids + solution_ids, [-100] * len(prompt_ids) + solution_ids

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.ready:
            rows = sorted((self._problem() for _ in range(self.BUCKET * self.batch_size)), key=lambda r: len(r[0]))
            batches = [rows[i: i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
            random.Random(self.next_index).shuffle(batches)  # seeded by position in the stream: deterministic
            self.ready = batches
        rows = self.ready.pop()
        width = max(len(ids) for ids, _ in rows)
        input_ids = [ids + [self.pad_id] * (width - len(ids)) for ids, _ in rows]
        labels = [lab + [-100] * (width - len(lab)) for _, lab in rows]
        return torch.tensor(input_ids), torch.tensor(labels)


@torch.no_grad()
def greedy_accuracy(model, tokenizer, num: int, offset: int = 0) -> float:
    """Greedy exact-match accuracy on held-out problems [offset, offset + num), run by our own engine on a
    snapshot of the model (batched, fast)."""
    from collab_decode.demo.evaluate import evaluate
    from collab_decode.engine.loading import build_engine

    with tempfile.TemporaryDirectory() as snapshot:
        _save(model, tokenizer, Path(snapshot))
        return evaluate(build_engine(snapshot), num, offset, progress=False)["accuracy"]


def train_one(which: str, out_dir: Path, tokenizer_dir: Path, seed: int, num_val: int,
              max_minutes: float | None = None, resume: bool = False, learning_rate: float | None = None) -> dict:
    """Train the `which` model and save it to out_dir/which. Returns the training log."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    spec = SPECS[which]
    if learning_rate is not None:
        spec = replace(spec, learning_rate=learning_rate)
    budget_s = 60 * (max_minutes if max_minutes is not None else spec.max_minutes)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    if resume and (out_dir / which / "model.safetensors").is_file():
        # continue from the saved checkpoint with a fresh schedule (optimizer state is not saved)
        model = LlamaForCausalLM.from_pretrained(str(out_dir / which))
        log_file = out_dir / which / "train_log.json"
        previous = json.loads(log_file.read_text()) if log_file.is_file() else {}
        start_index = previous.get("problems_seen", 0)
    else:
        model, start_index = LlamaForCausalLM(llama_config(spec, len(tokenizer), tokenizer.eos_token_id)), 0
        previous = {}
    num_params = sum(p.numel() for p in model.parameters())
    print(f"[{which}] {num_params / 1e6:.2f}M parameters, budget {budget_s / 60:.0f} min", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, betas=(0.9, 0.95), weight_decay=0.1)
    stream = ProblemBatches(tokenizer, spec.batch_size, start_index)
    tokens_seen = 0
    warmup = 100
    history, step, start = [], 0, time.time()
    last_eval, best = start, -1.0
    model.train()
    while True:
        # the cosine schedule runs on wall-clock time, so a busy machine shortens training, not the schedule
        elapsed = time.time() - start
        lr_scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, elapsed / budget_s))))
        for group in opt.param_groups:
            group["lr"] = spec.learning_rate * lr_scale
        input_ids, labels = stream.batch()
        tokens_seen += input_ids.numel()
        loss = model(input_ids=input_ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 10 == 0:
            tok_s = tokens_seen / (time.time() - start)
            print(f"[{which}] step {step} loss {loss.item():.4f} lr {spec.learning_rate * lr_scale:.2e}"
                  f" {tok_s:.0f} tok/s {elapsed / 60:.1f} min", flush=True)
        out_of_time = time.time() - start >= budget_s
        if time.time() - last_eval >= 60 * spec.eval_every_minutes or out_of_time:
            acc = greedy_accuracy(model, tokenizer, num_val, VALIDATION_OFFSET)
            last_eval = time.time()
            history.append({"step": step, "minutes": round((last_eval - start) / 60, 2), "loss": loss.item(),
                            "val_accuracy": acc, "problems_seen": stream.next_index})
            print(f"[{which}] step {step} validation accuracy {acc:.3f} ({num_val} problems)", flush=True)
            best = max(best, acc)
            # always keep the latest weights: a run cut short (or continued with --resume) starts from here
            _save(model, tokenizer, out_dir / which)
            (out_dir / which / "train_log.json").write_text(json.dumps(
                {"model": which, "problems_seen": stream.next_index, "history": history, **previous_totals(previous)},
                indent=2))
            if acc >= spec.stop_accuracy or out_of_time:
                break
    log = {"model": which, "spec": asdict(spec), "num_params": num_params, "seed": seed, "steps": step,
           "problems_seen": stream.next_index, "tokens_seen": tokens_seen,
           "minutes": round((time.time() - start) / 60, 2), "best_val_accuracy": best, "history": history}
    # totals over every run that led to this checkpoint (a resumed run continues an earlier one)
    before = previous_totals(previous)
    for key in RUN_TOTALS:
        log[f"total_{key}"] = round(before[f"total_{key}"] + log[key], 2)
    log["runs"] = before["runs"] + [{k: log[k] for k in RUN_TOTALS}]
    (out_dir / which / "train_log.json").write_text(json.dumps(log, indent=2))
    return log


def previous_totals(previous: dict) -> dict:
    """The totals of the runs before this one, so a checkpoint saved mid-run keeps its history."""
    out = {f"total_{k}": previous.get(f"total_{k}", previous.get(k, 0)) for k in RUN_TOTALS}
    return {**out, "runs": previous.get("runs", [])}


def _save(model, tokenizer, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))


def train_demo_pair(out_dir: str | Path, which: str = "both", seed: int = 0, threads: int = 2, num_val: int = 100,
                    max_minutes: float | None = None, resume: bool = False,
                    learning_rate: float | None = None) -> list[dict]:
    """Build the tokenizer and train the requested demo model(s) into out_dir/{small,large}."""
    torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    tokenizer_dir = Path(tempfile.mkdtemp(prefix="collab-decode-tokenizer-"))
    build_tokenizer(tokenizer_dir)
    names = ["small", "large"] if which == "both" else [which]
    logs = [train_one(n, out_dir, tokenizer_dir, seed, num_val, max_minutes, resume, learning_rate) for n in names]
    shutil.rmtree(tokenizer_dir)
    return logs
