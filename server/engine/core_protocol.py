"""The messages between the HTTP process and the engine-core process (msgpack via msgspec, over a pipe).

    HTTP process                                   engine-core process
    Add(request) / Abort(id) / AbortAll / Stop  ->  the Engine's inbox
    Ready(limits) | StartFailed(error)          <-  once, after the model loaded
    Step(events, stats, memory)                 <-  per engine step: every request's events of the step
                                                    in one message; `stats` and MLX `memory` at most every
                                                    STATS_EVERY s

A request crosses as `WireRequest` (its sampling parameters and grammar as plain fields, rebuilt
and so checked again on the other side); an event as itself (`TokenEvent` is a msgspec Struct
encoded as an array: no field names on the wire, decoded straight into events).
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from typing import Any

import msgspec

from server.engine.constraints import GrammarSpec
from server.engine.request import TokenEvent, ValidRequest
from server.engine.sampling import SamplingParams

STATS_EVERY = 0.25  # seconds between stats snapshots in Step messages


class WireGrammar(msgspec.Struct, array_like=True):
    kind: str
    schema_json: str | None
    text: str | None
    strict: bool
    after: tuple[int, ...]
    opens: tuple[int, ...]
    budget: int | None


class WireRequest(msgspec.Struct, array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    params: dict[str, Any]  # SamplingParams' fields but the grammar
    logit_bias: list[tuple[int, float]]
    grammar: WireGrammar | None
    conversation_key: str | None
    salt: bytes
    streamed: bool
    max_new_tokens: int


class Add(msgspec.Struct, tag=True):
    request: WireRequest


class Abort(msgspec.Struct, tag=True):
    request_id: str


class AbortAll(msgspec.Struct, tag=True):
    pass


class Stop(msgspec.Struct, tag=True):
    pass


class Ready(msgspec.Struct, tag=True):
    context_length: int
    vocab_size: int
    eos_ids: list[int]
    blocks_total: int


class StartFailed(msgspec.Struct, tag=True):
    error: str


class Step(msgspec.Struct, tag=True):
    events: list[TokenEvent]
    stats: dict[str, float] | None = None
    memory: dict[str, float] | None = None  # the engine process's MLX allocator counters, sent with `stats`


ToEngine = Add | Abort | AbortAll | Stop
FromEngine = Ready | StartFailed | Step

_SAMPLING = [f.name for f in fields(SamplingParams) if f.name not in ("grammar", "logit_bias")]


def request_to_wire(request: ValidRequest) -> WireRequest:
    params = request.params
    grammar = params.grammar
    return WireRequest(
        request.request_id,
        list(request.prompt_token_ids),
        {name: getattr(params, name) for name in _SAMPLING},
        list(params.logit_bias.items()),
        None
        if grammar is None
        else WireGrammar(
            grammar.kind,
            json.dumps(grammar.schema) if grammar.schema is not None else None,
            grammar.text,
            grammar.strict,
            grammar.after,
            grammar.opens,
            grammar.budget,
        ),
        request.conversation_key,
        request.salt,
        request.streamed,
        request.max_new_tokens,
    )


def request_from_wire(wire: WireRequest) -> ValidRequest:
    """The request again (the HTTP side validated it against the same model's limits)."""
    grammar = None
    if wire.grammar is not None:
        g = wire.grammar
        schema = json.loads(g.schema_json) if g.schema_json is not None else None
        grammar = GrammarSpec(g.kind, schema, g.text, g.strict, g.after, g.opens, g.budget)  # type: ignore[arg-type]
    params = dict(wire.params)
    for name in ("stop", "stop_token_ids"):
        params[name] = tuple(params[name])
    sampling = SamplingParams(**params, logit_bias=dict(wire.logit_bias), grammar=grammar)
    return ValidRequest(
        request_id=wire.request_id,
        prompt_token_ids=wire.prompt_token_ids,
        params=sampling,
        conversation_key=wire.conversation_key,
        salt=wire.salt,
        streamed=wire.streamed,
        max_new_tokens=wire.max_new_tokens,
    )


def stats_to_wire(stats: Any) -> dict[str, float]:
    return {k: float(v) for k, v in asdict(stats).items()}


encoder = msgspec.msgpack.Encoder()
to_engine = msgspec.msgpack.Decoder(ToEngine)
from_engine = msgspec.msgpack.Decoder(FromEngine)
