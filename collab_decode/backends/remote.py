"""The remote backend: a model behind an OpenAI-compatible `/v1/completions` endpoint that takes token-id
prompts and returns logprobs with token ids (vLLM; collab-decode's own server). The scale-out path: the
large model runs on a vLLM deployment while collab-decode keeps the small model, the scheduler and routing.

Per chunk of a forward, one completion call (the routed sequences of a step go out concurrently):

    prompt = the sequence's tokens so far (held[:num_cached] + chunk.token_ids), max_tokens = 1,
    temperature = 0, logprobs = K, return_tokens_as_token_ids = true
      -> the top-K logprobs after the last token   -> one row of logits: those K entries, -inf elsewhere
    all_positions chunks (speculative verification) also ask prompt_logprobs = K
      -> the top-K (and the actual token) at every prompt position -> a row per chunk position

Sampling stays on the client: the engine samples from these rows with each request's own parameters and
generator, as it does for a local model. Greedy is exact (the argmax is the endpoint's top-1). A sampled
token is drawn from the request's distribution restricted to the endpoint's top K (K <= its
--max-logprobs, 20 by default): exact whenever the request's top_k <= K or its top_p nucleus lies inside
the top K, otherwise the tail beyond the K most likely tokens is dropped. Reported logprobs of large-model
tokens are renormalised over those K. Speculative verification is exact for greedy; sampled, rejection
sampling runs against that top-K restriction of the large model's distribution.

Catch-up is the endpoint's prefix cache: every call sends the whole sequence, and an endpoint with prefix
caching (vLLM: --enable-prefix-caching, on by default in its v1 engine) recomputes only the blocks it has
not seen. Calls with prompt_logprobs are not served from vLLM's prefix cache (it must compute logits at
every prompt position), and collab-decode's own server has no prefix cache: both re-prefill the sequence.

The backend keeps per sequence the tokens it sent (like the transformers fallback), never the large
model's hidden states (hidden_size 0: routers read the small model only). A chunk that fails for good
raises BackendError naming its sequence; the engine ends those requests and goes on.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch

from collab_decode.backends.base import BackendError, ModelInput, ModelOutput, SeqChunk
from collab_decode.backends.remote_client import RemoteCallError, RemoteClient

log = logging.getLogger(__name__)

API_KEY_ENV = "COLLAB_DECODE_LARGE_API_KEY"  # the endpoint's key (vLLM --api-key), never a flag
TOKEN_ID_PREFIX = "token_id:"  # how return_tokens_as_token_ids spells a token
TOKENIZER_PROBE = "Ann has 352 marbles.\n\n(a) 17 + 5 = 22. The answer is 967. été 日本 🙂"


def _doc(help: str, type=None) -> dict:
    return {"help": help, "type": type}


@dataclass(frozen=True)
class RemoteConfig:
    """The large model's endpoint and how to call it. Flags: --large-<field> (engine/args.py)."""

    url: str | None = field(default=None, metadata=_doc(
        "run the large model behind this OpenAI-compatible endpoint (vLLM, collab-decode), e.g. "
        "http://vllm:8000/v1; a --large directory (or --pair's) is then read for its tokenizer only; key: "
        f"${API_KEY_ENV}", str))
    model_name: str | None = field(default=None, metadata=_doc(
        "the model name the endpoint serves (default: the first one its /v1/models lists)", str))
    logprobs: int = field(default=20, metadata=_doc(
        "top tokens per position asked from the endpoint (at most its --max-logprobs); sampled large-model "
        "tokens are drawn from these"))
    timeout_s: float = field(default=30.0, metadata=_doc("seconds one call may take before it counts as failed"))
    max_retries: int = field(default=2, metadata=_doc(
        "retries of a call after a transport error, a timeout, HTTP 429 or 5xx (with exponential backoff)"))
    max_concurrency: int = field(default=64, metadata=_doc("most calls in flight to the endpoint at once"))
    failure_threshold: int = field(default=3, metadata=_doc(
        "calls in a row that fail for good before the circuit opens: routed requests then fail at once and "
        "/health reports the large model unavailable until the endpoint's /health answers again"))
    probe_interval_s: float = field(default=1.0, metadata=_doc("how often an open circuit probes the endpoint"))
    connect_timeout_s: float = field(default=120.0, metadata=_doc(
        "how long start-up waits for the endpoint to list its models"))
    api_key: str | None = field(default=None, repr=False, metadata={"flag": False})

    def __post_init__(self):
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"the large model's URL must start with http:// or https://, got {self.url!r}")
        if not 1 <= self.logprobs <= 20:
            raise ValueError(f"large logprobs must be in [1, 20], got {self.logprobs}")
        for name in ("timeout_s", "probe_interval_s", "connect_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_concurrency", "failure_threshold"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")

    @property
    def base_url(self) -> str:
        """The server root: the URL without a trailing /v1."""
        url = (self.url or "").rstrip("/")
        return url[:-3] if url.endswith("/v1") else url


class RemoteBackend:
    """A model behind a completions endpoint, behind the backend protocol (kv_bytes_per_token() == 0)."""

    hidden_size = 0  # the engine never reads the large model's hidden states
    device = torch.device("cpu")
    eos_token_ids: tuple[int, ...] = ()  # the tokenizer's EOS (the engine's) ends requests

    def __init__(self, client: RemoteClient, model_name: str, vocab_size: int, max_model_len: int, logprobs: int):
        self.client = client
        self.model_name = model_name
        self.vocab_size = vocab_size  # width of the logits rows (ids beyond it are dropped)
        self.max_model_len = max_model_len
        self.logprobs = logprobs
        self.tokens: dict[int, list[int]] = {}  # seq_id -> the tokens last sent for it

    @classmethod
    def connect(cls, config: RemoteConfig, vocab_size: int, tokenizer=None) -> "RemoteBackend":
        """Wait for the endpoint to list its models (up to connect_timeout_s), pick the model, check the
        tokenizer where the endpoint can tokenize; ValueError if any of that fails."""
        if config.url is None:
            raise ValueError("RemoteConfig.url is not set")
        client = RemoteClient(config.base_url, config.api_key, config.timeout_s, config.max_retries,
                              max_concurrency=config.max_concurrency, failure_threshold=config.failure_threshold,
                              probe_interval_s=config.probe_interval_s)
        try:
            card = _model_card(client, config)
            backend = cls(client, card["id"], vocab_size, int(card.get("max_model_len") or 1 << 30), config.logprobs)
            if tokenizer is not None:
                backend.check_tokenizer(tokenizer)
        except BaseException:
            client.close()
            raise
        return backend

    def check_tokenizer(self, tokenizer) -> None:
        """Compare the endpoint's tokenization of a probe text with ours (vLLM's /tokenize; skipped where
        the endpoint has none)."""
        result = self.client.post_many("/tokenize", [{"model": self.model_name, "prompt": TOKENIZER_PROBE,
                                                      "add_special_tokens": False}])[0]
        if isinstance(result, RemoteCallError) or "tokens" not in result:
            log.info("%s cannot tokenize (%s): tokenizer check skipped", self.client.base_url, result)
            return
        ours = tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
        if list(result["tokens"]) != list(ours):
            raise ValueError(f"the endpoint's model {self.model_name!r} does not share the small model's tokenizer: "
                             f"{TOKENIZER_PROBE!r} is {result['tokens'][:12]}... there, {ours[:12]}... here")

    # ---- the backend protocol ---------------------------------------------------------------------
    def kv_bytes_per_token(self) -> int:
        return 0  # the endpoint keeps the cache; the engine's blocks for this model are bookkeeping only

    def init_cache(self, num_blocks: int, block_size: int) -> None:
        pass

    def release(self, seq_id: int) -> None:
        self.tokens.pop(seq_id, None)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("a remote model has no embeddings here: routers read the small model's")

    def unavailable(self) -> str | None:
        reason = self.client.unavailable()
        return None if reason is None else f"large model endpoint {reason}"

    def close(self) -> None:
        self.client.close()

    def forward(self, batch: ModelInput) -> ModelOutput:
        contexts = [self._context(chunk) for chunk in batch.chunks]
        bodies = [self._body(ids, chunk.all_positions) for ids, chunk in zip(contexts, batch.chunks)]
        answers = self.client.post_many("/v1/completions", bodies)
        rows, errors = [], {}
        for chunk, ids, answer in zip(batch.chunks, contexts, answers):
            try:
                if isinstance(answer, Exception):
                    raise answer
                rows.append(self._logits(chunk, len(ids), answer))  # (n, V)
            except (RemoteCallError, ValueError, KeyError, TypeError, IndexError) as e:
                errors[chunk.seq_id] = f"the large model's endpoint failed: {e}"
        if errors:
            raise BackendError(errors)
        for chunk, ids in zip(batch.chunks, contexts):
            self.tokens[chunk.seq_id] = ids
        out = ModelOutput(logits=torch.stack([r[-1] for r in rows]), hidden=torch.zeros(len(rows), 0))
        for chunk, r in zip(batch.chunks, rows):
            if chunk.all_positions:
                out.all_logits[chunk.seq_id], out.all_hidden[chunk.seq_id] = r, torch.zeros(len(r), 0)
        return out

    # ---- helpers ---------------------------------------------------------------------------------
    def _context(self, chunk: SeqChunk) -> list[int]:
        """The whole sequence up to the chunk's end: what the endpoint is sent."""
        if not chunk.token_ids:
            raise ValueError(f"sequence {chunk.seq_id}: a forward chunk needs at least one new token")
        held = self.tokens.get(chunk.seq_id, [])
        if chunk.num_cached > len(held):
            raise ValueError(f"sequence {chunk.seq_id}: the chunk says {chunk.num_cached} tokens are cached, but "
                             f"this backend sent {len(held)}; it was never sent the tokens in between")
        return held[:chunk.num_cached] + list(chunk.token_ids)

    def _body(self, ids: list[int], all_positions: bool) -> dict:
        body = {"model": self.model_name, "prompt": ids, "max_tokens": 1, "temperature": 0.0,
                "logprobs": self.logprobs, "return_tokens_as_token_ids": True}
        if all_positions:
            body["prompt_logprobs"] = self.logprobs
        return body

    def _logits(self, chunk: SeqChunk, num_tokens: int, answer: dict) -> torch.Tensor:
        """(n, V) rows from one completion: n = len(chunk) for all_positions chunks, else 1."""
        choice = answer["choices"][0]
        top = (choice.get("logprobs") or {}).get("top_logprobs")
        if not top:
            raise ValueError("the answer has no top_logprobs (does the endpoint support `logprobs` on completions?)")
        last = {_token_id(key): float(lp) for key, lp in top[0].items()}
        if not chunk.all_positions:
            return self._rows([last])
        prompt = choice.get("prompt_logprobs")
        if not prompt or len(prompt) != num_tokens:
            raise ValueError(f"the answer has {len(prompt or [])} prompt_logprobs for {num_tokens} prompt tokens "
                             "(does the endpoint support prompt_logprobs?)")
        # prompt[i] is the distribution of token i given tokens[:i]; chunk position p predicts token p + 1
        start = num_tokens - len(chunk.token_ids)
        rows = [{int(key): float(entry["logprob"]) for key, entry in prompt[p + 1].items()}
                for p in range(start, num_tokens - 1)]
        return self._rows(rows + [last])

    def _rows(self, rows: list[dict[int, float]]) -> torch.Tensor:
        logits = torch.full((len(rows), self.vocab_size), float("-inf"))  # (n, V)
        for i, row in enumerate(rows):
            ids = [t for t in row if 0 <= t < self.vocab_size]
            logits[i, ids] = torch.tensor([row[t] for t in ids])
        return logits


def _token_id(key: str) -> int:
    if not key.startswith(TOKEN_ID_PREFIX):
        raise ValueError(f"top_logprobs key {key!r} is not a token id: the endpoint ignored "
                         "return_tokens_as_token_ids")
    return int(key[len(TOKEN_ID_PREFIX):])


def _model_card(client: RemoteClient, config: RemoteConfig) -> dict:
    """The endpoint's entry for the configured model (or its first), from /v1/models."""
    try:
        models = client.get("/v1/models", deadline_s=config.connect_timeout_s).get("data") or []
    except RemoteCallError as e:
        raise ValueError(f"cannot reach the large model's endpoint {config.base_url}: {e}") from None
    names = [m.get("id") for m in models]
    if not models:
        raise ValueError(f"{config.base_url}/v1/models lists no model")
    if config.model_name is None:
        return models[0]
    if config.model_name not in names:
        raise ValueError(f"{config.base_url} serves {names}, not {config.model_name!r} (--large-model-name)")
    return models[names.index(config.model_name)]


def remote_fields() -> list[dataclasses.Field]:
    """RemoteConfig's fields that are command-line flags."""
    return [f for f in dataclasses.fields(RemoteConfig) if f.metadata.get("flag", True)]
