"""Grammar constraints (server.engine.constraints) with the default model's real tokenizer (SmolLM2)."""

from __future__ import annotations

import json
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from server.engine.constraints import ConstraintFactory, GrammarSpec, SequenceConstraint, apply_bitmask, fill_masks
from server.engine.sampling import SamplingParams, SequenceSampler, sample_batch
from server.registry import ModelRegistry

jsonschema = pytest.importorskip("jsonschema")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z ]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer(registry: ModelRegistry) -> Any:
    return registry.get("smollm2-135m-instruct").tokenizer


@pytest.fixture(scope="module")
def factory(tokenizer: Any) -> ConstraintFactory:
    return ConstraintFactory(tokenizer, len(tokenizer.vocab), tokenizer.eos_token_ids)


def texts(tokenizer: Any, ids: np.ndarray) -> list[str]:
    return [tokenizer.decode([int(i)]) for i in ids]


def random_walk(
    factory: ConstraintFactory, spec: GrammarSpec, n: int, seed: int = 0, limit: int = 400
) -> list[list[int]]:
    """n sequences sampled as one batch from random logits under the grammar, until each is finished."""
    vocab = factory.vocab_size
    samplers = [
        SequenceSampler(SamplingParams(temperature=1.0, seed=seed + i), [0], factory.create(spec)) for i in range(n)
    ]
    rng = np.random.default_rng(seed)
    outputs: list[list[int]] = [[] for _ in range(n)]
    live = list(range(n))
    for _ in range(limit):
        if not live:
            break
        logits = mx.array(rng.normal(0.0, 3.0, size=(len(live), vocab)).astype(np.float32))
        for i, sample in zip(list(live), sample_batch(logits, [samplers[i] for i in live])):
            samplers[i].record(sample.token_id)
            outputs[i].append(sample.token_id)
            constraint = samplers[i].constraint
            assert constraint is not None and constraint.error is None
            if constraint.finished or sample.token_id in factory._eos:
                live.remove(i)
    assert not live, "the grammar did not finish"
    return outputs


def decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode([t for t in ids if t not in tokenizer.eos_token_ids])


# -- GrammarSpec ------------------------------------------------------------------------------------------


def test_spec_is_hashable_and_copies_the_schema() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    a, b = GrammarSpec.json_schema(schema), GrammarSpec("json_schema", schema={**schema})
    assert a == b and hash(a) == hash(b)
    schema["properties"]["a"]["type"] = "integer"
    assert a.schema["properties"]["a"]["type"] == "string"
    assert a != GrammarSpec.json_schema(schema) != GrammarSpec.json_schema(a.schema, strict=False)
    assert hash(SamplingParams(grammar=a)) == hash(SamplingParams(grammar=b))


