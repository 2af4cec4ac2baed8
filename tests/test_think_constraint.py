"""The think-block gate of grammar-constrained decoding, on Qwen3's real vocabulary and template.

A thinking model's constrained answer (a forced tool call, a response format) comes after its reasoning:
the grammar waits for the end marker when the prompt opened the block, lets the output open one itself
when the prompt left it outside (`GrammarSpec.opens`: the start marker or the grammar's first token, the
mask then equal to the plain grammar's), and forces the end marker once the block has run its budget.
End to end over HTTP: tests/test_reasoning.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.engine.constraints import ConstraintFactory, GrammarSpec, fill_masks
from server.serving.reasoning import reasoning_mode
from tests.reasoning_models import think_tokenizer

THINK_START, THINK_END = 151667, 151668  # `<think>`, `</think>` in Qwen3's vocabulary
VOCAB = 151936
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("think-constraint")


def _factory(tokenizer: Any) -> ConstraintFactory:
    return ConstraintFactory(tokenizer, VOCAB, [tokenizer.convert_tokens_to_ids("<|im_end|>")])


def test_grammar_after_an_optional_think_block(root: Path) -> None:
    """The output may open a think block first: the grammar waits for its end, then starts afresh."""
    tokenizer = think_tokenizer(root / "tok", "qwen3")
    factory = _factory(tokenizer)
    plain = factory.create(GrammarSpec("json_object"))
    gated = factory.create(GrammarSpec("json_object", after=(THINK_END,), opens=(THINK_START,)))
    before = gated.allowed_token_ids()
    assert set(before.tolist()) == {*plain.allowed_token_ids().tolist(), THINK_START}  # the grammar's, or the block
    gated.advance(THINK_START)
    assert not gated.active and len(gated.allowed_token_ids()) == VOCAB  # inside: free
    for token_id in tokenizer.encode("not json {", add_special_tokens=False):
        gated.advance(token_id)
    assert len(gated.allowed_token_ids()) == VOCAB and not gated.finished and gated.error is None
    gated.advance(THINK_END)
    assert gated.active and (gated.allowed_token_ids() == plain.allowed_token_ids()).all()  # the grammar, fresh


def test_without_the_start_marker_the_grammar_constrains_from_the_first_token(root: Path) -> None:
    tokenizer = think_tokenizer(root / "tok", "qwen3")
    factory = _factory(tokenizer)
    plain = factory.create(GrammarSpec("json_object"))
    gated = factory.create(GrammarSpec("json_object", after=(THINK_END,), opens=(THINK_START,)))
    brace = tokenizer.encode("{", add_special_tokens=False)[0]
    gated.advance(brace)
    plain.advance(brace)
    assert gated.active and (gated.allowed_token_ids() == plain.allowed_token_ids()).all()
    assert THINK_START not in gated.allowed_token_ids() and THINK_END not in gated.allowed_token_ids()


def test_a_start_marker_of_several_tokens_that_shares_the_grammar_s_first_token(root: Path) -> None:
    """`<tk>` is `<` `tk` `>`: its `<` is the grammar's too, so both stay open until they part."""
    tokenizer = think_tokenizer(root / "tok", "qwen3")
    factory = _factory(tokenizer)
    spec = GrammarSpec("regex", text="<tool>[a-z]{1,8}")
    lt, tk, gt = tokenizer.encode("<tk>", add_special_tokens=False)
    end = tuple(tokenizer.encode("</tk>", add_special_tokens=False))
    gated_spec = GrammarSpec("regex", text="<tool>[a-z]{1,8}", after=end, opens=(lt, tk, gt))
    plain, gated = factory.create(spec), factory.create(gated_spec)
    assert set(gated.allowed_token_ids().tolist()) == set(plain.allowed_token_ids().tolist()) | {lt}
    gated.advance(lt)
    plain.advance(lt)
    assert set(gated.allowed_token_ids().tolist()) == {*plain.allowed_token_ids().tolist(), tk}
    gated.advance(tk)  # the grammar cannot follow: only the marker's rest
    assert gated.allowed_token_ids().tolist() == [gt]
    gated.advance(gt)
    for token_id in (*tokenizer.encode("hm", add_special_tokens=False), *end):
        assert len(gated.allowed_token_ids()) == VOCAB
        gated.advance(token_id)
    assert gated.active and (gated.allowed_token_ids() == factory.create(spec).allowed_token_ids()).all()
    # parting the other way: `<` then `tool` is the grammar's, with its `<` already taken
    other = factory.create(gated_spec)
    tool = tokenizer.encode("<tool>", add_special_tokens=False)[1]
    for token_id in (lt, tool):
        other.advance(token_id)
    plain.advance(tool)
    assert other.active and (other.allowed_token_ids() == plain.allowed_token_ids()).all()


