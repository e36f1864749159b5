"""Batched token sampling (vLLM / Hugging Face conventions).

Data flow, once per engine step and model:

    logits (B, V) from a backend
      -> processed_probs: temperature, then top-k, then top-p (renormalised after each cut);
         greedy rows become one-hot on the argmax               -> probs (B, V)
      -> Sampler.sample: exponential race, argmax(probs / q), where each random row's noise q comes
         from that request's own torch.Generator (so a request's draws never depend on the rest of
         the batch) and greedy rows use q = 1 (no randomness consumed)
      -> SampleOutput: token ids, their logprobs under the *raw* model distribution, optional
         top-n alternatives, and which rows' logits were not finite (NaN/inf: their request must fail)
    detokenised text -> check_stop: where to truncate the output at a stop string.

`processed_probs` is also the target/draft distribution of speculative decoding's rejection sampling,
so it is deterministic, batched and has no host sync.

A greedy batch of a few rows on the CPU takes its tokens, row maxima and top-1 probabilities from one call of
collab_decode/_hostops.c (the same values as the torch ops, on the host at once; at batch 1 right after a forward
the torch ops cost ~15-20 us, that call a few); larger batches, other devices and an install without the
module use the torch ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

try:  # the greedy reductions in C (collab_decode/_hostops.c), built at install where there is a C compiler
    from collab_decode import _hostops
except ImportError:  # none: torch ops do the same
    _hostops = None

MAX_LOGPROBS = 20  # most alternatives a request may ask for (OpenAI's limit)
INT64_MAX = 2**63 - 1  # integer fields become int64 tensors: nothing larger can be represented
SEED_RANGE = (-2**63, 2**64)  # what torch.Generator.manual_seed takes (as int64 or uint64)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # the sampler's dtype: a larger temperature is inf there
_TOP_P_SLACK = 1e-6  # cumulative mass this close to top_p counts as reaching it (float32 sums)
# most rows of a greedy batch that _hostops samples on the host: one C loop a row, where torch's kernels are
# vectorised and their per-op cost is shared by the rows (the crossover, measured after a forward: see
# docs/benchmarks.md, Session 17)
HOST_GREEDY_MAX_ROWS = 32


class SamplingError(ValueError):
    """A sampling parameter the engine cannot honour; `param` names the field (REST reports it)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param

    def __reduce__(self):  # pickles (to and from an engine process) with both arguments
        return type(self), (self.param, str(self))


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. Validated on construction: every integer fits int64 and every float
    is finite (and the temperature fits float32), so no request can make a step raise."""

    max_tokens: int = 16  # most tokens to generate (>= 1)
    # logits are divided by it; 0 = greedy. Any tiny positive value works and tends to greedy as it shrinks
    # (probabilities are computed relative to the row's top logit, so nothing overflows; vLLM instead raises
    # temperatures below 0.01 to 0.01)
    temperature: float = 1.0
    top_p: float = 1.0  # nucleus: keep the smallest set of top tokens with mass >= top_p; 1 = off
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = off
    seed: int | None = None  # seeds this request's own generator; None = global RNG
    stop: tuple[str, ...] = ()  # stop strings; the output is cut before the first one
    stop_token_ids: tuple[int, ...] = ()  # token ids that end the request (kept in the output)
    ignore_eos: bool = False  # keep generating past the EOS token
    logprobs: int | None = None  # None = none; 0 = chosen token only; n = chosen + top-n (<= 20)
    # per prompt token: its logprob given the tokens before it and the top-n there (vLLM's prompt_logprobs),
    # from the model that prefills the prompt first; None = none, 0 = the prompt token only
    prompt_logprobs: int | None = None
    # True when the request always takes the argmax token (temperature 0 or top_k 1); set from the above once,
    # since the sampler reads it for every row of every step
    greedy: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self._validate()
        object.__setattr__(self, "greedy", self.temperature == 0 or self.top_k == 1)

    def _validate(self) -> None:
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= INT64_MAX:
            raise SamplingError("max_tokens", f"max_tokens must be an integer in [1, 2**63 - 1], "
                                              f"got {self.max_tokens!r}")
        if not _is_real(self.temperature) or not 0 <= self.temperature <= FLOAT32_MAX:
            raise SamplingError("temperature", f"temperature must be finite, >= 0 and <= {FLOAT32_MAX:.4g} "
                                               f"(float32), got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise SamplingError("top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or not -1 <= self.top_k <= INT64_MAX:
            raise SamplingError("top_k", f"top_k must be an integer in [-1, 2**63 - 1] (0 or -1 = disabled), "
                                         f"got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]):
            raise SamplingError("seed", f"seed must be None or an integer in [-2**63, 2**64), got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise SamplingError(name, f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        bad_ids = [t for t in self.stop_token_ids if not _is_int(t) or not 0 <= t <= INT64_MAX]
        if bad_ids:
            raise SamplingError("stop_token_ids", f"stop_token_ids must be integers in [0, 2**63 - 1], "
                                                  f"got {bad_ids[:5]!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise SamplingError("stop", f"stop strings must be non-empty strings, got {s!r} in {self.stop!r}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class SampleOutput:
    """What `Sampler.sample` returns for a batch of B rows."""

    # (B,) int64 chosen tokens; None where they were picked on the host (_hostops): `token_ids` makes it then
    token_tensor: torch.Tensor | None
    logprobs: torch.Tensor | None  # (B,) float32 logprob of each chosen token under log_softmax(raw
    #   logits); None when no row asked for logprobs
    # (B, n) int64 / float32 top-n tokens of the raw distribution, logprob descending, where n is the
    # largest `logprobs` asked for in the batch: rows that asked for fewer slice [:, :their n].
    # None when no row wants alternatives.
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    # (B,) float32 each row's largest logit: NaN if the row holds a NaN, +inf if it holds +inf, -inf if
    # nothing in it is finite (then its token means nothing); None = not checked
    row_max: torch.Tensor | None = None
    # B host floats: each row's largest probability under softmax(raw logits), NaN where the row is not finite;
    # computed with greedy tokens when asked (Sampler.sample's top1: a router's gate reads it), else None.
    # Then row_max is None when every row's top-1 probability is above one half (so every row is finite)
    top1_probs: list[float] | None = None

    # what the engine reads on the host: copied once per batch on first use, or given by the host sampler
    _token_id_list: list[int] | None = field(default=None, repr=False)
    _row_max_list: list[float] | None = field(default=None, repr=False)
    _nonfinite_rows: list[int] | None = field(default=None, init=False, repr=False)

    @classmethod
    def on_host(cls, token_ids: list[int], row_max: list[float], top1_probs: list[float] | None) -> "SampleOutput":
        """Tokens picked on the host (_hostops), with no logprobs: their tensor is made only if something reads it."""
        return cls(None, None, top1_probs=top1_probs, _token_id_list=token_ids, _row_max_list=row_max)

    @property
    def token_ids(self) -> torch.Tensor:
        """(B,) int64 chosen tokens (made from token_id_list where the host picked them: a router's input)."""
        if self.token_tensor is None:
            self.token_tensor = torch.tensor(self._token_id_list)
        return self.token_tensor

    @property
    def token_id_list(self) -> list[int]:
        """token_ids as Python ints (one host copy for the whole batch, however many rows are read)."""
        if self._token_id_list is None:
            self._token_id_list = self.token_tensor.tolist()
        return self._token_id_list

    @property
    def nonfinite_rows(self) -> list[int]:
        """Rows whose logits were not finite: their requests must fail. Checked on the host from row_max
        (a copy of B floats: cheaper at batch 1 than more tensor ops)."""
        if self._nonfinite_rows is None:
            maxes = self._row_max_list
            if maxes is None:
                maxes = [] if self.row_max is None else self.row_max.tolist()
            # a sum of finite maxes is finite (one that overflows sends every row to the check below)
            finite = math.isfinite(sum(maxes))
            self._nonfinite_rows = [] if finite else [row for row, m in enumerate(maxes) if not math.isfinite(m)]
        return self._nonfinite_rows


def host_readable(matrix: torch.Tensor) -> bool:
    """Whether _hostops can read this matrix in place: the module is built, and the matrix is float32 on the CPU
    with its columns contiguous (rows may be further apart: a padded vocabulary cut off)."""
    return _hostops is not None and matrix.is_cpu and matrix.dtype == torch.float32 and matrix.stride(-1) == 1


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded with `seed` on `device` (the logits' device), or None for the global RNG."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def processed_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution each row is sampled from: (B, V) logits -> (B, V) float32 probs.

    Temperature, then top-k, then top-p on the renormalised survivors (vLLM's order); greedy rows
    are one-hot on the argmax of the raw logits. Rows of finite logits sum to 1, whatever the temperature:
    logits are taken relative to their row's maximum before the division, so a tiny temperature sends the
    others to -inf (probability 0) instead of overflowing to inf (NaN probabilities).
    """
    logits = logits.float()  # (B, V)
    if len(params) != logits.shape[0]:
        raise ValueError(f"got {len(params)} SamplingParams for {logits.shape[0]} rows of logits")
    temperature = _row_tensor([1.0 if p.greedy else p.temperature for p in params], logits)  # (B,)
    temperature = temperature.clamp_min(torch.finfo(torch.float32).tiny)  # 1e-300 is 0 in float32
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature[:, None]  # (B, V), <= 0
    if any(p.top_k > 0 or p.top_p < 1 for p in params):
        probs = _top_k_top_p_probs(scaled, params)
    else:
        probs = scaled.softmax(dim=-1)
    greedy = _row_tensor([p.greedy for p in params], logits, torch.bool)  # (B,)
    if any(p.greedy for p in params):
        one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], one_hot, probs)
    return probs


def _top_k_top_p_probs(scaled: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """softmax(scaled) restricted to each row's top-k, then to its top-p nucleus, renormalised."""
    num_rows, vocab_size = scaled.shape
    top_k = _row_tensor([p.top_k if p.top_k > 0 else vocab_size for p in params], scaled, torch.long)
    top_p = _row_tensor([p.top_p for p in params], scaled)  # (B,)
    sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True)  # (B, V)
    rank = torch.arange(vocab_size, device=scaled.device)  # (V,)
    keep = rank[None, :] < top_k[:, None]  # (B, V)
    sorted_probs = sorted_logits.masked_fill(~keep, -math.inf).softmax(dim=-1)  # (B, V)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (B, V) mass of higher-ranked tokens
    # A token is needed while the tokens above it hold less than top_p; the top token always stays.
    in_nucleus = (mass_before < top_p[:, None] - _TOP_P_SLACK) | (top_p[:, None] >= 1) | (rank == 0)
    keep &= in_nucleus
    sorted_probs = sorted_probs.masked_fill(~keep, 0.0)
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    return torch.zeros_like(sorted_probs).scatter_(-1, sorted_ids, sorted_probs)


def _row_tensor(values: list, like: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-row parameters as a tensor on `like`'s device (a host-to-device copy, no device sync)."""
    return torch.tensor(values, dtype=dtype, device=like.device)


class Sampler:
    """Picks one token per row of a logits batch; stateless (randomness comes from the caller)."""

    def sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        top1: bool = False,
    ) -> SampleOutput:
        """(B, V) logits -> SampleOutput. `generators[i]` drives row i (None: global RNG). A row whose
        logits are not finite still gets a token (in range, meaningless) and is flagged (nonfinite_rows).
        `top1`: a router will read each row's top-1 probability; a greedy batch gets it with its tokens."""
        if not len(params) == len(generators) == logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} rows of logits, {len(params)} params and "
                             f"{len(generators)} generators must match")
        if logits.dtype != torch.float32:  # (a call of .float() costs ~1 us even when it returns its input)
            logits = logits.float()  # (B, V)
        greedy = all(p.greedy for p in params)
        if greedy and _hostops is not None and logits.is_cpu and logits.shape[0] <= HOST_GREEDY_MAX_ROWS:
            return _greedy_on_host(logits, params, top1)
        if greedy and top1:
            return _greedy_with_top1(logits, params)
        if greedy:
            row_max, token_ids = logits.max(dim=-1)  # (B,), (B,): the max propagates NaN
        else:
            row_max = logits.amax(dim=-1)
            probs = processed_probs(logits, params)  # (B, V)
            token_ids = (probs / self._race_noise(probs, params, generators)).argmax(dim=-1)
        out = logprobs_of(logits, token_ids, params)
        out.row_max = row_max
        return out

    @staticmethod
    def _race_noise(probs: torch.Tensor, params: list[SamplingParams],
                    generators: list[torch.Generator | None]) -> torch.Tensor:
        """(B, V) noise q: Exp(1) for random rows, so argmax(probs / q) ~ probs; 1 for greedy rows.

        Each seeded row draws from its own generator, so its tokens do not depend on the batch.
        """
        noise = torch.ones_like(probs)  # (B, V)
        global_rows = []
        for row, (p, generator) in enumerate(zip(params, generators)):
            if p.greedy:
                continue
            if generator is None:
                global_rows.append(row)
            else:
                noise[row].exponential_(generator=generator)
        if global_rows:
            index = torch.tensor(global_rows, device=probs.device)
            noise[index] = torch.empty_like(noise[index]).exponential_()
        # exponential_ may return exactly 0 in float32: keep the division finite.
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


