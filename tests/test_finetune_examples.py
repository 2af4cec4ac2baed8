"""server/finetune/examples.py and chat_tokens.py: training-file validation with line-numbered
errors, loss masks on assistant tokens only, auto hyperparameters and their ranges."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from server.finetune.chat_tokens import render, tokenize_chat
from server.finetune.examples import (
    MAX_ERRORS,
    ChatExample,
    describe,
    resolve_hyperparameters,
    tokenize_example,
    validate_chat_file,
    validate_embedding_file,
)
from server.finetune.spec import Hyperparameters


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Any:
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(smollm2_dir)


def chat_line(question: str = "What is 2+2?", answer: str = "4.") -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def masked_text(tokenizer: Any, ids: tuple[int, ...], mask: tuple[bool, ...]) -> str:
    return str(tokenizer.decode([t for t, m in zip(ids, mask) if m]))


# --- validation ---------------------------------------------------------------------


def test_a_good_chat_file_reports_examples_and_tokens(tmp_path: Path, tokenizer: Any) -> None:
    lines: list[Any] = [chat_line(f"Question {i}?", f"Answer {i}.") for i in range(11)]
    lines.insert(4, "")  # blank lines are skipped
    lines.append({"prompt": "Translate 'chat': ", "completion": "cat"})
    report = validate_chat_file(write_lines(tmp_path / "t.jsonl", lines), tokenizer, 2048)
    assert report.ok, report.errors
    assert report.examples == 12
    want = sum(
        len(tokenize_example(ChatExample(messages=tuple(line["messages"])), tokenizer).ids)
        for line in lines[:4] + lines[5:-1]
    )
    assert report.tokens > want  # plus the prompt/completion line


def test_errors_name_the_line_and_the_problem(tmp_path: Path, tokenizer: Any) -> None:
    lines: list[Any] = [chat_line() for _ in range(12)]
    lines[2] = '{"messages": [oops'
    lines[4] = {"messages": "hello"}
    lines[5] = {"messages": [{"role": "robot", "content": "x"}]}
    lines[6] = {"messages": [{"role": "user", "content": "hi"}]}
    lines[7] = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a", "weight": 2}]}
    lines[8] = {"messages": [{"role": "user", "content": ["parts"]}, {"role": "assistant", "content": "a"}]}
    lines[9] = {"prompt": "only a prompt"}
    lines[10] = [1, 2]
    lines[11] = chat_line("word " * 200)
    report = validate_chat_file(write_lines(tmp_path / "t.jsonl", lines), tokenizer, 100)
    got = {e.line: e.message for e in report.errors}
    assert got[3].startswith("invalid JSON")
    assert got[5] == "'messages' must be a list, got a string"
    assert "messages[0].role must be one of system, user, assistant" in got[6]
    assert "no assistant message to train on" in got[7]
    assert got[8] == "messages[1].weight must be 0 or 1, got 2"
    assert got[9] == "messages[0].content must be a string, got a list"
    assert "needs both 'prompt' and 'completion'" in got[10]
    assert got[11] == "expected a JSON object, got a list"
    assert got[12].startswith("example is ") and got[12].endswith("tokens, over the model's context of 100")
    assert set(got) == {3, 5, 6, 7, 8, 9, 10, 11, 12}
    assert describe(report.errors[0]) == f"Line 3: {got[3]}"
    assert report.examples == 3 and not report.ok


def test_too_few_examples_is_a_file_error(tmp_path: Path, tokenizer: Any) -> None:
    report = validate_chat_file(write_lines(tmp_path / "t.jsonl", [chat_line()] * 3), tokenizer, 2048)
    assert [(e.line, e.message) for e in report.errors] == [(0, "the file has 3 examples; at least 10 are required")]
    assert describe(report.errors[0]) == "the file has 3 examples; at least 10 are required"


def test_a_file_that_is_not_utf8_is_rejected(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "t.jsonl"
    good = (json.dumps(chat_line()) + "\n").encode()
    path.write_bytes(
        good * 2 + json.dumps(chat_line("caf\u00e9"), ensure_ascii=False).encode("latin-1") + b"\n" + good * 10
    )
    report = validate_chat_file(path, tokenizer, 2048)
    assert [(e.line, e.message) for e in report.errors] == [
        (3, "not valid UTF-8 (training files must be UTF-8 encoded JSONL)")
    ]
    utf16 = tmp_path / "u.jsonl"
    utf16.write_text("\n".join(json.dumps(chat_line()) for _ in range(12)), encoding="utf-16")
    assert "not valid UTF-8" in validate_chat_file(utf16, tokenizer, 2048).errors[0].message


def test_validation_stops_after_max_errors(tmp_path: Path, tokenizer: Any) -> None:
    report = validate_chat_file(write_lines(tmp_path / "t.jsonl", ["{bad"] * 100), tokenizer, 2048)
    assert len(report.errors) == MAX_ERRORS
    assert [e.line for e in report.errors] == list(range(1, MAX_ERRORS + 1))


def test_embedding_lines_need_anchor_and_positive_and_may_omit_negative(tmp_path: Path, minilm: Any) -> None:
    lines: list[Any] = [
        {"anchor": "a cat", "positive": "a kitten", "negative": "a car"},
        {"anchor": "a dog", "positive": "a puppy"},
        {"anchor": "a dog"},
        {"anchor": "", "positive": "x"},
        {"anchor": "a", "positive": "b", "negative": 3},
        {"anchor": "a", "positive": "b", "score": 1},
        {"anchor": "long " * 300, "positive": "b"},
    ]
    report = validate_embedding_file(write_lines(tmp_path / "e.jsonl", lines), minilm)
    got = {e.line: e.message for e in report.errors}
    assert got == {
        3: "missing 'positive'",
        4: "'anchor' must not be empty",
        5: "'negative' must be a string, got a number",
        6: "unexpected key 'score' (expected anchor, negative, positive)",
        7: f"'anchor' is 302 tokens, over the model's limit of {minilm.max_length}",
    }
    assert report.examples == 2
    assert report.tokens == sum(len(ids) for ids in minilm.tokenize(["a cat", "a kitten", "a car", "a dog", "a puppy"]))
    one = validate_embedding_file(write_lines(tmp_path / "one.jsonl", lines[:1]), minilm)
    assert [e.message for e in one.errors] == ["the file has 1 examples; at least 2 are required"]


# --- loss masks ---------------------------------------------------------------------


def test_smollm2_template_renders_prefix_stably(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    full = render(tokenizer, messages, generation_prompt=False)
    for i in range(1, len(messages)):
        prefix = render(tokenizer, messages[:i], generation_prompt=messages[i]["role"] == "assistant")
        assert full[: len(prefix)] == prefix


def test_loss_mask_covers_every_assistant_turn_and_nothing_else(tokenizer: Any) -> None:
    messages = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Capital of Zorblax?"},
        {"role": "assistant", "content": "Quendrith."},
    ]
    example = tokenize_chat(messages, tokenizer)
    assert masked_text(tokenizer, example.ids, example.loss_mask) == (
        "Hello! How can I help?<|im_end|>\nQuendrith.<|im_end|>\n"
    )
    unmasked = tokenizer.decode([t for t, m in zip(example.ids, example.loss_mask) if not m])
    assert "Hi there" in unmasked and "Capital of Zorblax?" in unmasked and "<|im_start|>assistant\n" in unmasked


def test_weight_zero_turns_are_not_trained(tokenizer: Any) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Bad answer.", "weight": 0},
        {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": "Good answer.", "weight": 1},
    ]
    example = tokenize_chat(messages, tokenizer)
    assert masked_text(tokenizer, example.ids, example.loss_mask) == "Good answer.<|im_end|>\n"
    assert "Bad answer." in tokenizer.decode(list(example.ids))


def test_prompt_is_masked_and_completion_ends_with_eos(tokenizer: Any) -> None:
    example = tokenize_example(ChatExample(prompt="Q: capital of Zorblax?\nA:", completion=" Quendrith"), tokenizer)
    assert masked_text(tokenizer, example.ids, example.loss_mask) == " Quendrith" + tokenizer.eos_token
    assert example.ids[-1] == tokenizer.eos_token_id
    assert list(example.ids[: example.loss_mask.index(True)]) == list(tokenizer.encode("Q: capital of Zorblax?\nA:"))


def test_a_template_that_is_not_prefix_stable_still_masks_only_the_answer(smollm2_dir: Path) -> None:
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(smollm2_dir)
    # The generation prompt opens an empty think block that history turns do not have (as Qwen3 does).
    tokenizer._tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n\n</think>\n{% endif %}"
    )
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "More?"},
        {"role": "assistant", "content": "No."},
    ]
    example = tokenize_chat(messages, tokenizer)
    assert masked_text(tokenizer, example.ids, example.loss_mask) == "Hello.<|im_end|>\nNo.<|im_end|>\n"


# --- hyperparameters ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "n", "want"),
    [
        ("chat", 16, Hyperparameters(3, 1, 1.0)),
        ("chat", 10, Hyperparameters(4, 1, 1.0)),
        ("chat", 1000, Hyperparameters(3, 2, 1.0)),
        ("chat", 20_000, Hyperparameters(1, 40, 1.0)),
        ("chat", 500_000, Hyperparameters(1, 256, 1.0)),
        ("embedding", 5, Hyperparameters(9, 5, 1.0)),
        ("embedding", 100, Hyperparameters(3, 32, 1.0)),
    ],
)
def test_auto_hyperparameters_follow_the_dataset_size(kind: Any, n: int, want: Hyperparameters) -> None:
    assert resolve_hyperparameters(kind, n, "auto", "auto", "auto") == want
    assert resolve_hyperparameters(kind, n) == want


def test_given_hyperparameters_are_kept() -> None:
    assert resolve_hyperparameters("chat", 16, 7, 4, 0.5) == Hyperparameters(7, 4, 0.5)
    assert resolve_hyperparameters("embedding", 5, 3, None, 2) == Hyperparameters(3, 5, 2.0)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n_epochs", 0, "n_epochs must be 'auto' or an integer from 1 to 50, got 0"),
        ("n_epochs", 51, "n_epochs must be 'auto' or an integer from 1 to 50, got 51"),
        ("n_epochs", 2.5, "n_epochs must be 'auto' or an integer from 1 to 50, got 2.5"),
        ("n_epochs", "three", "n_epochs must be 'auto' or an integer from 1 to 50, got 'three'"),
        ("n_epochs", True, "n_epochs must be 'auto' or an integer from 1 to 50, got True"),
        ("batch_size", 0, "batch_size must be 'auto' or an integer from 1 to 256, got 0"),
        ("batch_size", 257, "batch_size must be 'auto' or an integer from 1 to 256, got 257"),
        ("batch_size", 17, "batch_size 17 is larger than the 16 training examples"),
        ("learning_rate_multiplier", 0, "learning_rate_multiplier must be 'auto' or a number above 0"),
        ("learning_rate_multiplier", -1.0, "learning_rate_multiplier must be 'auto' or a number above 0"),
        ("learning_rate_multiplier", "fast", "learning_rate_multiplier must be 'auto' or a number above 0"),
    ],
)
def test_out_of_range_hyperparameters_raise(field: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        resolve_hyperparameters("chat", 16, **{field: value})


# --- hostile files: never an exception, always the line ---------------------------------------


def test_deeply_nested_json_is_a_line_error_not_an_exception(tmp_path: Path, tokenizer: Any, minilm: Any) -> None:
    lines: list[Any] = [chat_line() for _ in range(12)]
    lines[2] = "[" * 100_000
    lines[5] = '{"messages": ' + "[" * 50_000 + "]" * 50_000 + "}"
    report = validate_chat_file(write_lines(tmp_path / "t.jsonl", lines), tokenizer, 2048)
    assert [(e.line, e.message) for e in report.errors] == [
        (3, "invalid JSON (nested too deeply)"),
        (6, "invalid JSON (nested too deeply)"),
    ]
    pairs: list[Any] = [{"anchor": "a", "positive": "b"}] * 3 + ['{"anchor": ' + '{"a": ' * 100_000]
    report = validate_embedding_file(write_lines(tmp_path / "e.jsonl", pairs), minilm)
    assert [e.line for e in report.errors] == [4] and "nested too deeply" in report.errors[0].message


def test_an_empty_file_says_so(tmp_path: Path, tokenizer: Any) -> None:
    for content in ("", "\n\n  \n"):
        (tmp_path / "t.jsonl").write_text(content)
        report = validate_chat_file(tmp_path / "t.jsonl", tokenizer, 2048)
        assert [e.line for e in report.errors] == [0]
        assert report.errors[0].message.startswith("the file holds no examples (it is empty")


def test_a_template_raising_on_a_line_is_that_lines_error(tmp_path: Path, smollm2_dir: Path) -> None:
    from mlx_lm.utils import load_tokenizer

    strict = load_tokenizer(smollm2_dir)
    strict._tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    lines: list[Any] = [chat_line() for _ in range(12)]
    lines[7] = {"messages": [{"role": "system", "content": "Be terse."}, *chat_line()["messages"]]}
    report = validate_chat_file(write_lines(tmp_path / "t.jsonl", lines), strict, 2048)
    assert [e.line for e in report.errors] == [8]
    assert "System role not supported" in report.errors[0].message
