"""The embedded default chat model answers sensibly through its chat template, in float32 on CPU."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm import generate

from server.registry import ModelRegistry


def test_capital_of_france_is_paris(registry: ModelRegistry) -> None:
    served = registry.get("smollm2-135m-instruct")
    prompt = served.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    answer = generate(served.model, served.tokenizer, prompt, max_tokens=24)
    assert "Paris" in answer, answer


def test_cpu_weights_are_float32(registry: ModelRegistry) -> None:
    from mlx.utils import tree_flatten

    served = registry.get("smollm2-135m-instruct")
    dtypes = {v.dtype for _, v in tree_flatten(served.model.parameters())}
    if mx.default_device() == mx.cpu:
        assert dtypes == {mx.float32}, dtypes


def test_chat_template_and_stop_token(registry: ModelRegistry) -> None:
    tokenizer = registry.get("smollm2-135m-instruct").tokenizer
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in tokenizer.eos_token_ids
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
