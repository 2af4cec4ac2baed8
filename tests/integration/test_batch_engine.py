"""The batch engine on the real default model (SmolLM2-135M-Instruct, float32 on CPU)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from mlx_lm.generate import generate_step

from server.engine.block_pool import PoolExhaustedError
from server.engine.engine import Engine, EngineConfig
from server.engine.request import GenerationRequest, TokenEvent
from server.engine.request_stream import GenerationError
from server.engine.sampling import SamplingParams
from server.engine.scheduler import SchedulerConfig
from server.errors import InvalidRequestError
from server.registry import ModelRegistry
from tests.split_engine import SplitEngine

BS = 16
SYSTEM = (
    "You are a meticulous assistant for a company that builds servers for language models. "
    "Answer briefly, cite nothing, and never invent facts. Keep every answer under fifty words. "
)


@pytest.fixture(scope="module")
def smol(request: pytest.FixtureRequest, split_engine: SplitEngine | None) -> tuple[Any, Any]:
    """SmolLM2-135M; run on rank 0 of a world (tests/distributed_pytest.py), the split model's whole copy."""
    if split_engine is not None:
        return split_engine.reference
    registry: ModelRegistry = request.getfixturevalue("registry")
    served = registry.get("smollm2-135m-instruct")
    return served.model, served.tokenizer


@pytest.fixture(scope="module")
def engine(smol: tuple[Any, Any], split_engine: SplitEngine | None) -> Iterator[Engine]:
    """The engine most tests share; run on rank 0 of a world, one over the model's shard whose other ranks follow
    (the engines single tests build for themselves stay in this process)."""
    model, tokenizer = smol
    # decode_ahead on: the overlapped greedy path (the default on GPUs) must be exact too
    config = EngineConfig(block_size=BS, num_blocks=256, decode_ahead=True)
    eng = Engine(model, tokenizer, config) if split_engine is None else split_engine.engine(config)
    eng.start()
    yield eng
    eng.shutdown()


_ids = iter(range(10**9))


def request(
    tokens: list[int], max_tokens: int = 8, conversation: str | None = None, salt: bytes = b"", **params: Any
) -> GenerationRequest:
    return GenerationRequest(
        f"req-{next(_ids)}",
        tokens,
        SamplingParams(max_tokens=max_tokens, temperature=params.pop("temperature", 0.0), **params),
        conversation,
        salt,
    )


def chat_tokens(tokenizer: Any, text: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def tokens_of(events: list[TokenEvent], index: int = 0) -> list[int]:
    return [e.token_id for e in events if e.index == index and e.token_id is not None]


def reference(smol: tuple[Any, Any], prompt: list[int], max_tokens: int) -> list[int]:
    """mlx-lm's own single-sequence greedy generation, stopping at EOS like the engine."""
    import mlx.core as mx

    model, tokenizer = smol
    out: list[int] = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens):
        out.append(int(token))
        if int(token) in tokenizer.eos_token_ids:
            break
    return out


