"""Sampling for a batched decode step.

Owns the per-request sampling parameters (`SamplingParams`, validated on construction), each
sequence's mutable sampling state (`SequenceSampler`: PRNG key, generated-token counts, prompt
token set) and `sample_batch`, which turns one (B, V) logits matrix into one `TokenSample` per row.

Order for a row: logit_bias, repetition penalty (HF/CTRL, prompt + output), frequency and presence
penalties (OpenAI, output only), then argmax when temperature is 0, else temperature, top_k, top_p,
min_p and a Gumbel-max categorical draw with the row's own key. A row with a grammar constraint
(`SequenceConstraint`, from `params.grammar`) has the tokens its grammar forbids set to -inf after the
penalties, before choosing (greedy rows too). Logprobs come from the raw logits.
Shared work is batched across rows and everything is evaluated with one `mx.eval`; the only extra
host sync is for top_p rows without top_k whose nucleus is not within the top `_TOP_P_CANDIDATES`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from server.engine import host
from server.engine.constraints import GrammarSpec, apply_bitmask, fill_masks

if TYPE_CHECKING:
    from server.engine.constraints import SequenceConstraint

_MAX_TOP_LOGPROBS = 20
_MAX_N = 128
_TOP_P_CANDIDATES = 1024  # top_p without top_k looks for the nucleus among this many tokens first
_NEG_INF = float("-inf")


def _number(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not (low < value <= high if low_open else low <= value <= high):
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low:g}, {high:g}], got {value!r}")
    return value


def _integer(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {high if high is not None else 'inf'}], got {value}")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling parameters (OpenAI names and ranges; validated in __post_init__)."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    prompt_logprobs: int | None = None  # logprobs of the prompt's tokens, with this many alternatives
    grammar: GrammarSpec | None = None
    skip_special_tokens: bool = True  # False: special tokens' text reaches the output (gpt-oss's harmony markers)

    def __post_init__(self) -> None:
        put = object.__setattr__
        if self.max_tokens is not None:
            _integer("max_tokens", self.max_tokens, 1)
        put(self, "temperature", _number("temperature", self.temperature, 0.0, 2.0))
        put(self, "top_p", _number("top_p", self.top_p, 0.0, 1.0, low_open=True))
        _integer("top_k", self.top_k, 0)
        put(self, "min_p", _number("min_p", self.min_p, 0.0, 1.0))
        put(self, "presence_penalty", _number("presence_penalty", self.presence_penalty, -2.0, 2.0))
        put(self, "frequency_penalty", _number("frequency_penalty", self.frequency_penalty, -2.0, 2.0))
        put(
            self,
            "repetition_penalty",
            _number("repetition_penalty", self.repetition_penalty, 0.0, math.inf, low_open=True),
        )
        if not isinstance(self.logit_bias, Mapping):
            raise ValueError(f"logit_bias must be a mapping of token id to bias, got {type(self.logit_bias).__name__}")
        bias: dict[int, float] = {}
        for key, value in self.logit_bias.items():
            try:
                token = int(key) if isinstance(key, str) else key
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
            _integer("logit_bias token id", token, 0)
            bias[token] = _number(f"logit_bias[{token}]", value, -100.0, 100.0)
        put(self, "logit_bias", MappingProxyType(bias))
        if self.seed is not None:
            _integer("seed", self.seed, -(2**63))
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError("stop must be non-empty strings")
        put(self, "stop", stop)
        ids = tuple(self.stop_token_ids or ())
        for token in ids:
            _integer("stop_token_ids", token, 0)
        put(self, "stop_token_ids", ids)
        if not all(isinstance(v, bool) for v in (self.ignore_eos, self.logprobs, self.skip_special_tokens)):
            raise ValueError("ignore_eos, logprobs and skip_special_tokens must be booleans")
        _integer("top_logprobs", self.top_logprobs, 0, _MAX_TOP_LOGPROBS)
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs")
        _integer("n", self.n, 1, _MAX_N)
        if self.prompt_logprobs is not None:
            _integer("prompt_logprobs", self.prompt_logprobs, 0, _MAX_TOP_LOGPROBS)
        if self.grammar is not None and not isinstance(self.grammar, GrammarSpec):
            raise ValueError(f"grammar must be a GrammarSpec, got {type(self.grammar).__name__}")

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (temperature 0)."""
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


def ensure_valid_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """Raise ValueError when a logit_bias or stop_token_ids id is outside [0, vocab_size)."""
    bad = sorted(t for t in (*params.logit_bias, *params.stop_token_ids) if not 0 <= t < vocab_size)
    if bad:
        raise ValueError(f"token ids outside the vocabulary (0..{vocab_size - 1}): {bad[:5]}")


