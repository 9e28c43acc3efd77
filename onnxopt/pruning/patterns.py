"""Sparsity patterns: unstructured (any weights of a layer) or N:M (N of every M consecutive
input columns kept, the layout NVIDIA's sparse tensor cores and other sparse runtimes read)."""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from onnxopt.errors import InputError


@dataclasses.dataclass(frozen=True)
class SparsityPattern:
    """Zeros anywhere (``keep`` and ``group`` None), or ``keep`` of every ``group``
    consecutive input columns of each row."""

    keep: int | None = None
    group: int | None = None

    @property
    def structured(self) -> bool:
        return self.group is not None

    @property
    def ratio(self) -> float | None:
        """The share of zeros an N:M pattern gives; None when unstructured."""
        return None if self.group is None else 1 - self.keep / self.group

    def __str__(self) -> str:
        return "unstructured" if self.group is None else f"{self.keep}:{self.group}"


def parse_pattern(text: str) -> SparsityPattern:
    """``"unstructured"`` or ``"N:M"`` with 0 < N < M; an InputError naming the option else."""
    if text == "unstructured":
        return SparsityPattern()
    match = re.fullmatch(r"(\d+):(\d+)", text.strip())
    if not match or not 0 < int(match[1]) < int(match[2]):
        raise InputError(
            f"sparsify.pattern = {text!r} is not a sparsity pattern",
            fix="use 'unstructured' or N:M with 0 < N < M, such as '2:4'",
        )
    return SparsityPattern(int(match[1]), int(match[2]))


def smallest_mask(scores: np.ndarray, ratio: float, per_row: bool) -> np.ndarray:
    """True where a weight is pruned: the ``ratio`` of ``scores`` (rows, columns) with the
    lowest values, in each row or over the whole matrix."""
    if per_row:
        count = round(scores.shape[1] * ratio)
        order = np.argsort(scores, axis=1, kind="stable")[:, :count]
        mask = np.zeros(scores.shape, dtype=bool)
        np.put_along_axis(mask, order, True, axis=1)
        return mask
    count = round(scores.size * ratio)
    order = np.argsort(scores, axis=None, kind="stable")[:count]
    mask = np.zeros(scores.size, dtype=bool)
    mask[order] = True
    return mask.reshape(scores.shape)


def n_m_mask(scores: np.ndarray, pattern: SparsityPattern) -> np.ndarray:
    """True where a weight is pruned: in every ``group`` consecutive columns of each row, the
    ``group - keep`` with the lowest scores. The columns must divide into groups."""
    rows, columns = scores.shape
    grouped = scores.reshape(rows, columns // pattern.group, pattern.group)
    order = np.argsort(grouped, axis=2, kind="stable")[:, :, : pattern.group - pattern.keep]
    mask = np.zeros(grouped.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=2)
    return mask.reshape(rows, columns)