def _greedy_on_host(logits: torch.Tensor, params: list[SamplingParams], top1: bool) -> SampleOutput:
    """A greedy batch's tokens, row maxima and (with `top1`) top-1 probabilities from one call of _hostops.greedy (CPU
    float32 logits): the values torch.max and the softmax give, on the host at once."""
    if logits.stride(-1) != 1:  # (the C loop reads each row's columns one after another)
        logits = logits.contiguous()
    token_ids, row_max, top1_probs = _hostops.greedy(logits.data_ptr(), logits.shape[0], logits.shape[1],
                                                    logits.stride(0), top1)
    if all(p.logprobs is None for p in params):
        return SampleOutput.on_host(token_ids, row_max, top1_probs)
    out = logprobs_of(logits, torch.tensor(token_ids, device=logits.device), params)
    out._token_id_list, out._row_max_list, out.top1_probs = token_ids, row_max, top1_probs
    return out


def _greedy_with_top1(logits: torch.Tensor, params: list[SamplingParams]) -> SampleOutput:
    """Greedy tokens and each row's top-1 probability from one softmax and one max, where a separate gate would
    take the sampler's max, a softmax and another max (at batch 1 every op costs more than its arithmetic).

    The most probable token is the first largest logit wherever its probability p1 is above `clear_top1`: the
    largest logit's exp(0) = 1 is the largest numerator, so another token can reach p1 only at a near-tie, and
    then the two would hold 2 * p1 > 1 of a row that sums to 1 within float32's error. If any row is not that
    clear (a near-tie; a row that is not finite, whose p1 is NaN) the batch takes the logits' max instead, in
    one more op, which also gives the finite check its row_max; otherwise every row is finite (row_max None)."""
    top1, token_ids = torch.softmax(logits, dim=-1).max(dim=-1)  # (B,), (B,)
    top1_probs = top1.tolist()  # NaN where the row is not finite
    row_max, clear = None, clear_top1(logits.shape[-1])
    if not all(p > clear for p in top1_probs):  # (NaN > x is False)
        row_max, token_ids = logits.max(dim=-1)
    out = logprobs_of(logits, token_ids, params)
    out.row_max, out.top1_probs = row_max, top1_probs
    return out