class SequenceSampler:
    """One sequence's sampling state: its params, its PRNG key (from seed, else from os.urandom),
    counts of generated tokens for penalties, the prompt token set for repetition_penalty, and its
    grammar constraint if any (advanced by `record`)."""

    def __init__(
        self, params: SamplingParams, prompt_token_ids: Sequence[int], constraint: SequenceConstraint | None = None
    ) -> None:
        self.params = params
        self.constraint = constraint
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
        self._key: list[int] = host.ints(mx.random.key(seed % 2**64))  # two uint32 words, host side
        self.counts: dict[int, int] = {}
        self.num_generated = 0
        self._bias_ids = np.fromiter(params.logit_bias.keys(), dtype=np.int64, count=len(params.logit_bias))
        self._bias_vals = np.fromiter(params.logit_bias.values(), dtype=np.float32, count=len(params.logit_bias))
        self._max_bias_id = int(self._bias_ids.max()) if len(self._bias_ids) else -1
        self._prompt_set: frozenset[int] = frozenset()
        self._prompt_ids = np.zeros(0, dtype=np.int64)
        if params.repetition_penalty != 1.0:
            self._prompt_set = frozenset(int(t) for t in prompt_token_ids)
            self._prompt_ids = np.fromiter(self._prompt_set, dtype=np.int64, count=len(self._prompt_set))
        self._new_ids: list[int] = []  # generated ids that are not in the prompt, in first-seen order
        self.has_processors = bool(params.logit_bias) or params.has_penalties
        self.argmax = params.temperature == 0.0 or params.top_k == 1

    def record(self, token_id: int) -> None:
        """Account for a token the engine appended to this sequence."""
        self.num_generated += 1
        if self.constraint is not None:
            self.constraint.advance(token_id)
        count = self.counts.get(token_id, 0)
        self.counts[token_id] = count + 1
        if not count and token_id not in self._prompt_set:
            self._new_ids.append(token_id)

    def _repetition_ids(self) -> np.ndarray:
        if not self._new_ids:
            return self._prompt_ids
        return np.concatenate([self._prompt_ids, np.asarray(self._new_ids, dtype=np.int64)])


@dataclass
class TokenSample:
    """The token chosen for one row, with its raw-distribution logprob when asked."""

    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None


def apply_processors(x: mx.array, samplers: Sequence[SequenceSampler], rows: Sequence[int] | None = None) -> mx.array:
    """logit_bias, then repetition, frequency and presence penalties, for `rows` of x (default: all rows
    that have any), as sparse scatters over the few token ids involved. Returns a new array."""
    if rows is None:
        rows = [i for i, s in enumerate(samplers) if s.has_processors]
    bias_r, bias_t, bias_v = [], [], []
    rep_r, rep_t, rep_p = [], [], []
    pen_r, pen_t, pen_v = [], [], []
    for row in rows:
        s = samplers[row]
        p = s.params
        if len(s._bias_ids):
            bias_r.append(np.full(len(s._bias_ids), row))
            bias_t.append(s._bias_ids)
            bias_v.append(s._bias_vals)
        if p.repetition_penalty != 1.0:
            ids = s._repetition_ids()
            if len(ids):
                rep_r.append(np.full(len(ids), row))
                rep_t.append(ids)
                rep_p.append(np.full(len(ids), p.repetition_penalty, dtype=np.float32))
        if (p.frequency_penalty or p.presence_penalty) and s.counts:
            ids = np.fromiter(s.counts.keys(), dtype=np.int64, count=len(s.counts))
            counts = np.fromiter(s.counts.values(), dtype=np.float32, count=len(s.counts))
            pen_r.append(np.full(len(ids), row))
            pen_t.append(ids)
            pen_v.append(-(counts * np.float32(p.frequency_penalty) + np.float32(p.presence_penalty)))
    if bias_r:
        x = x.at[mx.array(np.concatenate(bias_r)), mx.array(np.concatenate(bias_t))].add(
            mx.array(np.concatenate(bias_v))
        )
    if rep_r:
        r, t = mx.array(np.concatenate(rep_r)), mx.array(np.concatenate(rep_t))
        penalty = mx.array(np.concatenate(rep_p))
        picked = x[r, t]
        x = mx.array(x)  # a new handle: the in-place update below must not reach the caller's raw logits
        x[r, t] = mx.where(picked > 0, picked / penalty, picked * penalty)
    if pen_r:
        x = x.at[mx.array(np.concatenate(pen_r)), mx.array(np.concatenate(pen_t))].add(mx.array(np.concatenate(pen_v)))
    return x


