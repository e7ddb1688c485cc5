"""16x16 random Hadamard transform (RHT) for the inputs of the NVFP4 weight-gradient GEMM.

The wgrad GEMM contracts over tokens: dW = dy^T x. TE quantizes the column-wise copies x^T and dy^T with 1x16
blocks along the token dimension, after multiplying every 16-token block by the same orthonormal matrix
Q = diag(s) H16 / 4 (python reference ``NVFP4QuantizerRef._apply_rht`` /  ``_build_hadamard_matrix`` in
transformer_engine/pytorch/experimental/quantization_nvfp4.py: ``x_mat @ (sign_mat @ H) * (1/sqrt(16))``).
Because Q Q^T = I, (dy^T Q)(x^T Q)^T = dy^T x: the transform is free in exact arithmetic and spreads outliers
across the block before 4-bit rounding.

Signs: TE hard-codes one sign vector (``get_wgrad_sign_vector``); ``TE_WGRAD_SIGNS`` reproduces it, and
``random_signs(seed)`` draws seeded ones for studying the effect of the sign choice.
"""
from __future__ import annotations

import torch

RHT_DIM = 16

#: transformer_engine/pytorch/experimental/quantization_nvfp4.py::get_wgrad_sign_vector
TE_WGRAD_SIGNS = (1.0, 1.0, 1.0, -1.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 1.0, -1.0, 1.0, -1.0, -1.0)


def hadamard(n: int = RHT_DIM) -> torch.Tensor:
    """Sylvester Hadamard matrix of entries ±1 (n a power of two); H H^T = n I."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float32)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_signs(seed: int, n: int = RHT_DIM) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 2, (n,), generator=g).to(torch.float32) * 2 - 1


def te_signs() -> torch.Tensor:
    return torch.tensor(TE_WGRAD_SIGNS, dtype=torch.float32)


def rht_matrix(signs: torch.Tensor) -> torch.Tensor:
    """Q = diag(signs) H / sqrt(n): orthonormal, applied on the right of 16-wide row blocks."""
    n = signs.numel()
    return (signs.to(torch.float32).reshape(n, 1) * hadamard(n)) * (1.0 / n ** 0.5)


def apply_rht(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """x (..., L) -> fp32 (..., L) with every consecutive 16-block of the last dim multiplied by Q.

    L not a multiple of 16: the tail is zero-padded to a full block and the padded outputs are kept (the result
    is (..., ceil16(L))), because the transform mixes the padding into real columns; both wgrad operands are
    padded alike, so the product is unchanged.
    """
    n = signs.numel()
    q = rht_matrix(signs).to(x.device)
    L = x.shape[-1]
    pad = (-L) % n
    xf = x.to(torch.float32)
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    lead = xf.shape[:-1]
    return (xf.reshape(-1, n) @ q).reshape(*lead, L + pad)