@pytest.mark.parametrize(
    "args",
    [
        {"kind": "yaml"},
        {"kind": "json_schema"},
        {"kind": "json_schema", "schema": [1]},
        {"kind": "json_object", "text": "x"},
        {"kind": "lark"},
        {"kind": "regex", "text": ""},
        {"kind": "json_schema", "schema": {"a": float("nan")}},
        {"kind": "json_schema", "schema": {"a": object()}},
    ],
)
def test_spec_rejects_bad_arguments(args: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        GrammarSpec(**args)


def test_sampling_params_grammar_must_be_a_spec() -> None:
    with pytest.raises(ValueError, match="GrammarSpec"):
        SamplingParams(grammar={"type": "json_object"})  # type: ignore[arg-type]


def test_from_response_format() -> None:
    assert GrammarSpec.from_response_format(None) is None
    assert GrammarSpec.from_response_format({"type": "text"}) is None
    assert GrammarSpec.from_response_format({"type": "json_object"}) == GrammarSpec.json_object()
    spec = GrammarSpec.from_response_format(
        {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}
    )
    assert spec == GrammarSpec.json_schema(PERSON, strict=True)
    loose = GrammarSpec.from_response_format({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    assert loose is not None and not loose.strict
    for bad in (
        {"type": "xml"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"schema": 3}},
        {"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}},
    ):
        with pytest.raises(ValueError):
            GrammarSpec.from_response_format(bad)


# -- masks ------------------------------------------------------------------------------------------------


def test_json_object_first_token_opens_an_object(factory: ConstraintFactory, tokenizer: Any) -> None:
    constraint = factory.create(GrammarSpec.json_object())
    allowed = constraint.allowed_token_ids()
    assert len(allowed) >= 1
    for text in texts(tokenizer, allowed):
        assert text.lstrip().startswith("{"), text
    assert not set(allowed.tolist()) & set(tokenizer.eos_token_ids)  # EOS only once the grammar accepts


def test_eos_allowed_exactly_when_the_grammar_accepts(factory: ConstraintFactory, tokenizer: Any) -> None:
    constraint = factory.create(GrammarSpec.json_schema({"type": "integer"}))
    eos = set(tokenizer.eos_token_ids)
    assert not constraint.accepting and not eos & set(constraint.allowed_token_ids().tolist())
    constraint.advance(tokenizer.encode("7", add_special_tokens=False)[0])
    assert constraint.accepting and not constraint.finished
    allowed = set(constraint.allowed_token_ids().tolist())
    assert eos <= allowed and len(allowed) > len(eos)  # more digits or the end


def test_finished_object_allows_only_eos(factory: ConstraintFactory, tokenizer: Any) -> None:
    constraint = factory.create(GrammarSpec.json_object())
    for token in tokenizer.encode('{"a": [1, "x"]', add_special_tokens=False):
        assert not constraint.finished
        assert token in constraint.allowed_token_ids()
        constraint.advance(token)
    constraint.advance(tokenizer.encode("}", add_special_tokens=False)[0])
    assert constraint.finished and constraint.accepting and constraint.error is None
    assert set(constraint.allowed_token_ids().tolist()) == set(tokenizer.eos_token_ids)


def test_a_forbidden_token_is_an_error_not_an_exception(factory: ConstraintFactory, tokenizer: Any) -> None:
    constraint = factory.create(GrammarSpec.json_object())
    constraint.advance(tokenizer.encode("hello", add_special_tokens=False)[0])
    assert constraint.finished and constraint.error


def test_schema_masks_follow_properties_and_enums(factory: ConstraintFactory, tokenizer: Any) -> None:
    constraint = factory.create(GrammarSpec.json_schema(PERSON))
    prefix = '{"name": "Ann", "age": 7, "color": "'
    for token in tokenizer.encode(prefix, add_special_tokens=False):
        constraint.advance(token)
    assert constraint.error is None
    allowed = texts(tokenizer, constraint.allowed_token_ids())
    assert allowed and all(any(c.startswith(t) for c in ("red", "green", "blue")) for t in allowed), allowed


def test_padding_rows_of_a_larger_model_vocabulary_are_never_allowed(tokenizer: Any) -> None:
    real = len(tokenizer.vocab)
    padded = ConstraintFactory(tokenizer, real + 77, tokenizer.eos_token_ids)
    constraint = padded.create(GrammarSpec.json_object())
    for token in tokenizer.encode('{"k": "', add_special_tokens=False):
        constraint.advance(token)
    allowed = constraint.allowed_token_ids()
    assert len(allowed) > 1000 and allowed.max() < real
    bitmask = fill_masks([(0, constraint)], 1, real + 77)
    row = np.array(apply_bitmask(mx.zeros((1, real + 77)), bitmask))[0]
    assert np.isneginf(row[real:]).all() and np.flatnonzero(row == 0).tolist() == allowed.tolist()


# -- validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "needle"),
    [
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
        ({"if": {"type": "string"}, "then": {"minLength": 2}}, "if"),
        ({"type": "string", "format": "no-such-format"}, "no-such-format"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}}, "Missing"),
        ({"type": "string", "pattern": "(?<=a)b"}, "look-around"),
        ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength"),
    ],
)
def test_unsupported_schemas_raise_a_helpful_error(
    factory: ConstraintFactory, schema: dict[str, Any], needle: str
) -> None:
    spec = GrammarSpec.json_schema(schema)
    with pytest.raises(ValueError, match="JSON schema") as info:
        factory.validate(spec)
    assert needle in str(info.value)
    with pytest.raises(ValueError):  # the cached failure says the same
        factory.create(spec)


def test_non_strict_schemas_ignore_unimplemented_keywords(factory: ConstraintFactory) -> None:
    factory.validate(GrammarSpec.json_schema({"type": "array", "uniqueItems": True}, strict=False))


def test_bad_lark_and_regex_raise(factory: ConstraintFactory) -> None:
    with pytest.raises(ValueError, match="Lark"):
        factory.validate(GrammarSpec("lark", text="start: undefined_rule"))
    with pytest.raises(ValueError, match="regular expression"):
        factory.validate(GrammarSpec("regex", text="(unclosed"))


def test_compiled_grammars_are_cached(tokenizer: Any) -> None:
    small = ConstraintFactory(tokenizer, len(tokenizer.vocab), tokenizer.eos_token_ids, cache_size=2)
    specs = [GrammarSpec("regex", text=f"a{{{i}}}") for i in range(1, 4)]
    for spec in specs:
        small.validate(spec)
    assert list(small._cache) == specs[1:]
    template = small._cache[specs[2]]
    one, two = small.create(specs[2]), small.create(specs[2])
    assert small._cache[specs[2]] is template and one._matcher is not two._matcher


# -- sampling under a constraint --------------------------------------------------------------------------