def _nucleus(masked_desc: mx.array, log_norm: mx.array, top_p: mx.array) -> mx.array:
    """How many leading tokens of each sorted row top_p keeps: the smallest prefix whose mass is >= top_p
    (the first token always). masked_desc: sorted logits, -inf past top_k; log_norm: log of the row's mass."""
    probs = mx.exp(masked_desc - log_norm)
    before = mx.cumsum(probs, axis=-1, inclusive=False)
    return mx.sum(before < top_p, axis=-1, keepdims=True).astype(mx.int32)


def _filter_thresholds(xs: mx.array, samplers: list[SequenceSampler]) -> mx.array:
    """Per-row logit threshold (B, 1) implementing top_k then top_p; -inf where a row has neither.

    Only the `width` largest logits of a row are sorted: max(top_k) when every row has top_k, else
    at least _TOP_P_CANDIDATES. A top_p-only row whose nucleus is not within them (known after one
    host sync) is redone over a full sort."""
    rows, vocab = xs.shape
    ks = [s.params.top_k if 0 < s.params.top_k < vocab else 0 for s in samplers]
    ps = [s.params.top_p for s in samplers]
    need = [i for i in range(rows) if ks[i] or ps[i] < 1.0]
    if not need:
        return mx.full((rows, 1), _NEG_INF, dtype=mx.float32)
    sub = xs if len(need) == rows else xs[mx.array(need)]
    k_need, p_need = [ks[i] for i in need], [ps[i] for i in need]
    width = max(k_need) if all(k_need) else min(vocab, max(max(k_need), _TOP_P_CANDIDATES))
    sorted_desc = _sorted_desc(sub, width)
    k_arr = mx.array([k or width for k in k_need], dtype=mx.int32)[:, None]
    has_k = mx.array([bool(k) for k in k_need])[:, None]
    t = mx.where(has_k, mx.take_along_axis(sorted_desc, k_arr - 1, axis=-1), _NEG_INF)
    if any(p < 1.0 for p in p_need):
        p_arr = mx.array(p_need, dtype=mx.float32)[:, None]
        masked = mx.where(mx.arange(width)[None] < k_arr, sorted_desc, _NEG_INF)
        log_norm = mx.logsumexp(masked, axis=-1, keepdims=True)
        partial = [j for j, k in enumerate(k_need) if not k and p_need[j] < 1.0] if width < vocab else []
        if partial:  # top_p over the whole vocabulary: the candidates' share of the full mass
            log_norm = mx.where(has_k, log_norm, mx.logsumexp(sub, axis=-1, keepdims=True))
        keep = _nucleus(masked, log_norm, p_arr)
        t = mx.maximum(t, mx.where(p_arr >= 1.0, _NEG_INF, mx.take_along_axis(sorted_desc, keep - 1, axis=-1)))
        if partial:
            keep_list = host.ints(keep[:, 0])
            short = mx.array([j for j in partial if keep_list[j] >= width])
            if short.size:
                full = _sorted_desc(sub[short], vocab)
                fk = _nucleus(full, mx.logsumexp(full, axis=-1, keepdims=True), p_arr[short])
                t[short] = mx.take_along_axis(full, fk - 1, axis=-1)
    if len(need) == rows:
        return t
    return mx.full((rows, 1), _NEG_INF, dtype=mx.float32).at[mx.array(need)].maximum(t)


def _sorted_desc(x: mx.array, width: int) -> mx.array:
    """The `width` largest values of each row, largest first."""
    if width < x.shape[-1]:
        x = mx.topk(x, width, axis=-1)
    return mx.sort(x, axis=-1)[:, ::-1]


@mx.compile
def _gumbel_argmax(xs: mx.array, threshold: mx.array, uniform: mx.array) -> mx.array:
    masked = mx.where(xs < threshold, _NEG_INF, xs)
    return mx.argmax(masked - mx.log(-mx.log(uniform)), axis=-1)


def _sample_rows(x: mx.array, samplers: list[SequenceSampler]) -> tuple[mx.array, mx.array]:
    """Temperature, top_k, top_p, min_p and a categorical draw for rows of x; returns (tokens, new keys)."""
    rows, vocab = x.shape
    temps = [s.params.temperature for s in samplers]
    if any(t != 1.0 for t in temps):
        x = x * mx.array([1.0 / t for t in temps], dtype=mx.float32)[:, None]
    threshold = _filter_thresholds(x, samplers)
    min_ps = [s.params.min_p for s in samplers]
    if any(min_ps):
        log_min_p = mx.array([math.log(m) if m > 0 else _NEG_INF for m in min_ps], dtype=mx.float32)[:, None]
        threshold = mx.maximum(threshold, mx.max(x, axis=-1, keepdims=True) + log_min_p)
    split = mx.vmap(mx.random.split)(mx.array([s._key for s in samplers], dtype=mx.uint32))
    uniform = mx.vmap(lambda key: mx.random.uniform(shape=(vocab,), key=key))(split[:, 1])
    return _gumbel_argmax(x, threshold, uniform), split[:, 0]


