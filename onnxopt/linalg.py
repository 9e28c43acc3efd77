"""The factor GPTQ and SparseGPT share: the upper Cholesky factor of an inverse Hessian.

Both visit a layer's input columns in order and, after each, move the columns not yet visited
by the row of that factor (``H^-1 = U^T U``, ``U`` upper triangular).
"""

from __future__ import annotations

import numpy as np

# Triangular matrices up to this size are inverted directly, larger ones by halves.
TRIANGULAR_BLOCK = 64


def upper_inverse_factor(hessian: np.ndarray) -> np.ndarray:
    """``U`` upper triangular with ``U^T U = H^-1``, for H (..., n, n) positive definite.

    With ``J`` the reversal of the columns, ``J H J = L L^T`` gives ``U = J L^-1 J``: one
    Cholesky factorization and one triangular inverse, a fifth of the time of inverting H and
    factorizing the inverse (1152 columns: 0.03 s against 0.15 s).

    Raises numpy.linalg.LinAlgError when H is not positive definite.
    """
    reversed_lower = np.linalg.cholesky(hessian[..., ::-1, ::-1])
    return np.ascontiguousarray(lower_inverse(reversed_lower)[..., ::-1, ::-1])


def lower_inverse(lower: np.ndarray) -> np.ndarray:
    """The inverse of lower triangular matrices, by halves: numpy has no triangular inverse,
    and its general one costs eight times the multiplications."""
    size = lower.shape[-1]
    if size <= TRIANGULAR_BLOCK:
        return np.linalg.inv(lower)
    half = size // 2
    top = lower_inverse(lower[..., :half, :half])
    bottom = lower_inverse(lower[..., half:, half:])
    inverse = np.zeros_like(lower)
    inverse[..., :half, :half] = top
    inverse[..., half:, half:] = bottom
    inverse[..., half:, :half] = -bottom @ (lower[..., half:, :half] @ top)
    return inverse
