"""server/embeddings/cpu_kernels.py: the polynomial GELU and softmax against float64 references."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from server.embeddings import cpu_kernels


def test_gelu_matches_exact_erf_gelu() -> None:
    x = np.concatenate([np.linspace(-12, 12, 20001), np.random.default_rng(0).normal(0, 3, 20000)])
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
    for kernel in (cpu_kernels.gelu_polynomial, cpu_kernels.gelu()):
        got = np.array(kernel(mx.array(x.astype(np.float32))), dtype=np.float64)
        assert np.abs(got - exact).max() < 2e-6


def test_exp_and_softmax_match_float64() -> None:
    x = np.linspace(-100, 0, 50001).astype(np.float32).astype(np.float64)  # exactly representable inputs
    got = np.array(cpu_kernels.exp_nonpositive(mx.array(x.astype(np.float32))), dtype=np.float64)
    keep = x > -80
    np.testing.assert_allclose(got[keep], np.exp(x[keep]), rtol=3e-6)
    assert got[~keep].max() < 1e-34
    scores = np.random.default_rng(1).normal(0, 6, (64, 97))
    scores[:, 50:] = -1e30  # masked keys
    want = np.exp(scores - scores.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    for kernel in (cpu_kernels.softmax_polynomial, cpu_kernels.softmax()):
        got = np.array(kernel(mx.array(scores.astype(np.float32))), dtype=np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-30)
        assert np.abs(got.sum(-1) - 1).max() < 1e-5


def test_softmax_kernel_has_the_exact_gradient() -> None:
    x = mx.array(np.random.default_rng(2).normal(0, 3, (8, 33)).astype(np.float32))
    w = mx.array(np.random.default_rng(3).normal(0, 1, (8, 33)).astype(np.float32))
    got = mx.grad(lambda v: (cpu_kernels.softmax()(v) * w).sum())(x)
    want = mx.grad(lambda v: (mx.softmax(v, axis=-1) * w).sum())(x)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-6)
