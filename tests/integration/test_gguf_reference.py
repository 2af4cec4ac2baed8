"""The GGUF converter against an independent implementation: transformers loading the same GGUF.

transformers dequantizes GGUF blocks with the gguf package (numpy) and reverse-permutes llama's Q/K
rows itself; our model is MLX's own Q4_1/Q8_0 loader plus our un-permutation.  For the comparison
the MLX model is dequantized in float32 (scales and biases cast to float32 *before* dequantizing:
dequantizing in float16 alone costs ~0.06 in logits, which would hide real errors).

Measured on SmolLM2-135M-Instruct Q4_1 (x86 CPU, the 5 prompts below, 5..38 tokens): max |logit
difference| over every position 3.9e-4 (last positions 4.6e-5 .. 6.5e-5), logits up to ~42 in
magnitude; argmax equal at every position.  The served model (quantized, float16 scales) is within
0.13 of the reference; with Q/K left in llama.cpp's permuted order the difference is ~20.

transformers' `from_pretrained(..., gguf_file=...)` refuses to run without `accelerate`, which is
not a dependency of this project; the model is built the way it does for a llama GGUF (the
"legacy" GGUF path of its GgufHfQuantizer): config from the file, then `load_gguf_checkpoint`.
"""

from __future__ import annotations

import functools
import json
import unicodedata
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from server.models.gguf import convert_gguf
from tests.test_gguf_convert import dequantized_float32, llamacpp_permute, write_tiny_gguf

pytestmark = pytest.mark.reference

LOGIT_ATOL = 2e-3  # measured max 3.9e-4; float16 dequantization alone would give ~0.06

TEXTS = [
    "Hello, world! How are you today?",
    "Les élèves ont étudié à l'école où ça coûte cher. Ça va? naïve café résumé",
    "Größenwahn und Übermut: Straße, Mädchen, Öl.",
    "我爱自然语言处理。今天天气很好！",
    "日本語のテキストです。カタカナとひらがな。",
    "Привет, как дела? Всё хорошо.",
    "مرحبا بالعالم، كيف حالك؟",
    "Emoji: 😀🎉👍🏽 ❤️ done",
    "def f(x):\n    if x > 0:\n        return x * 2\n\treturn None\n",
    "Numbers 12345 and 3.14159, year 2024, abc123def, 1,000,000, x=1e-5;y=0x1F",
    "multiple   spaces    here\n\n\nand   newlines  \n  ",
    "   leading and trailing   ",
    "I'm you're they'll we've he'd",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
]
# Non-ASCII numerals after a space.  transformers builds the "smollm" GGUF tokenizer with plain
# GPT-2 splitting (its GGUF_PRE_TOKENIZER_SPLITS has no "smollm" entry), ignoring SmolLM2's
# Digits(individual_digits=True) pre-tokenizer, and merges the space into the first numeral:
# " ٣" -> ["ĠÙ", "£"] instead of ["Ġ", "Ù", "£"].  With ASCII digits the two agree only because
# no SmolLM2 merge or multi-character token contains an ASCII digit.  Checked against the rule instead.
NUMERAL_TEXTS = ["٣٤٥ ١٢٣ ๑๒๓ ²³", "value: ٧٨ and ½ cup"]


def _transformers_model(gguf_path: Path, overrides: dict | None = None):
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # Speed only (about half the load time on 2 cores): transformers parses the whole file with
    # GGUFReader once for the config and again for the tensors, and rebuilds gguf's tensor name
    # map for every module.  Both are pure functions of their arguments, so memoize them.
    readers: dict[str, gguf.GGUFReader] = {}
    reader_class = gguf.GGUFReader
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            gguf,
            "GGUFReader",
            lambda path, *a: readers.get(str(path)) or readers.setdefault(str(path), reader_class(path, *a)),
        )
        patch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        for key, value in (overrides or {}).items():
            setattr(config, key, value)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model.eval()


def _torch_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _mlx_logits(model, ids: list[int]) -> np.ndarray:
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


