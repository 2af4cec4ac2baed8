"""Attention and SwiGLU for Llama-family chat models on MLX's CPU backend: the same math, cheaper exponentials.

MLX's CPU backend evaluates `exp` and `sigmoid` one scalar at a time (about 30 and 40 ns an element
on this project's x86 machine, against under 1 ns for a multiply or an add), and its fused attention
falls back to that exponential for the softmax. On a 135M model at 24 decoding sequences over
500 tokens of context, the attention softmax and SwiGLU's sigmoid were about a third of a step.
`mx.power(2, x)` costs about a third of `exp`, and e^x = 2^(x log2 e); so here

* attention multiplies the queries by scale * log2(e) (folded into the one scale multiply), takes
  the softmax in base 2 from grouped-query matmuls, and fills hidden positions with the dtype's
  lowest value (a fully hidden padding row gives a uniform row, never NaN);
* SwiGLU computes silu(g) = g / (1 + 2^(-g log2 e)).

`speed_up_for_cpu` switches the attention and MLP modules of a loaded model to these versions by
changing each instance's class to a subclass of its own (the parameters, their names, adapters
fused or attached later, and every other module stay as they were). Only module classes whose
`__call__` is known to match are switched (mlx-lm's llama, qwen2, qwen3); anything else keeps
mlx-lm's code. On Metal and CUDA the built-in kernels are fast and nothing is switched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

LOG2_E = math.log2(math.e)


def silu_times(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, the SwiGLU product, with the sigmoid as a power of two."""
    return gate / (1 + mx.power(2.0, gate * -LOG2_E)) * up


def attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask: Any) -> mx.array:
    """softmax(q k^T * scale + mask) v for (B, H, L, D) queries and (B, KH, S, D) keys and values.

    `mask` is None, "causal" (query i of L sees keys up to S - L + i), a boolean array (True =
    visible) or an additive one, broadcastable to (B, H or 1, L, S). Query head h reads key head
    h // (H / KH), as MLX's fused attention does.
    """
    batch, heads, length, dim = queries.shape
    kv_heads, width = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    q = (queries * (scale * LOG2_E)).reshape(batch, kv_heads, group * length, dim)
    scores = (q @ keys.swapaxes(-1, -2)).reshape(batch, kv_heads, group, length, width)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unsupported attention mask {mask!r}")
        visible = mx.arange(width)[None, :] <= mx.arange(width - length, width)[:, None]
        scores = mx.where(visible, scores, mx.finfo(scores.dtype).min)
    elif mask is not None:
        mask = _grouped(mask, kv_heads, group)
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        else:
            scores = scores + mask * LOG2_E
    weights = mx.power(2.0, scores - scores.max(axis=-1, keepdims=True))
    weights = weights / weights.sum(axis=-1, keepdims=True)
    out = weights.reshape(batch, kv_heads, group * length, width) @ values
    return out.reshape(batch, heads, length, values.shape[-1])


def _grouped(mask: mx.array, kv_heads: int, group: int) -> mx.array:
    """A (..., H or 1, L, S) mask as (B or 1, KH or 1, group or 1, L, S), to match the grouped scores."""
    while mask.ndim < 4:
        mask = mask[None]
    b, h, length, width = mask.shape
    if h == 1:
        return mask.reshape(b, 1, 1, length, width)
    return mask.reshape(b, kv_heads, group, length, width)


class _CpuAttention:
    """`__call__` of mlx-lm's llama / qwen2 / qwen3 attention, with `attention` above."""

    # set by the mlx-lm attention class this is mixed into (q_norm and k_norm by qwen3's only)
    n_heads: int
    n_kv_heads: int
    scale: float
    q_proj: Callable[[mx.array], mx.array]
    k_proj: Callable[[mx.array], mx.array]
    v_proj: Callable[[mx.array], mx.array]
    o_proj: Callable[[mx.array], mx.array]
    q_norm: Callable[[mx.array], mx.array]
    k_norm: Callable[[mx.array], mx.array]
    rope: Callable[..., mx.array]

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        batch, length, _ = x.shape
        queries = self.q_proj(x).reshape(batch, length, self.n_heads, -1)
        keys = self.k_proj(x).reshape(batch, length, self.n_kv_heads, -1)
        values = self.v_proj(x).reshape(batch, length, self.n_kv_heads, -1)
        if hasattr(self, "q_norm"):  # qwen3 normalizes every head's queries and keys before RoPE
            queries, keys = self.q_norm(queries), self.k_norm(keys)
        queries, keys, values = (a.transpose(0, 2, 1, 3) for a in (queries, keys, values))
        offset = cache.offset if cache is not None else 0
        queries, keys = self.rope(queries, offset=offset), self.rope(keys, offset=offset)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
        out = attention(queries, keys, values, self.scale, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class _CpuSwiGLU:
    """`__call__` of mlx-lm's gated MLP (down(silu(gate(x)) * up(x))), with `silu_times` above."""

    # set by the mlx-lm MLP class this is mixed into
    gate_proj: Callable[[mx.array], mx.array]
    up_proj: Callable[[mx.array], mx.array]
    down_proj: Callable[[mx.array], mx.array]

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(silu_times(self.gate_proj(x), self.up_proj(x)))


def _cpu_classes() -> dict[type, type]:
    """mlx-lm's module class -> its CPU subclass, for the classes whose `__call__` the mixins match."""
    from mlx_lm.models import llama, qwen2, qwen3

    table: dict[type, type] = {}
    for family in (llama, qwen2, qwen3):
        for base, mixin in ((family.Attention, _CpuAttention), (family.MLP, _CpuSwiGLU)):
            table[base] = type(
                f"Cpu{base.__name__}", (mixin, base), {"__module__": __name__, "__qualname__": f"Cpu{base.__name__}"}
            )
    return table


CPU_CLASSES = _cpu_classes()  # built once at import, never changed


def speed_up_for_cpu(model: nn.Module, device: Any = None) -> int:
    """Switch the model's attention and MLP modules to the CPU versions; returns how many were.

    Does nothing unless `device` (default: MLX's default device) is the CPU.
    """
    if (device or mx.default_device()) != mx.cpu:
        return 0
    switched = 0
    for _, module in model.named_modules():
        target = CPU_CLASSES.get(type(module))
        if target is not None:
            module.__class__ = target
            switched += 1
    return switched
