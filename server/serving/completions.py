"""Legacy completions: prompts (text or token ids, one or many) -> engine requests -> text_completion objects.

Choices are flat: choice ``index = prompt_index * n + j``. ``best_of`` runs
best_of sequences per prompt and keeps the n with the highest total logprob.
``suffix`` uses the model's fill-in-the-middle tokens when it has them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from server.engine import GenerationError, GenerationRequest, PoolExhaustedError, TokenEvent, ValidRequest
from server.errors import InvalidRequestError
from server.metrics import TokenTimer, timed
from server.registry import ServedModel
from server.serving.batch_input import batch_items
from server.serving.generation import SYSTEM_FINGERPRINT, engine_failure
from server.serving.logprobs import TokenText
from server.serving.params import build_params, sampling_fields
from server.serving.scope import RequestScope
from server.wire.chat import PromptTokensDetails, Usage
from server.wire.codec import encode
from server.wire.completions import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest
from server.wire.sse import DONE, ChunkFrame, data_event

MAX_PROMPTS = 2048
MAX_LOGPROBS = 5
FIM_TOKENS = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")


def parse_prompts(prompt: Any, tokenizer: Any) -> list[tuple[list[int], str]]:
    """Every accepted prompt shape as (token ids, text) pairs."""
    items = batch_items(prompt, empty_ids_allowed=True)
    if items is None:
        raise InvalidRequestError(
            "'prompt' must be a string, a list of strings, a list of token ids, or a list of token-id lists.",
            param="prompt",
        )
    if len(items) > MAX_PROMPTS:
        raise InvalidRequestError(f"At most {MAX_PROMPTS} prompts per request.", param="prompt")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append((list(tokenizer.encode(item)), item))
            continue
        if any(not 0 <= t < 2**31 for t in item):  # the tokenizer's decode overflows on these
            raise InvalidRequestError(
                "'prompt' has token ids outside the model's vocabulary.",
                param="prompt" if item is prompt else f"prompt[{i}]",
            )
        out.append((list(item), tokenizer.decode(item)))
    return out


def _with_suffix(ids: list[int], suffix: str, tokenizer: Any) -> list[int]:
    fim = [tokenizer.convert_tokens_to_ids(t) for t in FIM_TOKENS]
    unk = getattr(tokenizer, "unk_token_id", None)
    if any(t is None or t == unk for t in fim):
        raise InvalidRequestError(
            "'suffix' needs a model with fill-in-the-middle tokens; this one has none.", param="suffix"
        )
    prefix, suffix_tok, middle = fim
    return [prefix, *ids, suffix_tok, *tokenizer.encode(suffix, add_special_tokens=False), middle]


@dataclass
class CompletionPlan:
    served: ServedModel
    requests: list[ValidRequest]
    prompt_texts: list[str]
    n: int
    echo: bool
    logprobs: int | None
    include_usage: bool
    timer: TokenTimer | None = None  # set by the route: TTFT and inter-token metrics
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def best_of(self) -> int:
        return self.requests[0].params.n


def prepare(
    body: CompletionRequest, served: ServedModel, scope: RequestScope, conversation: str | None
) -> CompletionPlan:
    tokenizer = served.tokenizer
    n = body.n if body.n is not None else 1
    best_of = body.best_of if body.best_of is not None else n
    if best_of < n:
        raise InvalidRequestError("'best_of' must be greater than or equal to 'n'.", param="best_of")
    if body.stream and best_of > n:
        raise InvalidRequestError("'best_of' cannot be used with 'stream'.", param="best_of")
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
        raise InvalidRequestError(f"'logprobs' must be between 0 and {MAX_LOGPROBS}.", param="logprobs")
    prompts = parse_prompts(body.prompt, tokenizer)
    params = build_params(
        max_tokens=body.max_tokens if body.max_tokens is not None else 16,
        **sampling_fields(body),
        logprobs=body.logprobs is not None or best_of > n,
        top_logprobs=body.logprobs or 0,
        n=best_of,
        prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None else None,
    )
    requests = []
    for ids, _ in prompts:
        if body.suffix:
            ids = _with_suffix(ids, body.suffix, tokenizer)
        request = GenerationRequest(
            request_id=f"cmpl-{uuid.uuid4().hex}",
            prompt_token_ids=ids,
            params=params,
            conversation_key=scope.conversation_key(served.id, conversation),
            salt=scope.salt(served.id),
            streamed=bool(body.stream),
        )
        requests.append(served.running_engine.validate(request))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return CompletionPlan(served, requests, [t for _, t in prompts], n, bool(body.echo), body.logprobs, include_usage)


async def _merged(plan: CompletionPlan) -> AsyncIterator[tuple[int, list[TokenEvent]]]:
    """Event batches of every prompt's request, as (prompt index, events), as they come."""
    if len(plan.requests) == 1:  # one prompt: its stream, without a task and a queue in between
        async for events in timed(plan.timer, plan.served.running_engine.stream(plan.requests[0])):
            yield 0, events
        return
    queue: asyncio.Queue[tuple[int, list[TokenEvent] | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, request: ValidRequest) -> None:
        try:
            async for events in timed(plan.timer, plan.served.running_engine.stream(request)):
                await queue.put((i, events))
        except BaseException as exc:  # re-raised in the consumer
            await queue.put((i, exc))
            return
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(plan.requests)]
    try:
        done = 0
        while done < len(tasks):
            i, item = await queue.get()
            if item is None:
                done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