@pytest.fixture(scope="module")
def converted(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smollm2-ref")
    convert_gguf(smollm2_gguf, out)
    return out


@pytest.fixture(scope="module")
def mlx_f32(converted: Path):
    from mlx_lm import load

    model, tokenizer = load(str(converted))
    return dequantized_float32(model), tokenizer


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf: Path):
    return _transformers_model(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


def test_next_token_logits_match_transformers(mlx_f32, hf_model) -> None:
    model, tokenizer = mlx_f32
    assert {p.dtype for _, p in tree_flatten(model.parameters())} == {mx.float32}
    prompts = [
        "The capital of France is",
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
        "Les élèves ont étudié toute la nuit, et le matin",
        "1, 2, 3, 4, 5,",
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "Write a haiku about the sea."}], add_generation_prompt=True, tokenize=False
        ),
    ]
    worst = 0.0
    for prompt in prompts:
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        ours, ref = _mlx_logits(model, ids), _torch_logits(hf_model, ids)
        assert ours.shape == ref.shape == (len(ids), 49152)
        worst = max(worst, float(np.abs(ours - ref).max()))
        assert np.abs(ours - ref).max() < LOGIT_ATOL, prompt
        assert ours[-1].argmax() == ref[-1].argmax(), prompt
    assert worst > 0.0  # two implementations, not one model compared with itself


def test_permuted_qk_disagrees_with_transformers(mlx_f32, hf_model) -> None:
    """The same model with Q/K rows left in llama.cpp's order is far from the reference."""
    from mlx_lm.models.llama import Model

    model, tokenizer = mlx_f32
    ids = tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n    return", add_special_tokens=False)
    ref = _torch_logits(hf_model, ids)
    permuted = Model(model.args)
    weights = dict(tree_flatten(model.parameters()))
    for name in list(weights):
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            n_head = 9 if "q_proj" in name else 3
            weights[name] = mx.array(llamacpp_permute(np.array(weights[name]), n_head))
    permuted.load_weights(list(weights.items()))
    assert np.abs(_mlx_logits(permuted, ids) - ref).max() > 5.0  # measured ~20
    assert np.abs(_mlx_logits(model, ids) - ref).max() < LOGIT_ATOL


def test_config_agrees_with_transformers(converted: Path, hf_model) -> None:
    import json

    ours = json.loads((converted / "config.json").read_text())
    theirs = hf_model.config
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ):
        assert ours[key] == getattr(theirs, key), key
    assert ours["rms_norm_eps"] == pytest.approx(theirs.rms_norm_eps, rel=1e-6)
    assert ours["rope_theta"] == theirs.rope_parameters["rope_theta"]


def test_tokenizer_ids_match_transformers(converted: Path, mlx_f32, hf_tokenizer) -> None:
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(converted / "tokenizer.json"))
    _, wrapper = mlx_f32
    for text in TEXTS:
        expected = hf_tokenizer.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_special_tokens=False).ids == expected, text
        assert wrapper.encode(text, add_special_tokens=False) == expected, text
        assert ours.decode(expected, skip_special_tokens=False) == text
    # The default (add_special_tokens=True) path adds nothing either: add_bos_token is false.
    assert wrapper.encode(TEXTS[0]) == hf_tokenizer.encode(TEXTS[0])


@pytest.mark.parametrize("text", NUMERAL_TEXTS)
def test_numerals_split_like_smollm2(converted: Path, text: str) -> None:
    """Known-correct behaviour (Hugging Face SmolLM2's Digits(individual_digits=True) pre-tokenizer,
    llama.cpp's "smollm" \\p{N} split): no token covers a numeral together with any other character."""
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(converted / "tokenizer.json"))
    encoding = ours.encode(text, add_special_tokens=False)
    assert ours.decode(encoding.ids) == text
    for start, end in encoding.offsets:
        span = text[start:end]
        if any(unicodedata.category(c).startswith("N") for c in span):
            assert len(span) == 1, (span, encoding.tokens)