def test_random_logits_always_yield_schema_valid_json(factory: ConstraintFactory, tokenizer: Any) -> None:
    for ids in random_walk(factory, GrammarSpec.json_schema(PERSON), n=5):
        text = decode(tokenizer, ids)
        jsonschema.validate(json.loads(text), PERSON)


def test_random_logits_with_defs_refs_and_any_of(factory: ConstraintFactory, tokenizer: Any) -> None:
    schema = {
        "$defs": {
            "Pet": {
                "type": "object",
                "properties": {
                    "kind": {"enum": ["cat", "dog"]},
                    "age": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 30}, {"type": "null"}]},
                },
                "required": ["kind", "age"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"pets": {"type": "array", "items": {"$ref": "#/$defs/Pet"}, "minItems": 1, "maxItems": 2}},
        "required": ["pets"],
        "additionalProperties": False,
    }
    for ids in random_walk(factory, GrammarSpec.json_schema(schema), n=5, seed=10):
        jsonschema.validate(json.loads(decode(tokenizer, ids)), schema)


def test_random_logits_follow_regex_and_lark(factory: ConstraintFactory, tokenizer: Any) -> None:
    import re

    for ids in random_walk(factory, GrammarSpec("regex", text=r"[0-9]{3}-[a-c]{2}"), n=4, seed=20):
        assert re.fullmatch(r"[0-9]{3}-[a-c]{2}", decode(tokenizer, ids))
    for ids in random_walk(factory, GrammarSpec("lark", text='start: "yes" | "no" | "maybe"'), n=4, seed=30):
        assert decode(tokenizer, ids) in ("yes", "no", "maybe")


def test_greedy_rows_take_the_best_allowed_token_and_other_rows_are_untouched(
    factory: ConstraintFactory, tokenizer: Any
) -> None:
    vocab = factory.vocab_size
    brace = tokenizer.encode("{", add_special_tokens=False)[0]
    word = tokenizer.encode("hello", add_special_tokens=False)[0]
    logits = np.zeros((2, vocab), dtype=np.float32)
    logits[:, word] = 10.0
    logits[:, brace] = 5.0
    params = SamplingParams(temperature=0.0, logprobs=True)
    constrained = SequenceSampler(params, [0], factory.create(GrammarSpec.json_object()))
    free = SequenceSampler(params, [0])
    first, second = sample_batch(mx.array(logits), [constrained, free])
    assert first.token_id == brace and second.token_id == word
    row = logits[0].astype(np.float64)
    raw = row - np.log(np.exp(row).sum())  # logprobs stay those of the unconstrained distribution
    assert first.logprob == pytest.approx(float(raw[brace]), abs=1e-3)


def test_penalties_and_top_k_compose_with_the_mask(factory: ConstraintFactory, tokenizer: Any) -> None:
    vocab = factory.vocab_size
    brace = tokenizer.encode("{", add_special_tokens=False)[0]
    logits = np.zeros((1, vocab), dtype=np.float32)
    logits[0, brace] = 3.0
    logits[0, tokenizer.encode("hello", add_special_tokens=False)[0]] = 9.0
    params = SamplingParams(temperature=1.0, top_k=1, logit_bias={brace: -100.0}, seed=3)
    sampler = SequenceSampler(params, [0], factory.create(GrammarSpec.json_object()))
    token = sample_batch(mx.array(logits), [sampler])[0].token_id
    assert token in sampler.constraint.allowed_token_ids()  # type: ignore[union-attr]
    sampler.record(token)
    assert sampler.constraint is not None and sampler.constraint.error is None


def test_fill_masks_rejects_a_vocabulary_mismatch(factory: ConstraintFactory) -> None:
    constraint: SequenceConstraint = factory.create(GrammarSpec.json_object())
    with pytest.raises(ValueError, match="vocabulary"):
        fill_masks([(0, constraint)], 1, factory.vocab_size + 32)


def test_errors_never_quote_the_grammar_source(
    factory: ConstraintFactory, tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Compile errors lose llguidance's source excerpt; a matcher failure loses its <state> and <grammar>
    dump for the client (the whole of it is logged)."""
    with pytest.raises(ValueError) as info:
        factory.validate(GrammarSpec("lark", text='start: "a" c\nc: %json {"type": "array", "uniqueItems": true}'))
    assert "uniqueItems" in str(info.value)
    assert "%json" not in str(info.value) and "start:" not in str(info.value) and "^" not in str(info.value)
    constraint = factory.create(GrammarSpec("lark", text='start: "secret-grammar-text" %json {"type": "object"}'))
    with caplog.at_level("ERROR", logger="server.engine.constraints"):
        constraint.advance(tokenizer.encode("hello", add_special_tokens=False)[0])
    error = constraint.error
    assert error and "doesn't satisfy the grammar" in error, error
    assert "secret-grammar-text" not in error and "<state>" not in error and "<grammar>" not in error
    assert "secret-grammar-text" in caplog.text