@dataclass
class _Choice:
    text: str = ""
    finish: str | None = None
    tokens: int = 0
    lp_tokens: list[str] = field(default_factory=list)
    lp_values: list[float | None] = field(default_factory=list)
    lp_tops: list[dict[str, float] | None] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    cached: int = 0

    @property
    def total_logprob(self) -> float:
        return sum(v for v in self.lp_values if v is not None)


class _Accumulator:
    def __init__(self, plan: CompletionPlan) -> None:
        self.plan = plan
        self.text_of = TokenText(plan.served.tokenizer)
        self.eos = plan.served.running_engine.eos_ids
        self.choices = {(p, j): _Choice() for p in range(len(plan.requests)) for j in range(plan.best_of)}
        self.prompt_logprobs: dict[int, list[tuple[int, float, list[tuple[int, float]]]]] = {}

    def add(self, prompt_index: int, event: TokenEvent) -> _Choice:
        choice = self.choices[(prompt_index, event.index)]
        if event.prompt_logprobs is not None and event.index == 0:
            self.prompt_logprobs[prompt_index] = event.prompt_logprobs
        if event.token_id is not None and event.logprob is not None and event.token_id not in self.eos:
            token, _ = self.text_of(event.token_id)
            choice.offsets.append(len(choice.text))
            choice.lp_tokens.append(token)
            choice.lp_values.append(event.logprob)
            tops = {self.text_of(t)[0]: lp for t, lp in event.top_logprobs or []}
            tops.setdefault(token, event.logprob)
            choice.lp_tops.append(tops)
        choice.text += event.text
        if event.finish_reason is not None:
            choice.finish, choice.tokens, choice.cached = (
                event.finish_reason,
                event.completion_tokens,
                event.cached_tokens,
            )
        return choice

    def logprobs_of(self, prompt_index: int, choice: _Choice) -> CompletionLogprobs | None:
        if self.plan.logprobs is None:
            return None
        if not self.plan.echo:
            return CompletionLogprobs(choice.lp_tokens, choice.lp_values, choice.lp_tops, choice.offsets)
        # echo: the prompt's tokens come first; the first has no logprob (nothing precedes it)
        prompt_ids = self.plan.requests[prompt_index].prompt_token_ids
        tokens = [self.text_of(prompt_ids[0])[0]]
        values: list[float | None] = [None]
        tops: list[dict[str, float] | None] = [None]
        for token_id, logprob, alternatives in self.prompt_logprobs.get(prompt_index, []):
            tokens.append(self.text_of(token_id)[0])
            values.append(logprob)
            alts = {self.text_of(t)[0]: lp for t, lp in alternatives}
            alts.setdefault(tokens[-1], logprob)
            tops.append(alts)
        offsets, at = [], 0
        for token in tokens:
            offsets.append(at)
            at += len(token)
        prompt_len = len(self.plan.prompt_texts[prompt_index])
        return CompletionLogprobs(
            tokens + choice.lp_tokens,
            values + choice.lp_values,
            tops + choice.lp_tops,
            offsets + [prompt_len + o for o in choice.offsets],
        )

    def usage(self) -> Usage:
        prompt = sum(len(r.prompt_token_ids) for r in self.plan.requests)
        completion = sum(c.tokens for c in self.choices.values())
        cached = sum(self.choices[(p, 0)].cached for p in range(len(self.plan.requests)))
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )


