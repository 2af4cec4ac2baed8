"""Float32 GELU and softmax for MLX's CPU backend, built from multiplies so they vectorize.

MLX on CPU evaluates transcendental functions (erf, exp, tanh) one scalar at a
time, about 15-30 ns an element: in MiniLM that made GELU 60% of the run time
and the attention softmax most of the rest. These forms use polynomials and
bit arithmetic only, and are `mx.compile`d into one fused loop each (MLX's CPU
compiler needs a C++ compiler at run time; without one they run uncompiled,
still faster than the scalar path). Both agree with the exact functions to
float32 precision (GELU within 1e-6 absolute, softmax within 3e-6 relative).
On Metal and CUDA the exact built-ins are fast and are used instead. Both are
differentiable (softmax through an explicit vjp).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import mlx.core as mx

# Abramowitz & Stegun 7.1.28: erf(a) = 1 - (1 + c1 a + ... + c6 a^6)^-16 for a >= 0, |error| <= 3e-7.
_ERF = (0.0705230784, 0.0422820123, 0.0092705272, 0.0001520143, 0.0002765672, 0.0000430638)
_LN2 = math.log(2.0)
_LN2_HI = 0.693359375  # Cody-Waite split: n * _LN2_HI is exact in float32 for |n| < 2^9
_LN2_LO = _LN2 - _LN2_HI

Kernel = Callable[[mx.array], mx.array]


def gelu_polynomial(x: mx.array) -> mx.array:
    """0.5 x (1 + erf(x / sqrt 2)), the exact (not tanh) GELU."""
    a = mx.abs(x) * (1 / math.sqrt(2.0))
    p = mx.array(_ERF[5], dtype=x.dtype)
    for c in reversed(_ERF[:5]):
        p = p * a + c
    p = 1 + p * a
    for _ in range(4):  # ^16
        p = p * p
    return 0.5 * x + 0.5 * mx.abs(x) * (1 - 1 / p)


def exp_nonpositive(x: mx.array) -> mx.array:
    """e^x for x <= 0 (underflows to ~1e-38 below -87): 2^n by building the float's exponent bits,
    times a degree-8 Taylor polynomial of e^r on |r| <= ln2/2."""
    x = mx.maximum(x, -87.0)
    n = mx.floor(x * (1 / _LN2) + 0.5)
    r = (x - n * _LN2_HI) - n * _LN2_LO
    p = mx.array(1 / 40320, dtype=x.dtype)
    for k in range(7, -1, -1):
        p = p * r + 1 / math.factorial(k)
    scale = mx.view(mx.left_shift(n.astype(mx.int32) + 127, 23), mx.float32)
    return p * scale


def softmax_polynomial(x: mx.array) -> mx.array:
    """Softmax over the last axis."""
    e = exp_nonpositive(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _compiled(fn: Kernel) -> Kernel:
    compiled = mx.compile(fn)
    try:
        mx.eval(compiled(mx.zeros((2, 2))))
        return compiled
    except Exception:  # noqa: BLE001 - no C++ compiler for MLX's CPU JIT: run the ops unfused
        return fn


def gelu() -> Kernel:
    return _compiled(gelu_polynomial)


def softmax() -> Kernel:
    """The compiled softmax with the exact backward attached: its exponent bit trick (`mx.view`)
    has no vjp, and training an encoder (server/finetune/embedding_trainer.py) needs one."""
    forward = _compiled(softmax_polynomial)

    @mx.custom_function
    def softmax_fn(x: mx.array) -> mx.array:
        return forward(x)

    @softmax_fn.vjp
    def softmax_vjp(primals: tuple[mx.array, ...], cotangent: mx.array, output: mx.array) -> tuple[mx.array]:
        return (output * (cotangent - (cotangent * output).sum(axis=-1, keepdims=True)),)

    # mlx types a custom_function's __call__ as (*Any) -> object; this one maps an array to an array
    return cast(Kernel, softmax_fn)
