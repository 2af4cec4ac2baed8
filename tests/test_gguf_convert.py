"""GGUF -> MLX conversion (server.models.gguf): the default SmolLM2 model and tiny crafted GGUFs.

The tiny-GGUF helpers here (``write_tiny_gguf``, ``llamacpp_permute``) are also used by
tests/integration/test_gguf_reference.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from server.models.gguf import GGUFConversionError, _llama3_rope_scaling, convert_gguf

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
TINY = {"hidden": 64, "heads": 4, "kv_heads": 2, "layers": 2, "ffn": 128}
# Gemma 3: six layers (five sliding-window, one global) and a window shorter than the test prompts.
GEMMA3_LAYERS, GEMMA3_WINDOW = 6, 4
Q = gguf.GGMLQuantizationType


def byte_level_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode() characters, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF half-split -> interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(
    path: Path,
    arch: str = "llama",
    *,
    tokenizer_model: str = "gpt2",
    types: dict[str, Q] | None = None,
    with_output: bool = False,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """A small random model as llama.cpp would write it; returns the expected HF-layout weights
    (float32, after the GGML quantization round trip, computed with the gguf package)."""
    rng = np.random.default_rng(seed)
    h, heads, kv, ffn = TINY["hidden"], TINY["heads"], TINY["kv_heads"], TINY["ffn"]
    head_dim = h // heads
    gemma = arch == "gemma3"
    layers = GEMMA3_LAYERS if gemma else TINY["layers"]
    tokens = byte_level_alphabet() + SPECIALS + [m.replace(" ", "") for m in MERGES]
    ttypes = [1] * 256 + [3] * len(SPECIALS) + [1] * len(MERGES)
    vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny test model")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(h)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(head_dim)
    if arch in ("qwen3", "gemma3"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if gemma:
        writer.add_sliding_window(GEMMA3_WINDOW)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(ttypes)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(256 + 1)
    writer.add_eos_token_id(256 + 2)
    writer.add_add_bos_token(False)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")

    default_types = {
        "token_embd": Q.Q8_0,
        "attn_q": Q.Q4_0,
        "attn_k": Q.Q4_1,
        "attn_v": Q.Q8_0,
        "attn_output": Q.Q4_1,
        "ffn_gate": Q.Q4_0,
        "ffn_up": Q.F16,
        "ffn_down": Q.Q8_0,
        "output": Q.F32,
    }
    types = {**default_types, **(types or {})}
    expected: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, w: np.ndarray, kind: Q = Q.F32, n_head: int | None = None) -> None:
        stored = llamacpp_permute(w, n_head) if n_head and arch == "llama" else w
        if gemma and gguf_name.endswith("norm.weight"):  # llama.cpp folds Gemma's (1 + w) into the weight
            stored = w + 1
        if kind == Q.F32:
            writer.add_tensor(gguf_name, stored.astype(np.float32))
            expected[hf_name] = w.astype(np.float32)
        elif kind == Q.F16:
            writer.add_tensor(gguf_name, stored.astype(np.float16))
            expected[hf_name] = w.astype(np.float16).astype(np.float32)
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(stored, kind), raw_dtype=kind)
            expected[hf_name] = gguf.quants.dequantize(gguf.quants.quantize(w, kind), kind)

    def rand(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    add("token_embd.weight", "model.embed_tokens.weight", rand(vocab, h, scale=1.0), types["token_embd"])
    norm = (lambda n: rand(n, scale=0.1)) if gemma else (lambda n: 1 + rand(n, scale=0.1))
    for i in range(layers):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        add(b + "attn_norm.weight", p + "input_layernorm.weight", norm(h))
        if gemma:
            add(b + "post_attention_norm.weight", p + "post_attention_layernorm.weight", norm(h))
            add(b + "ffn_norm.weight", p + "pre_feedforward_layernorm.weight", norm(h))
            add(b + "post_ffw_norm.weight", p + "post_feedforward_layernorm.weight", norm(h))
        else:
            add(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", norm(h))
        if arch in ("qwen3", "gemma3"):
            add(b + "attn_q_norm.weight", p + "self_attn.q_norm.weight", norm(head_dim))
            add(b + "attn_k_norm.weight", p + "self_attn.k_norm.weight", norm(head_dim))
        add(b + "attn_q.weight", p + "self_attn.q_proj.weight", rand(heads * head_dim, h), types["attn_q"], heads)
        add(b + "attn_k.weight", p + "self_attn.k_proj.weight", rand(kv * head_dim, h), types["attn_k"], kv)
        add(b + "attn_v.weight", p + "self_attn.v_proj.weight", rand(kv * head_dim, h), types["attn_v"])
        add(b + "attn_output.weight", p + "self_attn.o_proj.weight", rand(h, heads * head_dim), types["attn_output"])
        add(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", rand(ffn, h), types["ffn_gate"])
        add(b + "ffn_up.weight", p + "mlp.up_proj.weight", rand(ffn, h), types["ffn_up"])
        add(b + "ffn_down.weight", p + "mlp.down_proj.weight", rand(h, ffn), types["ffn_down"])
        if arch == "qwen2":
            add(b + "attn_q.bias", p + "self_attn.q_proj.bias", rand(heads * head_dim))
            add(b + "attn_k.bias", p + "self_attn.k_proj.bias", rand(kv * head_dim))
            add(b + "attn_v.bias", p + "self_attn.v_proj.bias", rand(kv * head_dim))
    add("output_norm.weight", "model.norm.weight", norm(h))
    if with_output:
        add("output.weight", "lm_head.weight", rand(vocab, h), types["output"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def dequantized_float32(model: nn.Module) -> nn.Module:
    """Cast float16 parameters (quantization scales/biases included) to float32, then dequantize."""
    from mlx.utils import tree_map
    from mlx_lm.utils import dequantize_model

    model.update(tree_map(lambda p: p.astype(mx.float32) if p.dtype == mx.float16 else p, model.parameters()))
    return dequantize_model(model)


# ---------------------------------------------------------------- the default model


@pytest.fixture(scope="module")
def smollm2_dir(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smollm2-mlx")
    convert_gguf(smollm2_gguf, out)
    return out


@pytest.fixture(scope="module")
def smollm2_loaded(smollm2_dir: Path):
    from mlx_lm import load

    return load(str(smollm2_dir))


@pytest.fixture(scope="module")
def smollm2_reader(smollm2_gguf: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(str(smollm2_gguf))


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def test_directory_layout(smollm2_dir: Path) -> None:
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    } <= names


def test_config_matches_metadata(smollm2_dir: Path, smollm2_reader: gguf.GGUFReader) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    r = smollm2_reader
    assert config["model_type"] == "llama"
    assert config["hidden_size"] == _field(r, "llama.embedding_length") == 576
    assert config["num_hidden_layers"] == _field(r, "llama.block_count") == 30
    assert config["intermediate_size"] == _field(r, "llama.feed_forward_length")
    assert config["num_attention_heads"] == _field(r, "llama.attention.head_count") == 9
    assert config["num_key_value_heads"] == _field(r, "llama.attention.head_count_kv") == 3
    assert config["head_dim"] == _field(r, "llama.rope.dimension_count") == 64
    assert config["rms_norm_eps"] == pytest.approx(_field(r, "llama.attention.layer_norm_rms_epsilon"), rel=1e-6)
    assert config["rope_theta"] == _field(r, "llama.rope.freq_base") == 100000.0
    assert config["max_position_embeddings"] == _field(r, "llama.context_length") == 8192
    assert config["vocab_size"] == len(r.fields["tokenizer.ggml.tokens"].data) == 49152
    assert config["tie_word_embeddings"] is True  # the file has no output.weight
    assert "output.weight" not in {t.name for t in r.tensors}
    assert config["bos_token_id"] == _field(r, "tokenizer.ggml.bos_token_id") == 1
    assert config["eos_token_id"] == _field(r, "tokenizer.ggml.eos_token_id") == 2
    assert config["rope_traditional"] is False and "rope_scaling" not in config
    # token_embd is Q8_0, every other matrix Q4_1.
    assert config["quantization"] == {
        "group_size": 32,
        "bits": 4,
        "mode": "affine",
        "model.embed_tokens": {"group_size": 32, "bits": 8, "mode": "affine"},
    }
    tok_config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == _field(r, "tokenizer.chat_template")
    assert tok_config["add_bos_token"] is False
    assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")


def test_mlx_lm_load_and_generate(smollm2_loaded) -> None:
    from mlx_lm import generate

    model, tokenizer = smollm2_loaded
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding) and model.model.embed_tokens.bits == 8
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, nn.QuantizedLinear) and attn.q_proj.bits == 4
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end == 2 and im_end in tokenizer.eos_token_ids
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    tail = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert prompt[:1] == [1] and prompt[-len(tail) :] == tail and tail[0] == 1
    text = generate(model, tokenizer, prompt, max_tokens=8, verbose=False)
    assert "Paris" in text


def test_special_tokens_are_single_ids(smollm2_loaded, smollm2_reader: gguf.GGUFReader) -> None:
    _, tokenizer = smollm2_loaded
    r = smollm2_reader
    tokens = [
        str(bytes(r.fields["tokenizer.ggml.tokens"].parts[i]), "utf-8") for i in r.fields["tokenizer.ggml.tokens"].data
    ]
    types = [int(r.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in r.fields["tokenizer.ggml.token_type"].data]
    control = [(i, t) for i, (t, k) in enumerate(zip(tokens, types)) if k == 3]
    assert len(control) == 17
    for index, token in control:
        assert tokenizer.encode(token, add_special_tokens=False) == [index]
    ids = tokenizer.encode("<|im_start|>user\nHello<|im_end|>", add_special_tokens=False)
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.decode(ids) == "<|im_start|>user\nHello<|im_end|>"


def test_digits_split_individually(smollm2_dir: Path) -> None:
    """Hugging Face SmolLM2 (and llama.cpp's "smollm" pre-tokenizer) put every digit in its own piece."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    assert tok.encode("12345").tokens == ["1", "2", "3", "4", "5"]
    assert tok.encode("pi 3.14159").tokens == ["pi", "Ġ", "3", ".", "1", "4", "1", "5", "9"]
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(" ٣٤ ²x")]
    assert pieces == ["Ġ", "Ù£", "Ù¤", "Ġ", "Â²", "x"]


