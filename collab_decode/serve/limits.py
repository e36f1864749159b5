"""What one request may ask of the server, checked before it costs anything: REST and gRPC share these.

    body bytes (REST: Content-Length and the bytes actually read; gRPC: the message size)
    -> prompt characters (before tokenizing) -> prompt tokens -> max_tokens, stop strings, messages
    -> how long it may run (request_timeout_s: then it ends with an error and its blocks are freed)

Each field's `help` metadata documents its `serve` flag (serve/cli.py derives the flags from it).
Every check raises InvalidRequest (HTTP 400, gRPC INVALID_ARGUMENT) naming the field and the limit.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from collab_decode.serve.requests import InvalidRequest, chat_prompt_ids, text_prompt_ids

MIB = 1 << 20
# Prompts shorter than this are tokenized on the event loop: a thread hop costs more than the tokenizer.
INLINE_TOKENIZE_CHARS = 4096
INLINE_DECODE_TOKENS = 1024  # likewise for tokens to decode


def _doc(help: str, flag_type: type = int) -> dict:
    return {"help": help, "type": flag_type}


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = field(default=8 * MIB, metadata=_doc(
        "largest request body in bytes, by Content-Length and by the bytes read (HTTP 413); also gRPC's largest "
        "message"))
    max_prompt_chars: int = field(default=1_000_000, metadata=_doc(
        "most characters in a prompt (chat: all messages together), checked before tokenizing"))
    max_prompt_tokens: int | None = field(default=None, metadata=_doc(
        "most prompt tokens (default: whatever fits the context)"))
    max_output_tokens: int | None = field(default=None, metadata=_doc(
        "largest max_tokens a request may ask for (default: what the context leaves)"))
    max_stop: int = field(default=16, metadata=_doc("most stop strings (and most stop_token_ids) per request"))
    max_stop_chars: int = field(default=256, metadata=_doc("longest stop string, in characters"))
    max_messages: int = field(default=1024, metadata=_doc("most messages in one chat request"))
    request_timeout_s: float = field(default=600.0, metadata=_doc(
        "longest a request may run, queued or decoding, before it ends with an error and frees its KV blocks "
        "(0: no limit)", float))
    header_timeout_s: float = field(default=10.0, metadata=_doc(
        "longest a connection may take to send a request's headers, from its opening or the end of its last "
        "response (then it is closed)", float))
    idle_timeout_s: float = field(default=5.0, metadata=_doc(
        "longest an idle keep-alive connection stays open, and longest pause while a client sends a body "
        "(HTTP 408)", float))

    def __post_init__(self):
        for name in ("max_body_bytes", "max_prompt_chars", "max_stop", "max_stop_chars", "max_messages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_prompt_tokens", "max_output_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or unset), got {getattr(self, name)}")
        if self.request_timeout_s < 0:
            raise ValueError(f"request_timeout_s must be >= 0, got {self.request_timeout_s}")
        for name in ("header_timeout_s", "idle_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    # ---- checks -----------------------------------------------------------------------------------
    def check_text(self, text: str, param: str = "prompt") -> None:
        """A prompt's length before tokenizing, and that it is valid Unicode (no lone surrogates)."""
        if len(text) > self.max_prompt_chars:
            raise InvalidRequest(f"{param} holds {len(text)} characters; this server takes at most "
                                 f"{self.max_prompt_chars}", param=param, code="prompt_too_long")
        check_unicode(text, param)

    def check_prompt_ids(self, prompt_ids: list[int], param: str = "prompt") -> None:
        if self.max_prompt_tokens is not None and len(prompt_ids) > self.max_prompt_tokens:
            raise InvalidRequest(f"the prompt has {len(prompt_ids)} tokens; this server takes at most "
                                 f"{self.max_prompt_tokens}", param=param, code="prompt_too_long")

    def check_max_tokens(self, max_tokens: int | None, param: str = "max_tokens") -> None:
        if max_tokens is not None and self.max_output_tokens is not None and max_tokens > self.max_output_tokens:
            raise InvalidRequest(f"{param} must be <= {self.max_output_tokens} on this server, got {max_tokens}",
                                 param=param)

    def cap_max_tokens(self, max_tokens: int) -> int:
        """A default max_tokens (what the context leaves) held to the server's cap."""
        return max_tokens if self.max_output_tokens is None else min(max_tokens, self.max_output_tokens)

    def check_stop(self, stop: list[str], stop_token_ids: list[int] = ()) -> None:
        if len(stop) > self.max_stop:
            raise InvalidRequest(f"stop holds {len(stop)} strings; this server takes at most {self.max_stop}",
                                 param="stop")
        if len(stop_token_ids) > self.max_stop:
            raise InvalidRequest(f"stop_token_ids holds {len(stop_token_ids)} ids; this server takes at most "
                                 f"{self.max_stop}", param="stop_token_ids")
        for s in stop:
            if len(s) > self.max_stop_chars:
                raise InvalidRequest(f"a stop string has {len(s)} characters; this server takes at most "
                                     f"{self.max_stop_chars}", param="stop")
            check_unicode(s, "stop")

    def check_messages(self, messages: list[dict]) -> None:
        """Message count, total characters, valid Unicode."""
        if len(messages) > self.max_messages:
            raise InvalidRequest(f"messages holds {len(messages)} messages; this server takes at most "
                                 f"{self.max_messages}", param="messages")
        num_chars = sum(len(m["content"]) for m in messages)
        if num_chars > self.max_prompt_chars:
            raise InvalidRequest(f"the messages hold {num_chars} characters; this server takes at most "
                                 f"{self.max_prompt_chars}", param="messages", code="prompt_too_long")
        for i, m in enumerate(messages):
            check_unicode(m["role"], f"messages.{i}.role")
            check_unicode(m["content"], f"messages.{i}.content")