async def complete(plan: CompletionPlan) -> Completion:
    acc = _Accumulator(plan)
    try:
        async for prompt_index, events in _merged(plan):
            for event in events:
                acc.add(prompt_index, event)
    except (PoolExhaustedError, GenerationError) as exc:
        raise engine_failure(exc) from exc
    choices = []
    for p, prompt_text in enumerate(plan.prompt_texts):
        ranked = [acc.choices[(p, j)] for j in range(plan.best_of)]
        if plan.best_of > plan.n:
            ranked.sort(key=lambda c: c.total_logprob, reverse=True)
        for j, choice in enumerate(ranked[: plan.n]):
            text = prompt_text + choice.text if plan.echo else choice.text
            choices.append(
                CompletionChoice(
                    index=p * plan.n + j, text=text, finish_reason=choice.finish, logprobs=acc.logprobs_of(p, choice)
                )
            )
    return Completion(
        id=plan.id,
        created=plan.created,
        model=plan.served.id,
        choices=choices,
        system_fingerprint=SYSTEM_FINGERPRINT,
        usage=acc.usage(),
    )


def _frame(plan: CompletionPlan) -> ChunkFrame:
    return ChunkFrame(
        Completion(
            id=plan.id, created=plan.created, model=plan.served.id, choices=[], system_fingerprint=SYSTEM_FINGERPRINT
        )
    )


def _batch_choices(plan: CompletionPlan, acc: _Accumulator, p: int, events: list[TokenEvent]) -> list[CompletionChoice]:
    """One prompt's batch of events as stream choices: each sequence's text (and logprobs) in the batch joined."""
    joined: dict[int, tuple[str, str | None, int]] = {}  # sequence index -> (text, finish, logprob entries before)
    for event in events:
        choice = acc.choices[(p, event.index)]
        text, _, before = joined.get(event.index, ("", None, len(choice.lp_tokens)))
        acc.add(p, event)
        joined[event.index] = (text + event.text, event.finish_reason, before)
    choices = []
    for j, (text, finish, before) in joined.items():
        choice = acc.choices[(p, j)]
        if not text and finish is None and plan.logprobs is None:
            continue  # text held back (an unfinished character or a possible stop string): nothing to send yet
        logprobs = None
        if plan.logprobs is not None:
            logprobs = CompletionLogprobs(
                choice.lp_tokens[before:], choice.lp_values[before:], choice.lp_tops[before:], choice.offsets[before:]
            )
        choices.append(CompletionChoice(index=p * plan.n + j, text=text, finish_reason=finish, logprobs=logprobs))
    return choices


async def stream(plan: CompletionPlan) -> AsyncGenerator[bytes, None]:
    """SSE bytes, one item per engine batch of a prompt: each sequence's tokens in the batch are one chunk. An
    echo goes out with the first batch, the last batch with the usage chunk and `[DONE]` (one socket write
    each, as chat's `stream` says)."""
    acc = _Accumulator(plan)
    frame = _frame(plan)
    data = b""
    if plan.echo:
        data = frame.event(
            [
                CompletionChoice(index=p * plan.n + j, text=text, finish_reason=None)
                for p, text in enumerate(plan.prompt_texts)
                for j in range(plan.n)
            ]
        )
    sequences, finished = len(plan.requests) * plan.n, 0
    try:
        async for p, events in _merged(plan):
            finished += sum(event.finish_reason is not None for event in events)
            data += b"".join(frame.event([choice]) for choice in _batch_choices(plan, acc, p, events))
            if data and finished < sequences:
                yield data
                data = b""
    except (PoolExhaustedError, GenerationError) as exc:
        yield data + data_event(encode(engine_failure(exc).body()))
        return
    if plan.include_usage:
        usage = Completion(
            id=plan.id,
            created=plan.created,
            model=plan.served.id,
            choices=[],
            system_fingerprint=SYSTEM_FINGERPRINT,
            usage=acc.usage(),
        )
        data += data_event(encode(usage))
    yield data + DONE
