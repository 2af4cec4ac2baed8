"""Batched sampling: parameters, processors, filters, reproducibility, logprobs and speed."""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest

import server  # noqa: F401  (loads OpenBLAS before mlx)
from server.engine.sampling import (
    SamplingParams,
    SequenceSampler,
    TokenSample,
    apply_processors,
    ensure_valid_token_ids,
    sample_batch,
)


def samplers(*params: SamplingParams, prompt: tuple[int, ...] = ()) -> list[SequenceSampler]:
    return [SequenceSampler(p, prompt) for p in params]


def tokens(logits: mx.array, ss: list[SequenceSampler], record: bool = True) -> list[int]:
    out = sample_batch(logits, ss)
    if record:
        for s, o in zip(ss, out):
            s.record(o.token_id)
    return [o.token_id for o in out]


def log_probs(probs: list[float]) -> mx.array:
    return mx.log(mx.array([probs], dtype=mx.float32))


def random_logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> mx.array:
    return mx.array(np.random.default_rng(seed).normal(size=(rows, vocab)).astype(np.float32) * scale)


# ----------------------------------------------------------------------------------------------- params


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_tokens", 0),
        ("max_tokens", 2.5),
        ("temperature", -0.1),
        ("temperature", 2.01),
        ("temperature", float("nan")),
        ("temperature", "1"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("top_k", 1.5),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.5),
        ("frequency_penalty", 3.0),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("logit_bias", {5: 101.0}),
        ("logit_bias", {5: -100.5}),
        ("logit_bias", {-1: 1.0}),
        ("logit_bias", {"x": 1.0}),
        ("logit_bias", [1, 2]),
        ("seed", 1.5),
        ("stop", ("",)),
        ("stop", (3,)),
        ("stop_token_ids", (-1,)),
        ("top_logprobs", 21),
        ("top_logprobs", -1),
        ("n", 0),
        ("n", 129),
        ("logprobs", "yes"),
    ],
)
def test_out_of_range_params_raise_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    assert field.split("_")[0] in str(info.value)


def test_top_logprobs_requires_logprobs() -> None:
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingParams(top_logprobs=3)
    assert SamplingParams(logprobs=True, top_logprobs=20).top_logprobs == 20


def test_params_normalise_and_stay_frozen() -> None:
    p = SamplingParams(logit_bias={"7": 5, 3: -1.5}, stop="END", temperature=0)
    assert dict(p.logit_bias) == {7: 5.0, 3: -1.5} and p.stop == ("END",) and p.greedy
    assert not SamplingParams().greedy
    hash(p)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        p.logit_bias[7] = 1.0  # type: ignore[index]
    q = dataclasses.replace(p, seed=42)
    assert q.seed == 42 and q.logit_bias == p.logit_bias


def test_token_ids_are_checked_against_the_vocabulary() -> None:
    ensure_valid_token_ids(SamplingParams(logit_bias={9: 1.0}, stop_token_ids=(0,)), 10)
    with pytest.raises(ValueError, match="vocabulary"):
        ensure_valid_token_ids(SamplingParams(logit_bias={10: 1.0}), 10)
    with pytest.raises(ValueError, match="vocabulary"):
        ensure_valid_token_ids(SamplingParams(stop_token_ids=(12,)), 10)
    with pytest.raises(ValueError, match="vocabulary"):
        sample_batch(mx.zeros((1, 10)), samplers(SamplingParams(logit_bias={10: 1.0})))
    with pytest.raises(ValueError):
        sample_batch(mx.zeros((2, 10)), samplers(SamplingParams()))
    assert sample_batch(mx.zeros((0, 10)), []) == []


