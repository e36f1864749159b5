"""Training batches hold whole problems: the question a solution copies from is always in the row."""

from __future__ import annotations

from transformers import AutoTokenizer

from collab_decode.demo import checkpoint_dir
from collab_decode.demo.task import make_problem
from collab_decode.demo.tokenizer import EOS, chat_prompt
from collab_decode.demo.train import ProblemBatches


def test_rows_are_whole_problems_with_loss_on_solutions_only():
    tok = AutoTokenizer.from_pretrained(str(checkpoint_dir("small")))
    stream = ProblemBatches(tok, batch_size=4, start_index=10)
    seen = set()
    for _ in range(2 * ProblemBatches.BUCKET):  # two buckets' worth
        input_ids, labels = stream.batch()
        assert input_ids.shape == labels.shape and input_ids.shape[0] == 4
        for ids, labs in zip(input_ids.tolist(), labels.tolist()):
            text = tok.decode(ids)
            question = text.split("<|user|>\n")[1].split("\n<|assistant|>")[0]
            index = next(i for i in range(10, 10 + 8 * ProblemBatches.BUCKET) if make_problem(i).question == question)
            seen.add(index)
            p = make_problem(index)
            prompt_ids = tok(chat_prompt(p.question))["input_ids"]
            prompt_len = len(prompt_ids)
            assert ids[:prompt_len] == prompt_ids  # starts at position 0
            assert set(labs[:prompt_len]) == {-100}
            target = [t for t in labs if t != -100]
            assert tok.decode(target) == p.solution + EOS  # the whole solution, nothing of the padding
    assert seen == set(range(10, 10 + 8 * ProblemBatches.BUCKET))  # every problem once, none skipped