def idle(engine: Engine, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.scheduler.has_work and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    engine.check_integrity()


def test_fresh_generation(engine: Engine, smol: tuple[Any, Any]) -> None:
    prompt = chat_tokens(smol[1], "What is the capital of France?")
    events = engine.generate(request(prompt, max_tokens=12, conversation="fresh"))
    assert "".join(e.text for e in events).strip()
    assert events[-1].finish_reason in ("stop", "length")
    assert events[-1].prompt_tokens == len(prompt)
    idle(engine)
    assert len(engine.kv.conversations["fresh"].block_ids) == -(-(len(prompt) + len(tokens_of(events)) - 1) // BS)


def test_second_turn_computes_only_new_tokens_and_matches_recompute(engine: Engine, smol: tuple[Any, Any]) -> None:
    tokenizer = smol[1]
    turn1 = chat_tokens(tokenizer, "Name a colour of the sky.")
    first = engine.generate(request(turn1, max_tokens=10, conversation="resume"))
    out1 = tokens_of(first)
    idle(engine)
    blocks1 = list(engine.kv.conversations["resume"].block_ids)
    cached_tokens_expected = len(turn1) + len(out1) - 1  # the last sampled token was never fed
    follow = tokenizer.encode(
        "<|im_end|>\n<|im_start|>user\nAnd at night?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
    )
    turn2 = turn1 + out1 + list(follow)
    computed_before = engine.stats().prompt_tokens_computed
    second = engine.generate(request(turn2, max_tokens=10, conversation="resume"))
    computed = engine.stats().prompt_tokens_computed - computed_before
    assert second[-1].cached_tokens == cached_tokens_expected
    assert computed == len(turn2) - cached_tokens_expected
    idle(engine)
    blocks2 = engine.kv.conversations["resume"].block_ids
    assert blocks2[: cached_tokens_expected // BS] == blocks1[: cached_tokens_expected // BS]
    scratch = engine.generate(request(turn2, max_tokens=10, salt=b"no-reuse"))
    assert scratch[-1].cached_tokens == 0
    assert tokens_of(second) == tokens_of(scratch)


def test_generated_blocks_are_written_back_and_reused_exactly(engine: Engine, smol: tuple[Any, Any]) -> None:
    """Decode K/V reaches the pool by write-back (every few steps and at the finish): a later prompt that
    extends prompt + output (no conversation key) reuses every full block of it, and its output equals
    mlx-lm recomputing that prompt from scratch."""
    prompt = chat_tokens(smol[1], "Count slowly from one to fifty, one number per line.")
    first = engine.generate(request(prompt, max_tokens=40, ignore_eos=True, salt=b"write-back"))
    out = tokens_of(first)
    assert len(out) == 40  # more decode steps than one write-back period
    idle(engine)
    extended = prompt + out + smol[1].encode(" and", add_special_tokens=False)
    second = engine.generate(request(extended, max_tokens=6, salt=b"write-back"))
    assert second[-1].cached_tokens == (len(prompt) + len(out) - 1) // BS * BS
    assert tokens_of(second) == reference(smol, extended, 6)
    idle(engine)


def test_three_agents_of_different_lengths_batch_together(engine: Engine, smol: tuple[Any, Any]) -> None:
    tokenizer = smol[1]
    prompts = [
        chat_tokens(tokenizer, "Hi"),
        chat_tokens(tokenizer, "Tell me about rivers. " * 6),
        chat_tokens(tokenizer, "Summarise the history of Rome in one line. " * 12),
    ]
    assert len({len(p) for p in prompts}) == 3
    results: dict[int, list[TokenEvent]] = {}

    def run(i: int) -> None:
        results[i] = engine.generate(request(prompts[i], max_tokens=8, salt=b"agents"))

    before = engine.stats().max_decode_batch
    engine._stats.max_decode_batch = 0
    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(results[i][-1].finish_reason in ("stop", "length") for i in range(3))
    assert engine.stats().max_decode_batch >= 2
    engine._stats.max_decode_batch = max(before, engine._stats.max_decode_batch)
    idle(engine)


def test_no_leaks_after_generations_cancellations_and_failures(engine: Engine, smol: tuple[Any, Any]) -> None:
    tokenizer = smol[1]
    engine.kv.unpin_all()
    idle(engine)
    assert engine.pool.num_used == 0
    for i in range(10):
        engine.generate(request(chat_tokens(tokenizer, f"Count to {i}."), max_tokens=4, conversation=f"leak-{i % 3}"))
    # cancellations mid-stream
    for i in range(3):
        got_one = threading.Event()
        req = request(chat_tokens(tokenizer, f"Write a long story number {i}."), max_tokens=200)
        engine.submit(req, lambda e: got_one.set())
        assert got_one.wait(30)
        engine.abort(req.request_id)
    # requests that fail validation never reach the pool
    with pytest.raises(InvalidRequestError):
        engine.submit(request([1, 2, 3], logit_bias={10**7: 5.0}), lambda e: None)
    with pytest.raises(InvalidRequestError):
        engine.submit(request([10**8]), lambda e: None)
    idle(engine)
    pool = engine.pool
    assert pool.num_free + pool.num_used == pool.num_blocks
    assert pool.num_used == engine.kv.num_pinned_blocks  # only conversation pins hold blocks
    assert set(engine.kv.conversations) == {"leak-0", "leak-1", "leak-2"}
    engine.kv.unpin_all()  # eviction reclaims them
    assert pool.num_used == 0 and pool.num_free == pool.num_blocks
    pool.check_integrity()


def test_pool_exhaustion_fails_cleanly_and_engine_keeps_serving(smol: tuple[Any, Any]) -> None:
    model, tokenizer = smol
    small = Engine(
        model, tokenizer, EngineConfig(block_size=BS, num_blocks=6, scheduler=SchedulerConfig(queue_timeout=0.5))
    )
    small.start()
    try:
        too_long = chat_tokens(tokenizer, "word " * 120)
        with pytest.raises(PoolExhaustedError):
            small.generate(request(too_long, max_tokens=4))
        # one request fills most of the pool for a while; a second cannot get blocks in time
        hog = request(
            chat_tokens(tokenizer, "Tell me a long story about dragons. " * 3), max_tokens=30, ignore_eos=True
        )
        done = threading.Event()
        small.submit(hog, lambda events: any(e.finish_reason for e in events) and done.set())
        time.sleep(0.2)
        with pytest.raises(PoolExhaustedError):
            small.generate(request(chat_tokens(tokenizer, "And a story about cats. " * 3), max_tokens=4))
        assert done.wait(120)
        ok = small.generate(request(chat_tokens(tokenizer, "Hi"), max_tokens=3))
        assert ok[-1].finish_reason in ("stop", "length")
        idle(small)
        assert small.pool.num_used == 0
    finally:
        small.shutdown()


def greedy_reference(smol: tuple[Any, Any], prompt: list[int], max_tokens: int) -> list[int]:
    """mlx-lm's own single-sequence greedy generation of exactly max_tokens tokens (EOS ignored)."""
    import mlx.core as mx

    return [int(token) for token, _ in generate_step(mx.array(prompt), smol[0], max_tokens=max_tokens)]


@pytest.mark.parametrize("decode_ahead", [False, True])
def test_preempted_sequences_resume_with_the_tokens_of_an_unpreempted_run(
    smol: tuple[Any, Any], decode_ahead: bool
) -> None:
    """A pool too small for two growing sequences: the newer one is preempted (its blocks freed), waits,
    and resumes by recomputing its prompt and generated tokens; every sequence's greedy tokens still equal
    mlx-lm's solo run, also while greedy steps run one ahead."""
    model, tokenizer = smol
    prompts = [
        chat_tokens(tokenizer, "Count slowly from one to twenty."),
        chat_tokens(tokenizer, "List the colours of the rainbow."),
    ]
    max_tokens = 40
    needed = [-(-(len(p) + max_tokens) // BS) for p in prompts]
    # both prompts fit at admission, both sequences grown to the end do not: someone must be preempted
    num_blocks = max(needed) + 1
    assert sum(-(-len(p) // BS) for p in prompts) <= num_blocks < sum(needed)
    small = Engine(model, tokenizer, EngineConfig(block_size=BS, num_blocks=num_blocks, decode_ahead=decode_ahead))
    small.start()
    try:
        results: dict[int, list[int]] = {}
        requests = [request(p, max_tokens=max_tokens, ignore_eos=True, salt=b"preempt") for p in prompts]
        threads = [
            threading.Thread(target=lambda i=i: results.__setitem__(i, tokens_of(small.generate(requests[i]))))
            for i in range(len(prompts))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert small.kv.num_preemptions > 0
        for i, prompt in enumerate(prompts):
            assert results[i] == greedy_reference(smol, prompt, max_tokens)
        idle(small)
        assert small.pool.num_used == 0
    finally:
        small.shutdown()


def test_empty_prompt_is_rejected(engine: Engine) -> None:
    with pytest.raises(InvalidRequestError, match="Prompt cannot be empty"):
        engine.submit(request([]), lambda e: None)


class _CountingLimits:
    """The engine's own limits, counting how often a request is checked."""

    def __init__(self, limits: Any) -> None:
        self.limits, self.checks = limits, 0

    def check(self, request: GenerationRequest) -> Any:
        self.checks += 1
        return self.limits.check(request)


def test_a_request_is_checked_once(engine: Engine, smol: tuple[Any, Any]) -> None:
    tokens = chat_tokens(smol[1], "Hi")
    counting = _CountingLimits(engine.limits)
    engine.limits = counting  # type: ignore[assignment]
    try:
        valid = engine.validate(request(tokens, max_tokens=3))
        assert valid.max_new_tokens == 3 and engine.validate(valid) is valid
        events = engine.generate(valid)
        assert counting.checks == 1 and events[-1].completion_tokens == 3
        engine.generate(request(tokens, max_tokens=2))  # unchecked: submit checks it, the engine thread trusts it
        assert counting.checks == 2
    finally:
        engine.limits = counting.limits


@pytest.mark.parametrize("kind", ["short", "multi-block"])
def test_greedy_matches_mlx_lm_generate(engine: Engine, smol: tuple[Any, Any], kind: str) -> None:
    text = "What is 2+2?" if kind == "short" else "Explain why the sky is blue, in detail please. " * 8
    prompt = chat_tokens(smol[1], text)
    assert kind == "short" or len(prompt) > 4 * BS
    ahead_before = engine.stats().decode_steps_ahead
    ours = tokens_of(engine.generate(request(prompt, max_tokens=16, salt=kind.encode())))
    assert ours == reference(smol, prompt, 16)
    if len(ours) > 3:  # greedy decoding overlapped steps (ran one step ahead) and stayed exact
        assert engine.stats().decode_steps_ahead > ahead_before


def test_resumed_conversation_matches_mlx_lm_generate(engine: Engine, smol: tuple[Any, Any]) -> None:
    tokenizer = smol[1]
    turn1 = chat_tokens(tokenizer, "Give me one fruit.")
    out1 = tokens_of(engine.generate(request(turn1, max_tokens=8, conversation="exact")))
    turn2 = (
        turn1
        + out1
        + list(
            tokenizer.encode(
                "<|im_end|>\n<|im_start|>user\nAnother?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
            )
        )
    )
    events = engine.generate(request(turn2, max_tokens=12, conversation="exact"))
    assert events[-1].cached_tokens > len(turn1)
    assert tokens_of(events) == reference(smol, turn2, 12)


def test_mixed_batch_matches_solo_runs(engine: Engine, smol: tuple[Any, Any]) -> None:
    tokenizer = smol[1]
    texts = [
        "Name three planets.",
        "What is the boiling point of water?",
        "Write a haiku about snow.",
        "Translate 'good morning' to French.",
    ]
    prompts = [chat_tokens(tokenizer, t) for t in texts]
    solo = [reference(smol, p, 12) for p in prompts]
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        results[i] = tokens_of(engine.generate(request(prompts[i], max_tokens=12, salt=b"mixed")))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    agree = sum(results[i] == solo[i] for i in range(len(prompts)))
    # float32 sums over differently shaped batches may differ in the last bits; report, and require most
    print(f"mixed batch: {agree}/{len(prompts)} sequences token-identical to their solo mlx-lm run")
    assert agree >= len(prompts) - 1


def test_shared_system_prompt_is_computed_once(engine: Engine, smol: tuple[Any, Any]) -> None:
    tokenizer = smol[1]
    a = chat_tokens(tokenizer, "First question about servers?", system=SYSTEM * 3)
    b = chat_tokens(tokenizer, "A different question entirely?", system=SYSTEM * 3)
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert shared > 4 * BS
    first = engine.generate(request(a, max_tokens=4, conversation="agent-a", salt=b"shared"))
    second = engine.generate(request(b, max_tokens=4, conversation="agent-b", salt=b"shared"))
    assert first[-1].cached_tokens == 0
    assert second[-1].cached_tokens == (shared // BS) * BS


def test_simultaneous_arrivals_compute_a_shared_prefix_once(smol: tuple[Any, Any]) -> None:
    """Four agents sending the same system prompt in the same step: the first computes it, the others
    wait for its blocks and reuse them (cached_tokens), so the prefix is computed once, not four times."""
    import queue

    model, tokenizer = smol
    prompts = [chat_tokens(tokenizer, f"Agent {i} asks question number {i}?", system=SYSTEM * 3) for i in range(4)]
    shared = min(next(i for i, (x, y) in enumerate(zip(prompts[0], p)) if x != y) for p in prompts[1:])
    assert shared > 4 * BS
    eng = Engine(model, tokenizer, EngineConfig(block_size=BS, num_blocks=128))
    events: queue.Queue[TokenEvent] = queue.Queue()
    for p in prompts:  # queued before the engine thread starts: its first step sees all four waiting
        eng.submit(request(p, max_tokens=2), lambda batch: [events.put(e) for e in batch])
    eng.start()
    try:
        finals = []
        while len(finals) < len(prompts):
            event = events.get(timeout=120)
            if event.finish_reason is not None:
                finals.append(event)
        cached = sorted(e.cached_tokens for e in finals)
        assert cached[0] == 0 and all(c >= (shared // BS) * BS for c in cached[1:]), cached
        assert eng.stats().prompt_tokens_computed == sum(len(p) for p in prompts) - sum(cached)
        assert sum(cached) >= 3 * (shared // BS) * BS
        idle(eng)
    finally:
        eng.shutdown()


def test_n_sequences_share_the_prompt_blocks(engine: Engine, smol: tuple[Any, Any]) -> None:
    prompt = chat_tokens(smol[1], "Invent a name for a cat. " * 6)
    computed_before = engine.stats().prompt_tokens_computed
    events = engine.generate(request(prompt, max_tokens=6, temperature=0.9, seed=11, n=3, salt=b"fork"))
    computed = engine.stats().prompt_tokens_computed - computed_before
    finals = [e for e in events if e.finish_reason]
    assert sorted(e.index for e in finals) == [0, 1, 2]
    # sequence 0 computes the prompt; the others reuse its full blocks and compute < one block each
    assert computed < len(prompt) + 2 * BS
    assert all(e.cached_tokens >= (len(prompt) // BS - 1) * BS for e in finals if e.index > 0)
    idle(engine)


def test_same_seed_same_output(engine: Engine, smol: tuple[Any, Any]) -> None:
    prompt = chat_tokens(smol[1], "Say something surprising.")
    runs = [
        tokens_of(engine.generate(request(prompt, max_tokens=10, temperature=1.0, seed=1234, salt=s)))
        for s in (b"s1", b"s2")
    ]
    assert runs[0] == runs[1]
    other = tokens_of(engine.generate(request(prompt, max_tokens=10, temperature=1.0, seed=99)))
    assert other != runs[0]


def test_stop_string_is_not_emitted(engine: Engine, smol: tuple[Any, Any]) -> None:
    prompt = chat_tokens(smol[1], "What is the capital of France?")
    full = "".join(e.text for e in engine.generate(request(prompt, max_tokens=12)))
    assert "Paris" in full
    events = engine.generate(request(prompt, max_tokens=12, stop=("Paris",)))
    text = "".join(e.text for e in events)
    assert "Paris" not in text and full.startswith(text) and events[-1].finish_reason == "stop"


def test_async_stream_cancel_frees_blocks_within_a_step(engine: Engine, smol: tuple[Any, Any]) -> None:
    import asyncio

    engine.kv.unpin_all()
    idle(engine)
    prompt = chat_tokens(smol[1], "Write a very long poem about the sea.")

    async def consume_three() -> int:
        seen = 0
        stream = engine.stream(request(prompt, max_tokens=500, ignore_eos=True))
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.aclose()  # the generator's finally aborts the request
        return seen

    before = engine.stats()
    assert asyncio.run(consume_three()) == 3
    deadline = time.monotonic() + 5
    while engine.pool.num_used and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.pool.num_used == 0
    engine.check_integrity()

    # the abort ran with no step after it: the published counts must show it anyway (metrics, idle checks)
    def published() -> tuple[int, ...]:
        s = engine.stats()
        return (
            s.requests_submitted - before.requests_submitted,
            s.requests_finished - before.requests_finished,
            s.running,
            s.waiting,
            s.blocks_used,
        )

    deadline = time.monotonic() + 5
    while published() != (1, 1, 0, 0, 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert published() == (1, 1, 0, 0, 0)


def test_prompt_logprobs_match_a_full_forward(engine: Engine, smol: tuple[Any, Any]) -> None:
    import mlx.core as mx

    model, tokenizer = smol
    prompt = chat_tokens(tokenizer, "Spell the word banana.")
    events = engine.generate(request(prompt, max_tokens=2, logprobs=True, top_logprobs=2, prompt_logprobs=2))
    got = next(e.prompt_logprobs for e in events if e.prompt_logprobs)
    logits = model(mx.array([prompt]))[0].astype(mx.float32)
    reference_lp = (logits - mx.logsumexp(logits, axis=-1, keepdims=True)).tolist()
    assert [t for t, _, _ in got] == prompt[1:]
    for position, (token, logprob, alternatives) in enumerate(got):
        assert abs(logprob - reference_lp[position][token]) < 1e-3
        assert len(alternatives) == 2 and alternatives[0][1] >= alternatives[1][1]
    idle(engine)


def test_output_thread_delivers_the_same_events(engine: Engine, smol: tuple[Any, Any]) -> None:
    """Events built on the output thread (the GPU default) equal inline ones: text, tokens, finish
    reasons and usage, for plain, stop-string, EOS-ended, n > 1 and aborted requests, in order."""
    model, tokenizer = smol
    threaded = Engine(
        model, tokenizer, EngineConfig(block_size=BS, num_blocks=256, decode_ahead=True, output_thread=True)
    )
    assert threaded.output.threaded and not engine.output.threaded
    threaded.start()
    prompts = [chat_tokens(tokenizer, t) for t in ("What is the capital of France?", "Say hi.", "Count to five.")]
    asks: list[dict[str, Any]] = [
        {"max_tokens": 12},
        {"max_tokens": 12, "stop": ("Paris",)},
        {"max_tokens": 40},
        {"max_tokens": 6, "n": 2, "temperature": 0.8, "seed": 5},
    ]

    def shape(events: list[TokenEvent]) -> list[tuple[Any, ...]]:
        return [(e.index, e.token_id, e.text, e.finish_reason, e.completion_tokens, e.prompt_tokens) for e in events]

    try:
        for i, ask in enumerate(asks):
            prompt = prompts[i % len(prompts)]
            results = []
            for eng in (engine, threaded):
                results.append(shape(eng.generate(request(prompt, salt=f"out-{i}".encode(), **dict(ask)))))
            assert results[0] == results[1], ask
            assert results[0][-1][3] in ("stop", "length")
        # an abort's final event comes after every token event of its sequence
        got: list[TokenEvent] = []
        done = threading.Event()

        def sink(events: list[TokenEvent]) -> None:
            got.extend(events)
            if any(event.finish_reason is not None for event in events):
                done.set()

        long = request(prompts[2], max_tokens=400, ignore_eos=True)
        threaded.submit(long, sink)
        while len(got) < 3:
            time.sleep(0.01)
        threaded.abort(long.request_id)
        assert done.wait(30)
        time.sleep(0.2)
        assert got[-1].finish_reason == "abort" and all(e.finish_reason is None for e in got[:-1])
        idle(threaded)
    finally:
        threaded.shutdown()
    assert threaded.output._thread is None


def test_a_request_that_fails_to_start_ends_with_an_error_and_the_engine_keeps_serving(
    engine: Engine, smol: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt = chat_tokens(smol[1], "Hello there.")

    def broken(request: Any, sink: Any) -> None:
        raise RuntimeError("cannot build the sampler")

    monkeypatch.setattr(engine.requests, "add", broken)  # what a bug in starting a request would do
    with pytest.raises(GenerationError, match="cannot build the sampler"):
        engine.generate(request(prompt, max_tokens=2, n=2), timeout=30)
    monkeypatch.undo()
    assert tokens_of(engine.generate(request(prompt, max_tokens=2), timeout=60))
    stats = engine.stats()
    assert stats.requests_submitted == stats.requests_finished


def test_a_non_streamed_request_lets_arrivals_prefill_at_the_full_budget(smol: tuple[Any, Any]) -> None:
    """`GenerationRequest.streamed` reaches the scheduler: with a decoding budget of one token a step,
    a 40-token prompt arriving while a non-streamed request decodes is still computed in one step."""
    model, tokenizer = smol
    eng = Engine(
        model,
        tokenizer,
        EngineConfig(
            block_size=BS, num_blocks=64, scheduler=SchedulerConfig(prefill_chunk=512, decoding_prefill_chunk=1)
        ),
    )
    eng.start()
    try:
        for streamed in (False, True):
            first = GenerationRequest(
                f"ns-{streamed}-a",
                chat_tokens(tokenizer, "Count slowly."),
                SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
                streamed=streamed,
            )
            done: list[list[TokenEvent]] = []
            runner = threading.Thread(target=lambda r=first: done.append(eng.generate(r)))
            before = eng.stats().steps
            runner.start()
            while eng.stats().steps < before + 2:  # the first request is decoding
                time.sleep(0.01)
            # 40 tokens sharing no block with the first request's prompt (nothing reused from the cache)
            arrival = request([1000 + 17 * i + (7 if streamed else 0) for i in range(40)], max_tokens=1)
            mid = eng.stats().steps
            eng.generate(arrival)
            steps = eng.stats().steps - mid
            runner.join(120)
            assert len(tokens_of(done[0])) == 20
            if streamed:  # held to one prompt token a step until the streamed decoder finishes
                assert steps >= 8
            else:  # its whole prompt in the step it arrives at, its token at most a step later
                assert steps <= 2
    finally:
        eng.shutdown()
