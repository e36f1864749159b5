"""Model cards of the demo checkpoints, written from their training log and measured evaluation.

    python -m collab_decode.demo.card --which large --eval-json eval_large.json
(`eval_large.json` is the output of `collab-decode demo eval --model large --num-problems 500 --json`.)
"""

from __future__ import annotations

import argparse
import json

from collab_decode.demo import checkpoint_dir


def render(which: str, log: dict, evaluation: dict, vocab_size: int, notes: str = "") -> str:
    spec = log["spec"]
    steps, tokens, minutes = (log.get(f"total_{k}", log[k]) for k in ("steps", "tokens_seen", "minutes"))
    history = "\n".join(f"| {h['step']} | {h['minutes']} | {h['loss']:.3f} | {h['val_accuracy']:.0%} |"
                        for h in log.get("history", []))
    return f"""# collab-decode demo {which} model

A Llama-architecture causal LM trained from scratch on collab-decode's synthetic word problems
(`collab_decode/demo/task.py`): 2-3 tagged additions and subtractions of numbers up to 3 digits,
solved column by column in text. The demo pair's {which} model; its partner shares the tokenizer.

| | |
|---|---|
| parameters | {log['num_params']:,} |
| layers / hidden / MLP | {spec['num_hidden_layers']} / {spec['hidden_size']} / {spec['intermediate_size']} |
| heads / kv heads / head dim | {spec['num_attention_heads']} / {spec['num_key_value_heads']} / {spec['head_dim']} |
| tokenizer | byte-level BPE, {vocab_size} tokens, one token per digit, chat template |
| training | {steps} steps of {spec['batch_size']} whole problems, AdamW lr {spec['learning_rate']}, cosine on wall-clock time; {tokens:,} tokens with padding, training problems from seed 0 on; {minutes} min on 2 CPU cores |
| seed | {log['seed']} |

## Measured accuracy

Greedy, exact final answer, held-out problems {evaluation['offset']}..{evaluation['offset'] + evaluation['num_problems'] - 1}
(seeds from 1,000,000,000; never trained on): **{evaluation['accuracy']:.1%}** ({evaluation['num_correct']}/{evaluation['num_problems']}).

    collab-decode demo eval --model {which} --num-problems {evaluation['num_problems']} --json

## Validation during training (held-out problems 500000..500099)

| step | minutes | loss | accuracy |
|---|---|---|---|
{history}

{notes}

## Reproduce

    collab-decode demo train --which {which} --seed {log['seed']}

Training stops at its wall-clock budget or when validation accuracy reaches {spec['stop_accuracy']:.0%};
on a busy machine fewer steps run in the same budget. Loadable with
`AutoModelForCausalLM.from_pretrained` and with collab-decode's own loader.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--which", required=True, choices=["small", "large"])
    parser.add_argument("--eval-json", required=True)
    parser.add_argument("--notes", default="", help="extra Markdown for the card (e.g. how the run went)")
    args = parser.parse_args(argv)
    path = checkpoint_dir(args.which)
    log = json.loads((path / "train_log.json").read_text())
    evaluation = json.loads(open(args.eval_json).read())
    vocab_size = json.loads((path / "config.json").read_text())["vocab_size"]
    (path / "README.md").write_text(render(args.which, log, evaluation, vocab_size, args.notes))
    print(f"wrote {path / 'README.md'}")


if __name__ == "__main__":
    main()
