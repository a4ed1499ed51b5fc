"""Tolerances of the test suite, derived from floating-point arithmetic, never tuned on one CPU.

The suite must pass on any x86-64 / arm64 CPU: SIMD width (SSE / AVX2 / AVX-512 / NEON), MKL /
oneDNN / OpenBLAS kernels and the thread count change the order of float sums and the last bits of
vectorised exp / log, so a value our own code computes may differ in its last bits from machine to
machine. A tolerance here is a bound on rounding error, not a measured difference.

The model (first order, as in Higham, *Accuracy and Stability of Numerical Algorithms*, ch. 2-4):

* unit roundoff u: fp32 ``U32`` = 2^-24 ≈ 6.0e-8, fp64 ``U64`` = 2^-53 ≈ 1.1e-16. +, -, *, /,
  sqrt are correctly rounded (relative error ≤ u each); exp / log / sigmoid / softplus in PyTorch's
  vectorised CPU kernels (SLEEF, vendor libm) are within a few ulp: count each as 4 roundings.
* A chain of k roundings on O(1) values: relative error ≤ k·u.
* A sum of n terms with pairwise / blocked summation (PyTorch's CPU reductions are cascaded, BLAS and
  oneDNN dot products are blocked): error ≤ log2(n)·u · Σ|terms|. Relative to the result, that is
  times the condition number Σ|terms| / |Σ terms| when the terms cancel (a KL divergence, a
  difference of two losses).
* ``MARGIN`` = 10 on top of every bound: the bounds are first order and leave out small constants.

Tests whose two sides run the same kernels on the same shapes in the same process compare exactly
(``==``, ``torch.equal``, ``rtol=0, atol=0``): the same operations in the same order give the same
bits, whatever the CPU. Tests that prove two *different* computations are the same math run in fp64
(``distill.engine.device.Runtime(dtype="float64").precision()``), where ``FP64_SAME_MATH`` leaves
rounding ~1e4x below it; see tests/test_dense_unchanged.py and tests/test_distributed.py.
"""
from __future__ import annotations

import math

U32 = 2.0**-24  # fp32 unit roundoff, ≈ 6.0e-8
U64 = 2.0**-53  # fp64 unit roundoff, ≈ 1.1e-16
U16 = 2.0**-11  # fp16 unit roundoff (a cache row's storage), ≈ 4.9e-4; one fp16 ulp is ≤ 2 · U16 relative
MARGIN = 10


def fp32_chain(roundings: float, condition: float = 1.0) -> float:
    """Relative tolerance of an fp32 result ``roundings`` operations away from exact, on O(1) values,
    amplified by ``condition`` (Σ|terms| / |result|) where the last step cancels; times ``MARGIN``."""
    return MARGIN * roundings * condition * U32


def fp32_sum(n: int, condition: float = 1.0) -> float:
    """Relative tolerance of an fp32 sum (or mean, dot product) of ``n`` terms: log2(n)·u·condition·MARGIN."""
    return MARGIN * max(1.0, math.log2(n)) * condition * U32


# A hand-derived value a few fp32 operations away from exact: up to 16 roundings (e.g. a handful of
# products and divisions plus two transcendental calls) on O(1) values, no cancellation: ≈ 9.5e-6.
FP32_FEW_OPS = fp32_chain(16)
# The same with cancellation up to 10x (a KL divergence, 1 - GIoU, a focal term: the result is a
# difference of terms up to 10x larger than itself): ≈ 9.5e-5.
FP32_FEW_OPS_CANCEL = fp32_chain(16, condition=10)
# Two different computations of the same math in fp64 (a ~20-layer network and reductions over
# ≤ 1e5 terms: ≈ 200 roundings · u64 ≈ 2e-14; see tests/test_dense_unchanged.py): 1e-9 leaves 5e4x.
FP64_SAME_MATH = 1e-9
# The output or loss of a small detector (~20 layers: convs of fan-in ≤ 3·3·64, then reductions over
# ≤ 1e4 locations) computed by two different kernels (another batch size or shape, another reduction
# order): ≈ 20·log2(576) + log2(8e5) ≈ 200 roundings (tests/test_dense_unchanged.py): 200·u ≈ 1.2e-5,
# times MARGIN ≈ 1.2e-4. A claim that needs more than this is proven in fp64 (FP64_SAME_MATH).
FP32_NETWORK = fp32_chain(200)
