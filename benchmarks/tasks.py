"""Task scores for the benchmark models, so a quantized model is judged by what it is for.

Runs in the project venv (numpy only): the benchmark harness feeds the arrays that
onnxruntime returns. Each score accepts model outputs stacked over samples with or without
the batch axis of one feed, e.g. logits of shape (S, 1000) or (S, 1, 1000).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

CTC_BLANK = "blank"


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose highest-scoring class is the integer label."""
    predictions = np.argmax(logits.reshape(-1, logits.shape[-1]), axis=-1)
    return float(np.mean(predictions == labels.reshape(-1)))


def top1_agreement(logits_a: np.ndarray, logits_b: np.ndarray) -> float:
    """Fraction of samples on which two models pick the same class.

    Used where the data has no labels: the FP32 model's prediction is the reference, so
    this measures how often an optimized model changes the answer.
    """
    classes = logits_a.shape[-1]
    predictions_a = np.argmax(logits_a.reshape(-1, classes), axis=-1)
    predictions_b = np.argmax(logits_b.reshape(-1, classes), axis=-1)
    return float(np.mean(predictions_a == predictions_b))


def embedding_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity between matching vectors along the last axis of a and b.

    Cosine ignores scale, so it scores sentence embeddings by what retrieval uses: direction.
    A zero vector counts as cosine 0 rather than dividing by zero.
    """
    dimension = a.shape[-1]
    vectors_a = a.reshape(-1, dimension).astype(np.float64)
    vectors_b = b.reshape(-1, dimension).astype(np.float64)
    norms = np.linalg.norm(vectors_a, axis=1) * np.linalg.norm(vectors_b, axis=1)
    dots = np.sum(vectors_a * vectors_b, axis=1)
    cosines = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return float(np.mean(cosines))


def load_ctc_characters(dictionary_path: str | Path) -> list[str]:
    """Class labels of the PaddleOCR recognizer: blank, the dictionary's lines, then space.

    Same order as rapidocr's CTCLabelDecode (class 0 is the CTC blank, the last class a
    space), so class index i of the model output is characters[i].
    """
    lines = Path(dictionary_path).read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [CTC_BLANK, *lines, " "]


def ctc_greedy_decode(outputs: np.ndarray, characters: Sequence[str]) -> list[str]:
    """Decode CTC outputs [..., time, classes] into one string per sample.

    Takes the best class at each time step, merges repeats, then drops blanks, as
    PaddleOCR's and rapidocr's decoders do.
    """
    steps = outputs.reshape(-1, *outputs.shape[-2:]).argmax(axis=-1)
    texts = []
    for sequence in steps:
        keep = np.ones(sequence.shape, dtype=bool)
        keep[1:] = sequence[1:] != sequence[:-1]
        keep &= sequence != 0
        texts.append("".join(characters[index] for index in sequence[keep]))
    return texts


def exact_match(outputs: np.ndarray, texts: Sequence[str], characters: Sequence[str]) -> float:
    """Fraction of text lines whose CTC-decoded output equals the ground truth exactly.

    Leading and trailing spaces are stripped first: the recognizer sometimes emits its
    space class at the edges of a line, which no reader of the result would count as an error.
    """
    decoded = ctc_greedy_decode(outputs, characters)
    if len(decoded) != len(texts):
        raise ValueError(f"{len(decoded)} decoded lines but {len(texts)} ground-truth texts")
    matches = [line.strip() == str(text).strip() for line, text in zip(decoded, texts, strict=True)]
    return float(np.mean(matches))