def test_tiny_qwen2_matches_transformers(tmp_path: Path) -> None:
    """qwen2: Q/K not permuted by llama.cpp, q/k/v biases; Q4_0/Q4_1/Q8_0/F16 tensors."""
    from mlx_lm import load

    write_tiny_gguf(tmp_path / "tiny-qwen2.gguf", "qwen2")
    out = tmp_path / "out"
    out.mkdir()
    convert_gguf(tmp_path / "tiny-qwen2.gguf", out)
    model, _ = load(str(out))
    model = dequantized_float32(model)
    reference = _transformers_model(tmp_path / "tiny-qwen2.gguf")
    ids = [5, 70, 258, 100, 3, 259, 44, 200, 17, 261]
    ours, ref = _mlx_logits(model, ids), _torch_logits(reference, ids)
    assert np.abs(ours - ref).max() < LOGIT_ATOL
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_tiny_sentencepiece_vocab_matches_transformers(tmp_path: Path) -> None:
    """tokenizer.ggml.model "llama": byte-fallback BPE, merges derived from the scores.

    transformers builds these with Metaspace(prepend_scheme="first"), which adds no "▁" before text
    that already starts with a space, nor after a special token; llama.cpp (and SentencePiece's
    add_dummy_prefix) always prepend it, as we do.  So compare on text without those, and check the
    llama.cpp behaviour on them separately.
    """
    import gguf
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    pieces = [
        "▁",
        "t",
        "h",
        "e",
        "a",
        "c",
        "s",
        "n",
        "d",
        "▁t",
        "he",
        "▁the",
        "at",
        "▁c",
        "▁cat",
        "▁s",
        "▁sat",
        "an",
        "▁an",
        "▁and",
        "▁▁",
        "▁▁▁",
    ]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<|user|>"]
    writer = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    for add, value in (
        (writer.add_block_count, 1),
        (writer.add_context_length, 64),
        (writer.add_embedding_length, 32),
        (writer.add_feed_forward_length, 64),
        (writer.add_head_count, 2),
        (writer.add_head_count_kv, 2),
        (writer.add_layer_norm_rms_eps, 1e-5),
        (writer.add_tokenizer_model, "llama"),
        (writer.add_token_list, tokens),
        (writer.add_bos_token_id, 1),
        (writer.add_eos_token_id, 2),
        (writer.add_unk_token_id, 0),
    ):
        add(value)
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4])
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0])
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = tmp_path / "out"
    out.mkdir()
    convert_gguf(tmp_path / "spm.gguf", out)
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    for text in ["the cat sat", "the  cat\nsat é and", "thethe", "héllo 😀", "and<|user|>"]:
        assert ours.encode(text).ids == theirs.encode(text), text  # <s> first: add_bos defaults on
        assert ours.decode(ours.encode(text).ids) == text
    assert ours.encode(" the", add_special_tokens=False).tokens == ["▁", "▁the"]
    assert ours.encode("<s>the", add_special_tokens=False).tokens == ["<s>", "▁the"]
    assert ours.encode("<|user|>the", add_special_tokens=False).tokens == ["<|user|>", "▁the"]


# ---------------------------------------------------------------- tiny qwen3 / gemma3 GGUFs

TINY_PROMPT_IDS = [[5, 17, 260, 99, 3, 42, 7, 7, 200, 1, 64, 33], [258, 100, 101, 102, 103, 104, 105, 106, 107]]


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_tiny_architecture_matches_transformers(arch: str, tmp_path: Path) -> None:
    """Random tiny qwen3 / gemma3 GGUFs (quantized and float tensors, an untied output), converted and
    loaded by mlx-lm, against transformers loading the same file: same config, logits at every
    position, greedy tokens.  gemma3 has six layers (one global) and a window of 4 < prompt length."""
    from mlx_lm import load

    path = tmp_path / f"{arch}.gguf"
    write_tiny_gguf(path, arch, with_output=True)
    out = tmp_path / "out"
    out.mkdir()
    convert_gguf(path, out)
    model, _ = load(str(out))
    model = dequantized_float32(model)
    ours_config = json.loads((out / "config.json").read_text())
    # transformers' GGUF config reading leaves two keys at its defaults, right for the released
    # models only: qwen3's head_dim (it ignores attention.key_length; every Qwen3 has 128) and
    # gemma3's query_pre_attn_scalar (256: Gemma 3 1B/4B/12B's head dim).  The tiny models have
    # head_dim 16, so the reference is given the values llama.cpp derives (as the converter does).
    overrides = {"head_dim": 16} if arch == "qwen3" else {"query_pre_attn_scalar": 16}
    reference = _transformers_model(path, overrides)
    theirs = reference.config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim"):
        assert ours_config[key] == getattr(theirs, key), key
    if arch == "gemma3":
        assert ours_config["sliding_window"] == theirs.sliding_window == 4
        assert ours_config["query_pre_attn_scalar"] == theirs.query_pre_attn_scalar
        assert theirs.layer_types.count("full_attention") == 1
    worst = 0.0
    for ids in TINY_PROMPT_IDS:
        ours, ref = _mlx_logits(model, ids), _torch_logits(reference, ids)
        assert ours.shape == ref.shape
        worst = max(worst, float(np.abs(ours - ref).max()))
        assert (ours.argmax(-1) == ref.argmax(-1)).all(), (arch, ids)
    assert 0.0 < worst < 1e-4, worst