def _as_float32(x: mx.array) -> mx.array:
    # also for argmax alone: on the CPU backend a half-precision argmax is slower than the cast plus argmax
    return x if x.dtype == mx.float32 else x.astype(mx.float32)


def sample_batch(logits: mx.array, samplers: Sequence[SequenceSampler]) -> list[TokenSample]:
    """logits: (B, V) for the last position of each of B sequences (any float dtype). Returns one sample per row."""
    if logits.ndim != 2 or logits.shape[0] != len(samplers):
        raise ValueError(f"logits must be (B, V) with B == {len(samplers)} samplers, got {tuple(logits.shape)}")
    batch, vocab = logits.shape
    if batch == 0:
        return []
    for s in samplers:
        if s._max_bias_id >= vocab:
            raise ValueError(f"logit_bias token id {s._max_bias_id} is outside the vocabulary (0..{vocab - 1})")
    want_lp = [i for i, s in enumerate(samplers) if s.params.logprobs]
    constrained = [(i, s.constraint) for i, s in enumerate(samplers) if s.constraint is not None]
    if not want_lp and not constrained and all(s.argmax and not s.has_processors for s in samplers):
        return [TokenSample(t, None, None) for t in host.ints(mx.argmax(_as_float32(logits), axis=-1))]

    raw = _as_float32(logits)
    proc_rows = [i for i, s in enumerate(samplers) if s.has_processors]
    x = apply_processors(raw, samplers, proc_rows) if proc_rows else raw
    if constrained:
        x = apply_bitmask(x, fill_masks(constrained, batch, vocab))
    greedy_rows = [i for i, s in enumerate(samplers) if s.argmax]
    sampled_rows = [i for i, s in enumerate(samplers) if not s.argmax]
    groups: list[tuple[list[int], mx.array]] = []
    new_keys = None
    if greedy_rows:
        xg = x if len(greedy_rows) == batch else x[mx.array(greedy_rows)]
        groups.append((greedy_rows, mx.argmax(xg, axis=-1)))
    if sampled_rows:
        xs = x if len(sampled_rows) == batch else x[mx.array(sampled_rows)]
        tokens, new_keys = _sample_rows(xs, [samplers[i] for i in sampled_rows])
        groups.append((sampled_rows, tokens))
    if len(groups) == 1:
        all_tokens = groups[0][1].astype(mx.int32)
    else:
        all_tokens = mx.zeros((batch,), dtype=mx.int32)
        for rows, toks in groups:
            all_tokens = all_tokens.at[mx.array(rows)].add(toks.astype(mx.int32))

    outputs: list[mx.array] = [all_tokens]
    k_max = min(vocab, max((samplers[i].params.top_logprobs for i in want_lp), default=0))
    if want_lp:
        r = raw if len(want_lp) == batch else raw[mx.array(want_lp)]
        lse = mx.logsumexp(r, axis=-1, keepdims=True)
        chosen = all_tokens if len(want_lp) == batch else all_tokens[mx.array(want_lp)]
        outputs.append(mx.take_along_axis(r, chosen[:, None], axis=-1)[:, 0] - lse[:, 0])
        if k_max:
            top_ids = mx.argpartition(-r, kth=k_max - 1, axis=-1)[:, :k_max]
            outputs += [top_ids, mx.take_along_axis(r, top_ids, axis=-1) - lse]
    if new_keys is not None:
        outputs.append(new_keys)
    mx.eval(*outputs)

    if new_keys is not None:
        for i, key in zip(sampled_rows, host.int_rows(new_keys)):
            samplers[i]._key = key
    tokens_list = host.ints(all_tokens)
    logprob: dict[int, float] = {}
    tops: dict[int, list[tuple[int, float]]] = {}
    if want_lp:
        chosen_lp = host.floats(outputs[1])
        ids = host.int_rows(outputs[2]) if k_max else None
        vals = host.float_rows(outputs[3]) if k_max else None
        for j, row in enumerate(want_lp):
            logprob[row] = chosen_lp[j]
            k = samplers[row].params.top_logprobs
            pairs = sorted(zip(ids[j], vals[j]), key=lambda p: (-p[1], p[0]))[:k] if k and ids and vals else []
            tops[row] = pairs
    return [TokenSample(tokens_list[i], logprob.get(i), tops.get(i)) for i in range(batch)]