# ----------------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_greedy_is_argmax(dtype: mx.Dtype) -> None:
    logits = random_logits(8, 1000, seed=1).astype(dtype)
    expected = np.argmax(np.array(logits.astype(mx.float32)), axis=-1).tolist()
    assert tokens(logits, samplers(*[SamplingParams(temperature=0)] * 8)) == expected
    # the same rows through the general path (one row asks for logprobs) give the same argmax
    mixed = samplers(*[SamplingParams(temperature=0)] * 7, SamplingParams(temperature=0, logprobs=True))
    assert tokens(logits, mixed) == expected


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = random_logits(6, 500, seed=2, scale=1.0)
    expected = np.argmax(np.array(logits), axis=-1).tolist()
    for _ in range(5):
        assert tokens(logits, samplers(*[SamplingParams(top_k=1, seed=i) for i in range(6)])) == expected
        assert tokens(logits, samplers(*[SamplingParams(top_p=1e-6, seed=i) for i in range(6)])) == expected
        assert (
            tokens(logits, samplers(*[SamplingParams(top_p=1e-6, top_k=50, temperature=2, seed=i) for i in range(6)]))
            == expected
        )


# -------------------------------------------------------------------------------------- reproducibility


def test_same_seed_same_tokens_different_seed_differs() -> None:
    steps = [random_logits(1, 300, seed=s, scale=0.5) for s in range(12)]

    def run(seed: int, **kw: object) -> list[int]:
        ss = samplers(SamplingParams(seed=seed, **kw))
        return [tokens(logits, ss)[0] for logits in steps]

    for kw in ({}, {"top_k": 40}, {"top_p": 0.9}, {"min_p": 0.05, "temperature": 1.5}):
        assert run(7, **kw) == run(7, **kw)
        assert run(7, **kw) != run(8, **kw)
    # an unseeded sampler draws its key from os.urandom
    assert len({tuple(run(None)) for _ in range(3)}) > 1  # type: ignore[arg-type]


def test_a_rows_samples_do_not_depend_on_the_rest_of_the_batch() -> None:
    vocab, steps = 2000, 8
    target = SamplingParams(seed=123, top_p=0.95, top_k=200, temperature=0.9, presence_penalty=0.5)
    others = [
        SamplingParams(temperature=0),
        SamplingParams(seed=5),
        SamplingParams(seed=6, top_p=0.5),
        SamplingParams(seed=7, top_k=3, logprobs=True, top_logprobs=2),
        SamplingParams(seed=8, min_p=0.2),
        SamplingParams(seed=9, repetition_penalty=1.3, logit_bias={4: 5.0}),
    ]
    alone = samplers(target)
    together = samplers(others[0], others[1], target, *others[2:])
    mates = samplers(SamplingParams(seed=1, top_p=0.3), target)
    for step in range(steps):
        logits = random_logits(len(others) + 1, vocab, seed=100 + step, scale=1.0)
        row = logits[2:3]
        a = tokens(row, alone)[0]
        b = tokens(logits, together)[2]
        c = tokens(mx.concatenate([logits[:1], row]), mates)[1]
        assert a == b == c, step


# ---------------------------------------------------------------------------------------------- filters


PROBS = [0.5, 0.3, 0.15, 0.05]


def sampled_set(params: SamplingParams, logits: mx.array, draws: int = 400) -> Counter[int]:
    batch = mx.broadcast_to(logits, (draws, logits.shape[-1]))
    ss = samplers(*[dataclasses.replace(params, seed=i) for i in range(draws)])
    return Counter(tokens(batch, ss))


@pytest.mark.parametrize(
    "params,allowed",
    [
        (SamplingParams(), {0, 1, 2, 3}),
        (SamplingParams(top_k=2), {0, 1}),
        (SamplingParams(top_k=3), {0, 1, 2}),
        (SamplingParams(top_p=0.75), {0, 1}),
        (SamplingParams(top_p=0.85), {0, 1, 2}),
        (SamplingParams(top_p=0.85, top_k=2), {0, 1}),
        (SamplingParams(min_p=0.2), {0, 1, 2}),
        (SamplingParams(min_p=0.5), {0, 1}),
        (SamplingParams(min_p=0.5, temperature=0.5), {0}),  # min_p acts on the tempered distribution
        (SamplingParams(top_p=0.4, temperature=2.0), {0, 1}),  # top_p too: 0.5 -> ~0.38 at T=2
    ],
)
def test_filters_keep_exactly_the_expected_tokens(params: SamplingParams, allowed: set[int]) -> None:
    seen = sampled_set(params, log_probs(PROBS))
    assert set(seen) == allowed