def clear_top1(vocab_size: int) -> float:
    """The top-1 probability above which a softmax row's most probable token is its first largest logit: one
    half, plus a bound on the float32 rounding of the row's sum and of exp (a few units in the last place per
    term; 2**-23 each, generously)."""
    return 0.5 + (vocab_size + 16) * 2.0 ** -23


def nonfinite_rows(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) -> (B,) bool: rows holding a NaN or +inf, or no finite value (-inf alone is a banned token).
    One reduction: a row's max is NaN if any entry is, +inf if any is, -inf if all are."""
    return ~torch.isfinite(logits.amax(dim=-1))


def logprobs_of(logits: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]) -> SampleOutput:
    """Raw logprobs (vLLM's default) of the chosen tokens, and top-n alternatives if asked.
    Nothing is computed when no row asks for logprobs (the common case on the hot path)."""
    if all(p.logprobs is None for p in params):
        return SampleOutput(token_ids, None)
    raw = logits.log_softmax(dim=-1)  # (B, V)
    chosen = raw.gather(-1, token_ids[:, None]).squeeze(-1)  # (B,)
    num_top = max((p.logprobs or 0 for p in params), default=0)
    top_ids = top_logprobs = None
    if num_top > 0:
        top_logprobs, top_ids = raw.topk(min(num_top, raw.shape[-1]), dim=-1)  # (B, n), sorted
    return SampleOutput(token_ids, chosen, top_ids, top_logprobs)


def check_stop(text_so_far: str, new_text_start: int, stop: tuple[str, ...]) -> int | None:
    """Where to truncate the output for a stop string, or None.

    Only matches that overlap the text added since `new_text_start` count (older ones were checked
    on earlier steps), including a match that spans a token boundary. Returns the start of the
    earliest such match: the output keeps text_so_far[:index], stop string excluded.
    """
    earliest = None
    for s in stop:
        index = text_so_far.find(s, max(0, new_text_start - (len(s) - 1)))
        if index != -1 and (earliest is None or index < earliest):
            earliest = index
    return earliest