def test_past_its_budget_the_block_s_end_marker_is_forced(root: Path) -> None:
    tokenizer = think_tokenizer(root / "tok", "qwen3")
    factory = _factory(tokenizer)
    word = tokenizer.encode("hm", add_special_tokens=False)[0]
    inside = factory.create(GrammarSpec("json_object", after=(THINK_END,), budget=2))
    for _ in range(2):
        assert len(inside.allowed_token_ids()) == VOCAB
        inside.advance(word)
    assert inside.allowed_token_ids().tolist() == [THINK_END]
    inside.advance(THINK_END)
    assert (
        inside.active
        and (inside.allowed_token_ids() == factory.create(GrammarSpec("json_object")).allowed_token_ids()).all()
    )
    # a marker of several tokens is forced from where the block's text already is in it
    end = tuple(tokenizer.encode("</tk>", add_special_tokens=False))
    several = factory.create(GrammarSpec("json_object", after=end, budget=2))
    several.advance(word)
    several.advance(end[0])
    for token_id in end[1:]:
        assert several.allowed_token_ids().tolist() == [token_id]
        several.advance(token_id)
    assert several.active


def test_masks_for_a_batch_in_every_state(root: Path) -> None:
    tokenizer = think_tokenizer(root / "tok", "qwen3")
    factory = _factory(tokenizer)
    spec = GrammarSpec("json_object", after=(THINK_END,), opens=(THINK_START,))
    deciding, inside, plain = factory.create(spec), factory.create(spec), factory.create(GrammarSpec("json_object"))
    inside.advance(THINK_START)
    masks = fill_masks([(0, deciding), (1, inside), (3, plain)], 4, VOCAB)
    one = np.zeros((1, masks.shape[1]), dtype=np.int32)
    deciding.fill_mask(one)
    assert (masks[0] == one[0]).all() and (masks[1] == -1).all() and (masks[2] == -1).all()
    plain.fill_mask(one)
    assert (masks[3] == one[0]).all()


def test_a_prompt_outside_the_block_gets_an_optional_block_and_a_closed_one_none(root: Path) -> None:
    from server.serving.generation import THINK_BUDGET_TOKENS, _after_reasoning

    tokenizer = think_tokenizer(root / "tok", "qwen3")
    spec = GrammarSpec("json_object")
    thinking = reasoning_mode(tokenizer, tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True))
    off = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, enable_thinking=False)
    assert thinking is not None and not thinking.starts_inside and not thinking.closed
    gated = GrammarSpec("json_object", after=(THINK_END,), opens=(THINK_START,), budget=THINK_BUDGET_TOKENS)
    assert _after_reasoning(spec, thinking) == gated
    assert _after_reasoning(spec, thinking, max_tokens=60).budget == 30  # half of max_tokens: room to answer
    assert _after_reasoning(spec, reasoning_mode(tokenizer, off)) == spec  # thinking turned off: plain
    with pytest.raises(ValueError, match="opens"):
        GrammarSpec("json_object", opens=(THINK_START,))