def check_unicode(text: str, param: str) -> None:
    """Text a client sent must encode as UTF-8: a JSON "\\ud800" escape decodes to a lone surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{param} is not valid Unicode (it holds a lone surrogate)", param=param,
                             code="invalid_unicode") from None


class PromptTokenizer:
    """Prompts to token ids (and many tokens back to text), large ones off the event loop: tokenizing a
    megabyte of text takes most of a second, which on the loop would stall every request and /health. Each
    worker thread works with its own copy of the tokenizer (a fast tokenizer is not safe to share between
    threads)."""

    def __init__(self, tokenizer, num_threads: int = 2):
        self.tokenizer = tokenizer  # the loop's own copy
        self._executor = ThreadPoolExecutor(num_threads, thread_name_prefix="collab-decode-tokenize")
        self._local = threading.local()

    async def text_ids(self, text: str) -> list[int]:
        if len(text) < INLINE_TOKENIZE_CHARS:
            return text_prompt_ids(self.tokenizer, text)
        return await self._off_loop(text_prompt_ids, text)

    async def chat_ids(self, messages: list[dict]) -> list[int]:
        if sum(len(m["content"]) for m in messages) < INLINE_TOKENIZE_CHARS and len(messages) < 16:
            return chat_prompt_ids(self.tokenizer, messages)
        return await self._off_loop(chat_prompt_ids, messages)

    async def decode(self, render, num_tokens: int):
        """`render(tokenizer)`: what decodes `num_tokens` tokens (a response's prompt logprobs, its echo);
        off the loop when they are many."""
        if num_tokens < INLINE_DECODE_TOKENS:
            return render(self.tokenizer)
        return await self._off_loop(lambda tokenizer, _: render(tokenizer), None)

    async def _off_loop(self, fn, arg):
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn, arg)

    def _call(self, fn, arg):
        if not hasattr(self._local, "tokenizer"):
            self._local.tokenizer = copy.deepcopy(self.tokenizer)
        return fn(self._local.tokenizer, arg)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