def test_top_p_over_a_large_vocabulary_matches_a_full_sort() -> None:
    """Flat rows whose nucleus is larger than the candidate window, and peaked ones whose is not."""
    vocab = 5000
    flat, peaked = random_logits(1, vocab, seed=3, scale=0.2), random_logits(1, vocab, seed=4, scale=6.0)
    for logits, top_p in ((flat, 0.9), (peaked, 0.9), (flat, 0.3), (peaked, 0.5)):
        probs = np.array(mx.softmax(logits, axis=-1))[0].astype(np.float64)
        order = np.argsort(-probs)
        keep = int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)
        nucleus = set(order[:keep].tolist())
        seen = sampled_set(SamplingParams(top_p=top_p), logits, draws=300)
        assert set(seen) <= nucleus
        if keep > 50:  # the draws spread well past what a 1-token window would allow
            assert len(seen) > 50


def test_temperature_one_follows_the_softmax() -> None:
    logits = mx.array([[2.0, 1.0, 0.5, -1.0]])
    draws = 2000
    for temperature in (1.0, 0.5):
        seen = sampled_set(SamplingParams(temperature=temperature), logits, draws=draws)
        expected = np.array(mx.softmax(logits / temperature, axis=-1))[0]
        observed = np.array([seen[i] for i in range(4)]) / draws
        assert np.abs(observed - expected).max() < 0.04, (temperature, observed, expected)


# ------------------------------------------------------------------------------------------- processors


def test_logit_bias_bans_and_forces() -> None:
    logits = mx.array([[5.0, 1.0, 0.0, -3.0]])
    assert tokens(logits, samplers(SamplingParams(temperature=0, logit_bias={0: -100}))) == [1]
    assert set(sampled_set(SamplingParams(logit_bias={0: -100}), logits, 200)) == {1, 2, 3}
    assert set(sampled_set(SamplingParams(logit_bias={3: 100}), logits, 200)) == {3}


def test_presence_and_frequency_penalties_exact() -> None:
    s = SequenceSampler(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), prompt_token_ids=[4, 5])
    for t in (1, 1, 2, 1):
        s.record(t)
    out = apply_processors(mx.zeros((1, 6)), [s])
    # count * frequency + presence, output tokens only (prompt tokens 4, 5 untouched)
    assert out.tolist() == [[0.0, -1.75, -0.75, 0.0, 0.0, 0.0]]
    neg = SequenceSampler(SamplingParams(presence_penalty=-1.0), [])
    neg.record(3)
    assert apply_processors(mx.zeros((1, 6)), [neg]).tolist() == [[0, 0, 0, 1.0, 0, 0]]


def test_penalties_change_which_token_wins() -> None:
    logits = mx.array([[3.0, 2.0, 0.0]])
    ss = samplers(SamplingParams(temperature=0, frequency_penalty=0.6))
    # token 0 leads by 1.0: after 2 uses it is down 1.2 and token 1 takes over, then they alternate
    assert [tokens(logits, ss)[0] for _ in range(5)] == [0, 0, 1, 0, 1]
    ss = samplers(SamplingParams(temperature=0, presence_penalty=2.0))
    # presence is paid once: with 0 and 1 both used (1.0 vs 0.0 vs 0.0) token 0 wins from then on
    assert [tokens(logits, ss)[0] for _ in range(5)] == [0, 1, 0, 0, 0]


def test_repetition_penalty_over_prompt_and_output() -> None:
    logits = mx.array([[2.0, -2.0, 1.0, 0.5, 0.0, 3.0]])
    s = SequenceSampler(SamplingParams(repetition_penalty=2.0), prompt_token_ids=[0, 1, 4])
    assert apply_processors(logits, [s]).tolist() == [[1.0, -4.0, 1.0, 0.5, 0.0, 3.0]]
    s.record(2)
    s.record(2)
    assert apply_processors(logits, [s]).tolist() == [[1.0, -4.0, 0.5, 0.5, 0.0, 3.0]]
    # order: bias first, then the penalty on the biased logit
    b = SequenceSampler(SamplingParams(repetition_penalty=2.0, logit_bias={0: 2.0, 3: -1.0}), [0, 3])
    assert apply_processors(logits, [b]).tolist() == [[2.0, -2.0, 1.0, -1.0, 0.0, 3.0]]
    # and it steers greedy decoding away from a repeated token
    ss = samplers(SamplingParams(temperature=0, repetition_penalty=1.6), prompt=(5,))
    assert tokens(logits, ss) == [0]
    # rows without processors are untouched, the caller's logits too
    two = samplers(SamplingParams(), SamplingParams(repetition_penalty=2.0), prompt=(0,))
    both = mx.concatenate([logits, logits])
    assert apply_processors(both, two).tolist() == [logits[0].tolist(), [1.0, *logits[0, 1:].tolist()]]
    assert both[1, 0].item() == 2.0


