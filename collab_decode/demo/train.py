"""Train the demo pair on the CPU: `collab-decode demo train [--which small|large|both]`.

Data flow: task.problems('train') -> chat-formatted text -> token stream packed into fixed-length
rows (loss only on solution tokens) -> LlamaForCausalLM (transformers) with AdamW and a cosine
schedule -> periodic greedy accuracy on validation problems (held-out seeds, a slice apart from the
one `demo eval` reports on) -> save_pretrained (safetensors + config + tokenizer) and a train log.

Both models are real Hugging Face Llama checkpoints. Deterministic for a seed and thread count,
up to the wall-clock budget, which decides how many steps run.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from collab_decode.demo.task import make_problem
from collab_decode.demo.tokenizer import EOS, build_tokenizer, chat_prompt

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
    batch_size: int = 8
    seq_len: int = 256


SPECS = {
    # head_dim 64 so that vLLM's CPU attention can serve the large model (see DESIGN.md).
    "large": DemoModelSpec(256, 768, 6, 4, 2, 64, learning_rate=2e-3, max_minutes=55, stop_accuracy=0.99),
    "small": DemoModelSpec(128, 384, 2, 2, 1, 64, learning_rate=3e-3, max_minutes=12, stop_accuracy=0.60),
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


class PackedStream:
    """Training problems as packed (input_ids, labels) rows; labels are -100 on prompt tokens."""

    def __init__(self, tokenizer, seq_len: int, start_index: int = 0):
        self.tokenizer, self.seq_len, self.next_index = tokenizer, seq_len, start_index
        self.ids: list[int] = []
        self.labels: list[int] = []

    def _add_problem(self) -> None:
        p = make_problem(self.next_index)
        self.next_index += 1
        prompt_ids = self.tokenizer(chat_prompt(p.question))["input_ids"]
        solution_ids = self.tokenizer(p.solution + EOS)["input_ids"]
        self.ids += prompt_ids + solution_ids
        self.labels += [-100] * len(prompt_ids) + solution_ids

    def batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows_ids, rows_labels = [], []
        for _ in range(batch_size):
            while len(self.ids) < self.seq_len:
                self._add_problem()
            rows_ids.append(self.ids[: self.seq_len])
            rows_labels.append(self.labels[: self.seq_len])
            del self.ids[: self.seq_len], self.labels[: self.seq_len]
        return torch.tensor(rows_ids), torch.tensor(rows_labels)


@torch.no_grad()
def greedy_accuracy(model, tokenizer, split: str, num: int, offset: int = 0) -> float:
    """Greedy exact-match accuracy, run by our own engine on a snapshot of the model (batched, fast)."""
    from collab_decode.demo.evaluate import evaluate
    from collab_decode.engine.loading import build_engine

    with tempfile.TemporaryDirectory() as snapshot:
        _save(model, tokenizer, Path(snapshot))
        engine = build_engine(snapshot)
        if split != "heldout":
            raise ValueError(f"validation uses held-out problems, got split {split!r}")
        return evaluate(engine, num, offset, progress=False)["accuracy"]


def train_one(which: str, out_dir: Path, tokenizer_dir: Path, seed: int, num_val: int, eval_every_s: float,
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
    stream = PackedStream(tokenizer, spec.seq_len, start_index)
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
        input_ids, labels = stream.batch(spec.batch_size)
        loss = model(input_ids=input_ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 10 == 0:
            tok_s = step * spec.batch_size * spec.seq_len / (time.time() - start)
            print(f"[{which}] step {step} loss {loss.item():.4f} lr {spec.learning_rate * lr_scale:.2e}"
                  f" {tok_s:.0f} tok/s {elapsed / 60:.1f} min", flush=True)
        out_of_time = time.time() - start >= budget_s
        if time.time() - last_eval >= eval_every_s or out_of_time:
            acc = greedy_accuracy(model, tokenizer, "heldout", num_val, VALIDATION_OFFSET)
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
           "problems_seen": stream.next_index, "tokens_seen": step * spec.batch_size * spec.seq_len,
           "minutes": round((time.time() - start) / 60, 2), "best_val_accuracy": best, "history": history}
    # totals over every run that led to this checkpoint (a resumed run continues an earlier one)
    for key in ("steps", "tokens_seen", "minutes"):
        log[f"total_{key}"] = round(previous.get(f"total_{key}", previous.get(key, 0)) + log[key], 2)
    log["runs"] = previous.get("runs", []) + [{k: log[k] for k in ("steps", "tokens_seen", "minutes")}]
    (out_dir / which / "train_log.json").write_text(json.dumps(log, indent=2))
    return log


def previous_totals(previous: dict) -> dict:
    """The totals of the runs before this one, so a checkpoint saved mid-run keeps its history."""
    out = {f"total_{k}": previous.get(f"total_{k}", previous.get(k, 0)) for k in ("steps", "tokens_seen", "minutes")}
    return {**out, "runs": previous.get("runs", [])}


def _save(model, tokenizer, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))


def train_demo_pair(out_dir: str | Path, which: str = "both", seed: int = 0, threads: int = 2, num_val: int = 100,
                    eval_every_minutes: float = 8.0, max_minutes: float | None = None, resume: bool = False,
                    learning_rate: float | None = None) -> list[dict]:
    """Build the tokenizer and train the requested demo model(s) into out_dir/{small,large}."""
    torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    tokenizer_dir = Path(tempfile.mkdtemp(prefix="collab-decode-tokenizer-"))
    build_tokenizer(tokenizer_dir)
    names = ["small", "large"] if which == "both" else [which]
    logs = [train_one(n, out_dir, tokenizer_dir, seed, num_val, 60 * eval_every_minutes, max_minutes, resume,
                      learning_rate) for n in names]
    shutil.rmtree(tokenizer_dir)
    return logs