def test_qk_rows_are_unpermuted(smollm2_dir: Path, smollm2_gguf: Path) -> None:
    raw = mx.load(str(smollm2_gguf))
    ours = mx.load(str(smollm2_dir / "model.safetensors"))
    for gguf_name, hf_name, n_head in (("attn_q", "q_proj", 9), ("attn_k", "k_proj", 3)):
        for part in ("weight", "scales", "biases"):
            stored = np.array(raw[f"blk.3.{gguf_name}.{part}"])
            converted = np.array(ours[f"model.layers.3.self_attn.{hf_name}.{part}"])
            assert not np.array_equal(stored, converted)
            np.testing.assert_array_equal(llamacpp_permute(converted, n_head), stored)
    np.testing.assert_array_equal(
        np.array(raw["blk.3.attn_v.weight"]), np.array(ours["model.layers.3.self_attn.v_proj.weight"])
    )


def test_permuted_weights_give_different_logits(smollm2_loaded, smollm2_dir: Path) -> None:
    """Loading Q/K in llama.cpp's row order (no un-permutation) changes the logits a lot; the
    reference test shows the un-permuted ones match transformers."""
    from mlx_lm.utils import load_model

    model, tokenizer = smollm2_loaded
    text = "def fibonacci(n):\n    if n < 2:\n        return n\n    return"
    ids = mx.array([tokenizer.encode(text)])
    good = np.array(model(ids)[0].astype(mx.float32))  # logits at every position
    permuted, _ = load_model(smollm2_dir)
    for layer in permuted.model.layers:
        for proj, n_head in ((layer.self_attn.q_proj, 9), (layer.self_attn.k_proj, 3)):
            for part in ("weight", "scales", "biases"):
                setattr(proj, part, mx.array(llamacpp_permute(np.array(getattr(proj, part)), n_head)))
    bad = np.array(permuted(ids)[0].astype(mx.float32))
    # Position 0 attends only to itself, where RoPE is the identity: the same either way.
    np.testing.assert_allclose(good[0], bad[0], atol=1e-3)
    assert np.abs(good - bad).max() > 5.0  # measured ~20
    assert (good.argmax(-1) != bad.argmax(-1)).sum() >= 3  # measured 7 of 18 positions