# --------------------------------------------------------------------------------------------- logprobs


def test_logprobs_come_from_the_raw_distribution() -> None:
    logits = random_logits(3, 100, seed=9)
    raw = np.array(logits, dtype=np.float64)
    shifted = raw - raw.max(-1, keepdims=True)
    expected = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    params = [
        SamplingParams(temperature=0, logprobs=True, top_logprobs=5),
        SamplingParams(
            seed=3, logprobs=True, top_logprobs=20, presence_penalty=2.0, logit_bias={0: 50}, temperature=0.3
        ),
        SamplingParams(seed=4, logprobs=True),
    ]
    ss = samplers(*params)
    ss[1].record(int(np.argmax(raw[1])))
    out = sample_batch(logits, ss)
    for row, (sample, p) in enumerate(zip(out, params)):
        assert sample.logprob == pytest.approx(expected[row, sample.token_id], abs=1e-4)
        assert sample.top_logprobs is not None and len(sample.top_logprobs) == p.top_logprobs
        order = np.argsort(-expected[row])[: p.top_logprobs]
        assert [t for t, _ in sample.top_logprobs] == order.tolist()
        for t, lp in sample.top_logprobs:
            assert lp == pytest.approx(expected[row, t], abs=1e-4)
        values = [lp for _, lp in sample.top_logprobs]
        assert values == sorted(values, reverse=True)
    assert out[1].token_id == 0  # the bias moved the sample, not the reported distribution
    assert out[2].top_logprobs == []
    plain = sample_batch(logits[:2], samplers(SamplingParams(seed=1), SamplingParams(temperature=0)))
    assert all(isinstance(s, TokenSample) and s.logprob is None and s.top_logprobs is None for s in plain)


# ------------------------------------------------------------------------------------------------ speed


def _time(logits: mx.array, params: list[SamplingParams], repeats: int = 5) -> float:
    ss = samplers(*params, prompt=tuple(range(0, 3000, 7)))
    tokens(logits, ss)  # warm up (compiles, caches)
    start = time.perf_counter()
    for _ in range(repeats):
        tokens(logits, ss)
    return (time.perf_counter() - start) / repeats


def test_batch_of_64_timings(capsys: pytest.CaptureFixture[str]) -> None:
    batch, vocab = 64, 49152
    logits = random_logits(batch, vocab, seed=11).astype(mx.bfloat16)
    mx.eval(logits)
    greedy = _time(logits, [SamplingParams(temperature=0)] * batch)
    sampled = _time(logits, [SamplingParams(seed=i) for i in range(batch)])
    kinds = [
        SamplingParams(temperature=0),
        SamplingParams(seed=1, temperature=0.7),
        SamplingParams(seed=2, top_k=40, top_p=0.9),
        SamplingParams(seed=3, top_p=0.95, min_p=0.05),
        SamplingParams(
            seed=4, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.1, logit_bias={5: 3.0}
        ),
        SamplingParams(temperature=0, logprobs=True, top_logprobs=5),
        SamplingParams(seed=5, top_k=20),
        SamplingParams(seed=6, logprobs=True),
    ]
    mixed = _time(logits, [kinds[i % len(kinds)] for i in range(batch)])
    with capsys.disabled():
        print(
            f"\n[sampling (64, 49152) bf16] greedy fast path {greedy * 1e3:.1f} ms, "
            f"all temperature=1 {sampled * 1e3:.1f} ms, mixed {mixed * 1e3:.1f} ms per step"
        )
    assert greedy < 0.25 and greedy * 3 < mixed
    assert mixed < 5.0 and not math.isnan(mixed)
