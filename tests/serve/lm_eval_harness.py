"""lm-evaluation-harness against a real `collab-decode serve --pair demo`, for tests/serve/test_lm_eval.py.

lm-eval lives in its own virtual environment, as vLLM does (tests/backends/vllm_server.py): it pulls
`datasets`, `evaluate`, scikit-learn and their pins, none of which the project needs. `lm_eval[api]` (the
OpenAI-compatible client models; no torch) plus `transformers` (its Hugging Face tokenizer backend) install
in about a minute, once, cached in ~/.cache/collab-decode (or $COLLAB_DECODE_LM_EVAL_VENV).

The tasks are local: held-out demo problems written as JSONL beside two task YAMLs (lm-eval's `json`
dataset builder reads them; nothing is downloaded, and the harness runs with the Hugging Face hub offline):
  demo_arith_gen  generate_until: the worked solution, the number after "answer is" must equal the answer
  demo_arith_mc   multiple_choice (loglikelihood): the solution up to where a step restates its amount
                  ("(b) Then she gives away"), then that amount or another number of the question (its start
                  or another step's amount). Copying the amount by its tag is where the small demo model goes
                  wrong: scored by the large model 100% of 100 such problems are right, by the small one 40%
                  (chance: about 30%). So the task also checks that the large model scores by default.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path


from collab_decode.demo.task import Problem, problems
from collab_decode.demo.tokenizer import EOS, chat_prompt
from tests.cached_venv import ensure_venv

LM_EVAL_PACKAGES = ("lm_eval[api]==0.4.13", "transformers")
VENV = Path(os.environ.get("COLLAB_DECODE_LM_EVAL_VENV", Path.home() / ".cache" / "collab-decode" / "lm-eval-0.4.13"))
GEN_TASK, MC_TASK = "demo_arith_gen", "demo_arith_mc"
MAX_GEN_TOKENS = 400  # the longest worked solution is ~320 tokens (collab_decode.demo.evaluate)


def ensure_lm_eval_python() -> Path:
    """The python of the cached lm-eval environment, built on first use (tests/cached_venv.py)."""
    return ensure_venv(VENV, LM_EVAL_PACKAGES, "lm_eval.models.openai_completions, transformers")


# ---- the tasks --------------------------------------------------------------------------------------
_STEP_AMOUNT = re.compile(r"\((?:a|b|c)\) [^\n]*? (\d+), so")  # "(b) Then she gives away 86, so we ..."


def mc_doc(problem: Problem, rng: random.Random) -> dict:
    """The solution up to one step's amount; choices: that amount and up to three other numbers of the question."""
    step = rng.choice(list(_STEP_AMOUNT.finditer(problem.solution)))
    context = chat_prompt(problem.question) + problem.solution[:step.start(1) - 1]  # ends before " 86,"
    amount = step.group(1)
    others = [n for n in dict.fromkeys(re.findall(r"\d+", problem.question)) if n != amount]
    numbers = [amount, *rng.sample(others, min(3, len(others)))]
    rng.shuffle(numbers)
    return {"context": context, "choices": [f"{n}," for n in numbers], "label": numbers.index(amount)}


def write_tasks(root: Path, num_gen: int, num_mc: int, offset: int = 5000) -> Path:
    """JSONL data and task YAMLs (JSON, which YAML reads) under root; returns the --include_path folder."""
    gen = [{"prompt": chat_prompt(p.question), "answer": str(p.answer)} for p in problems("heldout", num_gen, offset)]
    rng = random.Random(0)
    mc = [mc_doc(p, rng) for p in problems("heldout", num_mc, offset + num_gen)]
    for name, docs in (("gen", gen), ("mc", mc)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    data = {"dataset_path": "json", "test_split": "test"}
    tasks = {
        GEN_TASK: {**data, "dataset_kwargs": {"data_files": {"test": str(root / "gen.jsonl")}},
                   "output_type": "generate_until", "doc_to_text": "prompt", "doc_to_target": "answer",
                   "generation_kwargs": {"until": [EOS], "max_gen_toks": MAX_GEN_TOKENS, "do_sample": False,
                                         "temperature": 0},
                   "filter_list": [{"name": "answer", "filter": [
                       {"function": "regex", "regex_pattern": r"answer is (-?[0-9]+)"}, {"function": "take_first"}]}],
                   "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]},
        MC_TASK: {**data, "dataset_kwargs": {"data_files": {"test": str(root / "mc.jsonl")}},
                  "output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
                  "doc_to_target": "label",
                  "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
    }
    for name, config in tasks.items():
        (root / f"{name}.yaml").write_text(json.dumps({"task": name, **config}, indent=1))
    return root


def lm_eval_command(python: Path, base_url: str, tokenizer_dir: Path, include_path: Path, output_path: Path,
                    batch_size: int) -> list[str]:
    """`lm_eval run` with the local-completions model (token-id prompts, the demo tokenizer) on both tasks."""
    model_args = (f"base_url={base_url}/v1/completions,model=demo,tokenizer={tokenizer_dir},"
                  f"tokenizer_backend=huggingface,max_length=512,max_retries=1")
    return [str(python), "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
            "--tasks", f"{GEN_TASK},{MC_TASK}", "--include_path", str(include_path), "--batch_size", str(batch_size),
            "--output_path", str(output_path)]


def offline_env(home: Path) -> dict[str, str]:
    """lm-eval's environment: the hub off, caches under `home`."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(home / "hf"),
            "TOKENIZERS_PARALLELISM": "false", "OPENAI_API_KEY": "unused"}


def read_results(output_path: Path) -> dict:
    """The results JSON lm-eval wrote: task -> {metric: value}."""
    found = sorted(output_path.rglob("results_*.json"))
    if not found:
        raise AssertionError(f"lm-eval wrote no results under {output_path}")
    return json.loads(found[-1].read_text())["results"]