# ---------------------------------------------------------------- tiny crafted GGUFs


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_tiny_model_weights_roundtrip(arch: str, tmp_path: Path) -> None:
    """Q4_0 / Q4_1 / Q8_0 / F16 / F32 tensors come out as the gguf package dequantizes them,
    in HF row order, with the right bits per module; qwen2 keeps its q/k/v biases, qwen3 and
    gemma3 their q/k norms, gemma3 its four block norms without llama.cpp's +1."""
    from mlx_lm import load

    expected = write_tiny_gguf(tmp_path / "tiny.gguf", arch, with_output=True)
    out = tmp_path / "out"
    out.mkdir()
    convert_gguf(tmp_path / "tiny.gguf", out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == {"gemma3": "gemma3_text"}.get(arch, arch)
    assert config["tie_word_embeddings"] is False
    quant = config["quantization"]
    assert quant["bits"] == 4
    assert quant["model.embed_tokens"]["bits"] == 8 and quant["model.layers.1.mlp.down_proj"]["bits"] == 8
    assert "model.layers.1.mlp.up_proj" not in quant  # F16: not quantized at all
    model, tokenizer = load(str(out))
    assert model.model.layers[0].self_attn.v_proj.bits == 8
    assert model.model.layers[0].self_attn.k_proj.bits == 4
    params = dict(tree_flatten(dequantized_float32(model).parameters()))
    assert set(params) == set(expected)
    for name, want in expected.items():
        np.testing.assert_allclose(np.array(params[name]), want, rtol=1e-5, atol=1e-6, err_msg=name)
    assert tokenizer.encode("<|im_end|> the", add_special_tokens=False)[:1] == [258]
    assert 258 in tokenizer.eos_token_ids


def test_gemma3_config(tmp_path: Path) -> None:
    """The Gemma 3 keys llama.cpp does not store are derived as llama.cpp derives them."""
    write_tiny_gguf(tmp_path / "g.gguf", "gemma3")
    (tmp_path / "out").mkdir()
    convert_gguf(tmp_path / "g.gguf", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["num_hidden_layers"] == GEMMA3_LAYERS
    assert config["head_dim"] == 16 and config["query_pre_attn_scalar"] == 16  # the head dim (27B: hidden/heads)
    assert (config["sliding_window"], config["sliding_window_pattern"]) == (GEMMA3_WINDOW, 6)
    assert config["rope_local_base_freq"] == 10000.0 and config["rope_theta"] == 10000.0
    assert config["tie_word_embeddings"] is True


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "bert.gguf"
    write_tiny_gguf(path, "bert")
    (tmp_path / "out").mkdir()
    with pytest.raises(GGUFConversionError, match="architecture 'bert'"):
        convert_gguf(path, tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())


def test_unsupported_tokenizer_model(tmp_path: Path) -> None:
    path = tmp_path / "t.gguf"
    write_tiny_gguf(path, tokenizer_model="bert")
    (tmp_path / "out").mkdir()
    with pytest.raises(GGUFConversionError, match="tokenizer model 'bert'"):
        convert_gguf(path, tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    """A K-quant is refused, not silently dequantized by MLX's loader (whose Q4_K is not ggml's)."""
    path = tmp_path / "k.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    block, size = gguf.GGML_QUANT_SIZES[Q.Q4_K]
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 256 // block * size), np.uint8), raw_dtype=Q.Q4_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFConversionError, match="Q4_K"):
        convert_gguf(path, tmp_path)


def test_llama3_rope_scaling_recovered() -> None:
    """llama.cpp stores Llama 3.1's rope scaling as a rope_freqs tensor; recover HF's parameters."""
    factor, low, high, old, theta, dim = 8.0, 1.0, 4.0, 8192, 500000.0, 128
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, dim, 2) / dim):  # llama.cpp convert_hf_to_gguf.py
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    factors = np.float32(factors).tolist()
    assert _llama3_rope_scaling(factors, theta, dim) == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    with pytest.raises(GGUFConversionError):
        _llama3_rope_scaling([1.0, 3.0, 5.0, 8.0] * 16, theta, dim)
