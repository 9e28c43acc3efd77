"""Fidelity figures between a reference model's outputs and a candidate's."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass
class OutputFidelity:
    """How closely one output of the candidate follows the reference, over all samples.

    Attributes:
        name: the output's name.
        max_abs_error: largest absolute difference of any element.
        max_error_beyond_rtol: largest ``|candidate - reference| - rtol * |reference|``; an output
            passes numpy-style ``allclose(rtol, atol)`` exactly when this is <= atol.
        cosine: cosine similarity of the flattened outputs (1.0 for two all-zero outputs).
        sqnr_db: signal-to-quantization-noise ratio in dB (inf when identical).
        top1_agreement: share of samples whose argmax over the last axis agrees, for outputs
            that look like class scores; None otherwise.
        mismatched: share of elements that differ, for integer and boolean outputs; None otherwise.
    """

    name: str
    max_abs_error: float
    max_error_beyond_rtol: float
    cosine: float
    sqnr_db: float
    top1_agreement: float | None = None
    mismatched: float | None = None


def looks_like_class_scores(array: np.ndarray) -> bool:
    """Float [batch, classes] (or [classes]) with at least two classes: argmax means something."""
    return array.dtype.kind == "f" and array.ndim in (1, 2) and array.shape[-1] >= 2


def compare_outputs(
    names: Sequence[str],
    reference: Sequence[Sequence[np.ndarray]],
    candidate: Sequence[Sequence[np.ndarray]],
    rtol: float = 0.0,
) -> list[OutputFidelity]:
    """Fidelity of every output, with reference[i][j] being output j of sample i."""
    results = []
    for index, name in enumerate(names):
        expected = [np.asarray(sample[index]) for sample in reference]
        actual = [np.asarray(sample[index]) for sample in candidate]
        results.append(_compare_one(name, expected, actual, rtol))
    return results


def _compare_one(
    name: str, expected: list[np.ndarray], actual: list[np.ndarray], rtol: float
) -> OutputFidelity:
    for sample, (want, got) in enumerate(zip(expected, actual, strict=True)):
        if want.shape != got.shape:
            raise ValueError(
                f"output '{name}' of sample {sample} has shape {got.shape}, expected {want.shape}"
            )
    want_flat = (
        np.concatenate([array.reshape(-1) for array in expected]) if expected else np.zeros(0)
    )
    got_flat = np.concatenate([array.reshape(-1) for array in actual]) if actual else np.zeros(0)
    mismatched = None
    if want_flat.dtype.kind in "biu" or want_flat.dtype.kind == "O":
        mismatched = float(np.mean(want_flat != got_flat)) if want_flat.size else 0.0
    reference = want_flat.astype(np.float64)
    observed = got_flat.astype(np.float64)
    error = np.abs(observed - reference)
    finite_error = np.where(np.isnan(error) & np.isnan(reference) & np.isnan(observed), 0.0, error)
    max_abs_error = float(np.nan_to_num(finite_error, nan=math.inf).max()) if error.size else 0.0
    beyond = finite_error - rtol * np.abs(np.nan_to_num(reference))
    max_beyond = float(np.nan_to_num(beyond, nan=math.inf).max()) if error.size else 0.0
    top1 = None
    if expected and all(looks_like_class_scores(array) for array in expected):
        want_classes = np.concatenate([np.atleast_2d(array).argmax(-1) for array in expected])
        got_classes = np.concatenate([np.atleast_2d(array).argmax(-1) for array in actual])
        top1 = float(np.mean(want_classes == got_classes))
    return OutputFidelity(
        name=name,
        max_abs_error=max_abs_error,
        max_error_beyond_rtol=max_beyond,
        cosine=_cosine(reference, observed),
        sqnr_db=_sqnr_db(reference, observed),
        top1_agreement=top1,
        mismatched=mismatched,
    )


def _cosine(reference: np.ndarray, observed: np.ndarray) -> float:
    reference = np.nan_to_num(reference)
    observed = np.nan_to_num(observed)
    norms = float(np.linalg.norm(reference) * np.linalg.norm(observed))
    if norms == 0.0:
        return 1.0 if np.array_equal(reference, observed) else 0.0
    return float(np.dot(reference, observed) / norms)


def _sqnr_db(reference: np.ndarray, observed: np.ndarray) -> float:
    noise = float(np.sum((np.nan_to_num(observed) - np.nan_to_num(reference)) ** 2))
    signal = float(np.sum(np.nan_to_num(reference) ** 2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
