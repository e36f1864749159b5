"""The demo pair's tokenizer: a small byte-level BPE in Hugging Face format, with a chat template.

Every digit is one token with one id wherever it stands (a space before a number is a token of its
own), so arithmetic is done digit by digit, as the worked solutions are, and copying a number is
copying the same ids;
common words and phrases of the task become merged tokens. Byte-level, so any text round-trips.
"""

from __future__ import annotations

from pathlib import Path

from collab_decode.demo.task import problems

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|system|>", "<|user|>", "<|assistant|>"]
VOCAB_SIZE = 512
NUM_TRAINING_PROBLEMS = 3000

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def chat_prompt(question: str) -> str:
    """The chat-template rendering of one user question with the generation prompt (no tokenizer needed)."""
    return f"<|user|>\n{question}\n<|assistant|>\n"


def build_tokenizer(out_dir: str | Path) -> None:
    """Train the BPE on training-split problems and save it as a Hugging Face tokenizer in `out_dir`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        # every digit is its own piece: " 909" -> " ", "9", "0", "9"
        pre_tokenizers.Split(Regex(r"[0-9]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [chat_prompt(p.question) + p.solution for p in problems("train", NUM_TRAINING_PROBLEMS)]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1024
    fast.save_pretrained(str(out_dir))
