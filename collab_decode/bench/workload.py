"""What a benchmark sends: prompts as token ids, with a checker for each answer (the demo task's problems).

Engine runs and server runs send the same token ids (the server takes them as they are), so both see
the same requests and their outputs are judged by the same checker.
"""

from __future__ import annotations

from dataclasses import dataclass

from collab_decode.sampling import SamplingParams

MAX_SOLUTION_TOKENS = 400  # the demo task's longest worked solution is ~320 tokens


@dataclass(frozen=True)
class Workload:
    prompt_ids: list[list[int]]  # one prompt per problem
    answers: list[int]  # the right final answer of each problem
    max_tokens: int = MAX_SOLUTION_TOKENS

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def sampling(self) -> SamplingParams:
        """Greedy, so a policy's answers (and its accuracy) do not depend on the run."""
        return SamplingParams(max_tokens=self.max_tokens, temperature=0.0)

    def request(self, i: int) -> list[int]:
        """The i-th request's prompt: requests past the last problem start over from the first."""
        return self.prompt_ids[i % len(self)]

    def is_correct(self, i: int, text: str) -> bool:
        from collab_decode.demo.task import is_correct

        return is_correct(text, self.answers[i % len(self)])


def demo_workload(tokenizer, num_problems: int, offset: int = 0, max_tokens: int = MAX_SOLUTION_TOKENS) -> Workload:
    """Held-out demo problems [offset, offset + num_problems) as the chat prompts the demo models answer."""
    from collab_decode.demo.task import problems
    from collab_decode.demo.tokenizer import chat_prompt

    probs = problems("heldout", num_problems, offset)
    prompts = [tokenizer(chat_prompt(p.question), add_special_tokens=False)["input_ids"] for p in probs]
    return Workload(prompts, [p.answer for p in probs], max_tokens)
