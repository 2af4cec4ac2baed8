"""Incremental detokenization: deltas add up to decode(), UTF-8 safety, stop strings, linear cost."""

from __future__ import annotations

import random
import string
import time
from pathlib import Path
from typing import Any

import pytest

from server.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world! This is a plain English sentence.",
    "Emoji: 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and 🤖 done.",
    "中文测试：你好，世界！今天天气很好。我们去公园散步吧。",
    "日本語のテキストと한국어 텍스트, mixed with English.",
    "Accents: café, naïve, façade, Ünïcödé, São Paulo, Zürich, ñandú.",
    "def fib(n):\n    if n < 2:\n        return n\n\treturn fib(n - 1) + fib(n - 2)\n\n\nprint(fib(10))  # 55\n",
    "  leading spaces,\ttabs\tand trailing spaces   ",
    "Math: ∑ x² ≥ 0, π ≈ 3.14159, √2, ∞ — em dash… ellipsis «quotes».",
]


@pytest.fixture(scope="module")
def tok(smollm2_gguf: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def spm_tok() -> Any:
    """A SentencePiece-style tokenizer (metaspace, byte fallback, strip the first leading space)."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "▁" + string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(ch, len(vocab))
    merges = [("▁", "H"), ("▁", "w"), ("▁", "t")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    model = models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True)
    tk = Tokenizer(model)
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(tokenizer: Any, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, stop)
    deltas = []
    for t in ids:
        deltas.append(detok.add(t))
        if detok.stopped:
            break
    deltas.append(detok.flush())
    return deltas, detok


@pytest.mark.parametrize("which", ["tok", "spm_tok"])
@pytest.mark.parametrize("text", TEXTS + [" starts with a space", "Hello world the end"])
def test_deltas_add_up_to_decode(request: pytest.FixtureRequest, which: str, text: str) -> None:
    tokenizer = request.getfixturevalue(which)
    ids = encode(tokenizer, text)
    deltas, detok = stream(tokenizer, ids)
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(deltas) == expected == detok.text
    assert not detok.stopped
    assert all("\ufffd" not in d for d in deltas)  # no text here contains U+FFFD itself


def test_random_byte_tokens_add_up_to_decode(tok: Any) -> None:
    """Byte-level BPE tokens of single bytes in random order: invalid and split UTF-8 everywhere."""
    rng = random.Random(1234)
    singles = [i for i in range(len(tok)) if len(tok.convert_ids_to_tokens(i)) == 1]
    assert len(singles) >= 200
    for _ in range(150):
        ids = [rng.choice(singles) for _ in range(rng.randrange(1, 48))]
        deltas, _ = stream(tok, ids)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True), ids


def test_works_with_an_mlx_lm_tokenizer_wrapper(tok: Any) -> None:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    ids = encode(tok, TEXTS[1] + TEXTS[2])
    deltas, _ = stream(TokenizerWrapper(tok), ids, ("never",))
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)


def test_multibyte_characters_split_across_tokens_are_held_until_complete(tok: Any) -> None:
    text = "🤖你好👨‍👩‍👧"
    ids = encode(tok, text)
    assert len(ids) > len(text)  # byte-level BPE splits these characters over several tokens
    deltas, _ = stream(tok, ids)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert sum(1 for d in deltas if d == "") >= len(ids) - len(text)  # some steps had to wait


def test_bytes_that_can_never_complete_a_character_are_not_held_to_the_end(tok: Any) -> None:
    """A greedy loop on a lone lead byte (seen from random-weight models on the GPU: 300 tokens of a stream
    arrived in its last chunk): U+FFFD that no later byte can complete flow within a few tokens."""
    lead = tok.convert_tokens_to_ids("\u00e2")  # byte-level BPE's token for the byte 0xE2 alone
    ids = encode(tok, "Hello there") + [lead] * 300
    assert tok.decode([lead, lead]) == "\ufffd\ufffd"
    deltas, _ = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
    waits = longest = 0
    for d in deltas[:-1]:
        waits = 0 if d else waits + 1
        longest = max(longest, waits)
    assert longest <= 3
    assert len(deltas[-1]) <= 1  # the flush holds at most the one U+FFFD that might still have completed


def test_a_long_run_of_bytes_that_complete_nothing_costs_linear_time(tok: Any) -> None:
    """The decode window restarts inside such a run: tokens decoded in all stay proportional to the output."""
    decoded = [0]

    class Counting:
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            decoded[0] += len(ids)
            return str(tok.decode(ids, skip_special_tokens=skip_special_tokens))

    lead = tok.convert_tokens_to_ids("\u00e2")
    ids = encode(tok, "Hi") + [lead] * 3000 + encode(tok, " done")
    deltas, _ = stream(Counting(), ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
    assert decoded[0] <= 16 * len(ids)


@pytest.mark.parametrize("between", [[0], [0, 0, 0], [1, 2, 0, 0, 0]])
def test_a_run_of_lone_bytes_between_special_tokens(tok: Any, between: list[int]) -> None:
    """Special tokens decode to nothing: a window restarted inside the run still holds the bytes' tokens."""
    lead = tok.convert_tokens_to_ids("\u00e2")
    ids = encode(tok, "Hi") + [lead, *between] * 200 + encode(tok, " ok")
    deltas, _ = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("run", range(1, 13))
def test_a_character_completed_after_a_run_of_invalid_bytes_still_comes_out_whole(tok: Any, run: int) -> None:
    """The run's last U+FFFD is never passed on: its lead byte may start a character whose other bytes come next
    (every phase of the 4-token release; passing all of them on fails for runs of 3, 4, 7, 8, 11 and 12)."""
    lead, b82, bac = (tok.convert_tokens_to_ids(t) for t in ("\u00e2", "\u0124", "\u00ac"))  # bytes E2, 82, AC
    ids = encode(tok, "Hi") + [lead] * run + [b82, bac] + encode(tok, " ok")
    deltas, _ = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == "Hi" + "\ufffd" * (run - 1) + "\u20ac ok"


def test_special_tokens_are_skipped(tok: Any) -> None:
    ids = encode(tok, "Hi there") + [tok.eos_token_id]
    deltas, detok = stream(tok, ids)
    assert "".join(deltas) == "Hi there" and deltas[-2:] == ["", ""]


def test_prompt_ids_do_not_change_the_output(spm_tok: Any) -> None:
    ids = encode(spm_tok, "Hello world")
    detok = IncrementalDetokenizer(spm_tok, (), prompt_token_ids=encode(spm_tok, "Say hi"))
    assert "".join(detok.add(t) for t in ids) + detok.flush() == spm_tok.decode(ids, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------ stop strings


@pytest.mark.parametrize(
    "text,stop,expected",
    [
        ("Hello world, how are you today?", ("how are",), "Hello world, "),  # spans several tokens
        ("Hello world, how are you today?", ("lo wor",), "Hel"),  # starts in the middle of a token
        ("Hello world, how are you today?", ("today", "world"), "Hello "),  # the earliest of several
        ("Hello world, how are you today?", ("you", "?", "xyz"), "Hello world, how are "),
        ("Hello world, how are you today?", ("Hello",), ""),
        ("The answer is 42.\nUser: next", ("\nUser:",), "The answer is 42."),
        ("价格是100元。你好世界", ("你好",), "价格是100元。"),
        ("Party 🎉🎉 time", ("🎉",), "Party "),
        ("aaab", ("aab",), "a"),  # overlapping prefix: the held text shifts by one
    ],
)
def test_stop_string_is_not_emitted(tok: Any, text: str, stop: tuple[str, ...], expected: str) -> None:
    deltas, detok = stream(tok, encode(tok, text), stop)
    assert detok.stopped
    assert "".join(deltas) == expected == detok.text
    assert detok.add(encode(tok, "more")[0]) == "" and detok.flush() == ""


def test_text_that_may_start_a_stop_string_is_held_then_flushed(tok: Any) -> None:
    ids = encode(tok, "Hello wor")
    detok = IncrementalDetokenizer(tok, ("world!", "Hello there"))
    deltas = [detok.add(t) for t in ids]
    assert "".join(deltas) == "Hello " and detok.text == "Hello "  # "wor" may still become "world!"
    assert not detok.stopped
    assert detok.flush() == "wor" and detok.text == "Hello wor"
    assert detok.flush() == ""


def test_held_text_is_released_once_the_stop_is_ruled_out(tok: Any) -> None:
    ids = encode(tok, "Hello world peace")
    detok = IncrementalDetokenizer(tok, ("world!",))
    deltas = [detok.add(t) for t in ids]
    assert len(ids) == 3 and deltas == ["Hello", " ", "world peace"]  # "world" waited for its next token
    assert detok.flush() == ""


def test_stop_string_that_is_a_whole_emitted_token_sequence_across_steps(tok: Any) -> None:
    text = "one two three four five six seven eight nine ten " * 3 + "STOP here"
    deltas, detok = stream(tok, encode(tok, text), ("STOP",))
    assert detok.stopped and "".join(deltas) == text[: text.index("STOP")]
    assert all("S" not in d for d in deltas)


@pytest.mark.parametrize("bad", [("",), (5,)])
def test_bad_stop_strings_raise(tok: Any, bad: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError):
        IncrementalDetokenizer(tok, bad)


# ------------------------------------------------------------------------------------------------ cost


class CountingTokenizer:
    """Wraps a tokenizer and counts the token ids passed to decode."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.decoded_ids, self.calls = inner, 0, 0

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.calls += 1
        self.decoded_ids += len(ids)
        return self.inner.decode(ids, **kwargs)


def test_cost_is_linear_in_the_output_length(tok: Any) -> None:
    text = "".join(TEXTS) * 20
    ids = encode(tok, text)[:2000]
    assert len(ids) == 2000
    counting = CountingTokenizer(tok)
    detok = IncrementalDetokenizer(counting, ("never appears in the text", "Zz"))
    start = time.perf_counter()
    out = "".join(detok.add(t) for t in ids) + detok.flush()
    elapsed = time.perf_counter() - start
    assert out == tok.decode(ids, skip_special_tokens=True)
    # a bounded window per step: a quadratic detokenizer would decode ~2 million ids here
    assert counting.decoded_ids < 12 * len(ids) and counting.calls < 3 * len(ids)
    assert elapsed < 1.0, elapsed


def test_ids_to_text_goes_straight_to_the_rust_backend_and_decodes_the_same(tok: Any, spm_tok: Any) -> None:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from server.engine.detokenizer import IdsToText

    for tokenizer in (tok, TokenizerWrapper(tok), spm_tok):
        decoder = IdsToText(tokenizer)
        assert decoder.direct
        for text in TEXTS:
            ids = encode(tok if tokenizer is not spm_tok else spm_tok, text)
            assert decoder.decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)
            deltas, _ = stream(decoder, ids)
            assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


def test_ids_to_text_keeps_the_wrapper_when_it_would_change_the_text(spm_tok: Any) -> None:
    from copy import deepcopy

    from server.engine.detokenizer import IdsToText

    cleaning = deepcopy(spm_tok)
    cleaning.clean_up_tokenization_spaces = True  # the wrapper post-processes: no shortcut
    assert not IdsToText(cleaning).direct

    class Lowering:  # any tokenizer-like object without a Rust backend is used as it is
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return spm_tok.decode(ids, skip_special_tokens=skip_special_tokens).lower()

    decoder = IdsToText(Lowering())
    assert not decoder.direct
    assert decoder.decode(encode(spm_tok, "Hello World")) == "hello world"
