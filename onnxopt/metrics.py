"""Fidelity figures between a reference model's outputs and a candidate's."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Collection, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.graph import default_opset


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """Signal-to-quantization-noise ratio in dB: inf without noise, -inf without signal."""
    if noise_power == 0.0:
        return math.inf
    if signal_power == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_power / noise_power)


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
        expected_top1_agreement: the agreement the measured noise leads to expect, for the same
            outputs: each sample counts the chance that noise of its size (how much its top
            class's margins over the classes closest to it move) puts another class on top; a
            handful of samples then estimates the agreement on many more without hinging on
            whether one near-tie happened to flip.
        top1_agreement: share of decisions whose argmax over the last axis agrees (one per
            sample, or one per step of a sequence of class scores), for outputs that look like
            class scores; None otherwise.
        mismatched: share of elements that differ, for integer and boolean outputs; None otherwise.
    """

    name: str
    max_abs_error: float
    max_error_beyond_rtol: float
    cosine: float
    sqnr_db: float
    top1_agreement: float | None = None
    expected_top1_agreement: float | None = None
    mismatched: float | None = None


# Ops that reshape a classifier's scores on the way out: a Conv head's [N, C, 1, 1] to [N, C].
RESHAPES = frozenset({"Reshape", "Flatten", "Squeeze"})


def class_score_outputs(model: ir.Model) -> set[str]:
    """Graph outputs that hold class scores, so top-1 means something: [batch, classes] or
    [classes], or a sequence's, [batch, steps, classes] or [steps, batch, classes] (a CTC text
    recognizer, a token classifier: each step's top class is a decision).

    Judged from the graph, not the values: a float output with at least two classes on its last
    axis, computed by a classifier head (Gemm, MatMul, Conv, a bias Add after one of them,
    Softmax, LogSoftmax, Sigmoid), through reshapes and Transposes that leave the classes on the
    last axis (a Conv's classes lie on axis 1, a Softmax's on its ``axis``); of rank 1 to 3. An
    embedding normalized by a Div or pooled by a ReduceMean is not one, whatever its shape.
    """
    opset = default_opset(model)
    found = set()
    for value in model.graph.outputs:
        if value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE):
            continue
        rank = len(value.shape) if value.shape is not None else None
        if rank is not None and (
            rank not in (1, 2, 3) or (isinstance(value.shape[-1], int) and value.shape[-1] < 2)
        ):
            continue
        axis = _class_axis(value, opset, rank)
        if axis == -1 or (axis is not None and rank is not None and axis == rank - 1):
            found.add(value.name)
    return found


def _class_axis(value: ir.Value, opset: int, output_rank: int | None) -> int | None:
    """The axis of ``value`` that holds a classifier head's classes: negative counting from the
    end, or not negative counting from the start; None where no head computes ``value``. A
    reshape to rank 2 or less (its own, or else the graph output's ``output_rank``) leaves the
    classes last."""
    node = value.producer()
    if node is None or not node.inputs or node.inputs[0] is None:
        return None
    if node.op_type in ("Gemm", "MatMul"):
        return -1
    if node.op_type == "Conv":
        return 1
    if node.op_type in ("Softmax", "LogSoftmax"):
        # Before opset 13 they flatten the input to 2-D from ``axis`` on: classes come last.
        return node.attributes.get_int("axis", -1) if opset >= 13 else -1
    if node.op_type == "Sigmoid":
        inner = _class_axis(node.inputs[0], opset, output_rank)
        return -1 if inner is None else inner
    if node.op_type == "Add":
        computed = [value for value in node.inputs if value is not None and not _is_constant(value)]
        if len(node.inputs) != 2 or len(computed) != 1:
            return None
        return _class_axis(computed[0], opset, output_rank)
    if node.op_type == "Transpose":
        return _transposed_axis(node, _class_axis(node.inputs[0], opset, output_rank))
    if node.op_type in ("Identity", "Cast"):
        return _class_axis(node.inputs[0], opset, output_rank)
    if node.op_type in RESHAPES:
        inner = _class_axis(node.inputs[0], opset, output_rank)
        shape = node.outputs[0].shape
        rank = len(shape) if shape is not None else output_rank
        if inner == -1 or (inner is not None and rank is not None and rank <= 2):
            return -1
    return None


def _transposed_axis(node: ir.Node, axis: int | None) -> int | None:
    """Where a Transpose puts its input's ``axis``; None where the rank is unknown."""
    if axis is None:
        return None
    perm = node.attributes.get_ints("perm", None)
    if perm is None:
        shape = node.inputs[0].shape
        if shape is None:
            return None
        perm = list(reversed(range(len(shape))))
    rank = len(perm)
    axis = axis + rank if axis < 0 else axis
    return list(perm).index(axis) if 0 <= axis < rank else None


def _is_constant(value: ir.Value) -> bool:
    """An initializer, or a Constant node's output (torch's exporter writes biases as those)."""
    return ir.convenience.get_const_tensor(value) is not None


# An output concatenated from at most this many parts is also measured part by part.
MAX_PARTS = 8


@dataclasses.dataclass(frozen=True)
class OutputPart:
    """A slice of an output that a Concat made from one of its inputs.

    Attributes:
        axis: the concatenation axis (not negative).
        start: where the slice begins on that axis.
        stop: where it ends.
    """

    axis: int
    start: int
    stop: int

    def name(self, output: str) -> str:
        """The part as numpy would slice it, such as ``output0[:, 4:22]``."""
        return f"{output}[{':, ' * self.axis}{self.start}:{self.stop}]"

    def of(self, array: np.ndarray) -> np.ndarray:
        index = [slice(None)] * self.axis + [slice(self.start, self.stop)]
        return array[tuple(index)]


def output_parts(model: ir.Model) -> dict[str, list[OutputPart]]:
    """The parts of each graph output that a Concat joins from up to MAX_PARTS inputs of known
    sizes, along any axis of the output. Parts can differ in scale by orders of magnitude: a
    YOLOv8 head joins box coordinates in pixels and class scores in [0, 1] (NudeNet: the whole
    output kept cosine 0.993 at 90% sparsity where its class scores' fell to 0.04), so each part
    is measured too. The join is followed through layout ops: YOLOv5 and YOLOX heads join boxes
    and scores per scale, then reshape, join the scales on another axis and transpose.
    """
    if not any(_reaches_concat(value, MAX_PARTS_DEPTH) for value in model.graph.outputs):
        return {}
    parts, unknown = _find_parts(model)
    if unknown:
        from onnxopt.shapes import infer_shapes

        model = model.clone()
        infer_shapes(model, data_prop=False)
        parts, _ = _find_parts(model)
    return parts


# Ops a join of parts is followed back through.
LAYOUT_OPS = frozenset(
    {"Transpose", "Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}
)


def _reaches_concat(value: ir.Value, depth: int) -> bool:
    """Whether a Concat makes ``value`` through layout ops: the search needs shapes only then."""
    node = value.producer()
    if depth == 0 or node is None or not node.inputs or node.inputs[0] is None:
        return False
    if node.op_type == "Concat":
        return True
    return node.op_type in LAYOUT_OPS and _reaches_concat(node.inputs[0], depth - 1)


class _UnknownShape(Exception):
    """A shape the search for joined parts needs is not in the graph."""


def _find_parts(model: ir.Model) -> tuple[dict[str, list[OutputPart]], bool]:
    """The parts of each output, and whether a shape the search needed was unknown."""
    parts: dict[str, list[OutputPart]] = {}
    unknown = False
    seen: dict[tuple[int, int], list[int] | None] = {}
    for value in model.graph.outputs:
        if value.shape is None:
            unknown = True
            continue
        found = []
        for axis in range(len(value.shape)):
            try:
                sizes = _joined_sizes(value, axis, seen, MAX_PARTS_DEPTH)
            except _UnknownShape:
                unknown = True
                continue
            if sizes is not None:
                bounds = np.cumsum([0, *sizes]).tolist()
                found += [
                    OutputPart(axis, start, stop) for start, stop in itertools.pairwise(bounds)
                ]
        if found:
            parts[value.name] = found
    return parts, unknown


# Layout ops (Transpose, reshapes, joins along other axes) followed back from an output.
MAX_PARTS_DEPTH = 8


def _joined_sizes(
    value: ir.Value, axis: int, seen: dict[tuple[int, int], list[int] | None], depth: int
) -> list[int] | None:
    """The sizes of the parts a Concat joins along ``axis`` (not negative) of ``value``, found
    through layout ops; None where nothing joins parts along it."""
    key = (id(value), axis)
    if key not in seen:
        seen[key] = _joined_sizes_uncached(value, axis, seen, depth)
    return seen[key]


def _joined_sizes_uncached(
    value: ir.Value, axis: int, seen: dict[tuple[int, int], list[int] | None], depth: int
) -> list[int] | None:
    node = value.producer()
    if depth == 0 or node is None or not node.inputs or any(v is None for v in node.inputs):
        return None
    if node.op_type == "Concat":
        if not 2 <= len(node.inputs) <= MAX_PARTS:
            return None
        shapes = [_known_shape(part) for part in node.inputs]
        joined = node.attributes.get_int("axis", 0)
        joined = joined + len(shapes[0]) if joined < 0 else joined
        if joined == axis:
            sizes = [shape[axis] if axis < len(shape) else None for shape in shapes]
            if not all(isinstance(size, int) for size in sizes):
                raise _UnknownShape
            return sizes
        found = [_joined_sizes(part, axis, seen, depth - 1) for part in node.inputs]
        return found[0] if all(sizes == found[0] for sizes in found) else None
    if node.op_type == "Transpose":
        perm = node.attributes.get_ints("perm", None)
        if perm is None:
            perm = list(reversed(range(len(_known_shape(node.inputs[0])))))
        return _joined_sizes(node.inputs[0], perm[axis], seen, depth - 1)
    if node.op_type in ("Identity", "Cast"):
        return _joined_sizes(node.inputs[0], axis, seen, depth - 1)
    if node.op_type in LAYOUT_OPS:
        kept = _kept_axis(_known_shape(node.inputs[0]), _known_shape(value), axis)
        return None if kept is None else _joined_sizes(node.inputs[0], kept, seen, depth - 1)
    return None


def _known_shape(value: ir.Value) -> ir.Shape:
    if value.shape is None:
        raise _UnknownShape
    return value.shape


def _kept_axis(before: ir.Shape, after: ir.Shape, axis: int) -> int | None:
    """The axis of ``before`` that a reshape to ``after`` keeps whole as ``axis``: the same size,
    with as many elements before it; None where the reshape splits or merges it."""
    if not isinstance(after[axis], int):
        return None
    target = _prefix(after, axis)
    for candidate in range(len(before)):
        if before[candidate] == after[axis] and _prefix(before, candidate) == target:
            return candidate
    return None


def _prefix(shape: ir.Shape, axis: int) -> tuple[int, tuple[str, ...]]:
    """The elements before ``axis`` of ``shape``: the product of its sizes and its named dims."""
    size, names = 1, []
    for dim in shape[:axis]:
        if isinstance(dim, int):
            size *= dim
        elif dim.value is None:
            raise _UnknownShape
        else:
            names.append(dim.value)
    return size, tuple(sorted(names))


def compare_outputs(
    names: Sequence[str],
    reference: Sequence[Sequence[np.ndarray]],
    candidate: Sequence[Sequence[np.ndarray]],
    rtol: float = 0.0,
    class_outputs: Collection[str] = (),
    parts: Mapping[str, Sequence[OutputPart]] | None = None,
) -> list[OutputFidelity]:
    """Fidelity of every output, with reference[i][j] being output j of sample i, each
    followed by the fidelity of its ``parts`` (``output_parts``), named as numpy slices them.

    Top-1 agreement is measured for the outputs named in ``class_outputs`` (see
    ``class_score_outputs``) whose arrays hold class scores on their last axis.
    """
    results = []
    for index, name in enumerate(names):
        expected = [np.asarray(sample[index]) for sample in reference]
        actual = [np.asarray(sample[index]) for sample in candidate]
        results.append(_compare_one(name, expected, actual, rtol, name in class_outputs))
        for part in (parts or {}).get(name, ()):
            if not all(part.axis < array.ndim for array in expected):
                continue
            results.append(
                _compare_one(
                    part.name(name),
                    [part.of(array) for array in expected],
                    [part.of(array) for array in actual],
                    rtol,
                    False,
                )
            )
    return results


def _compare_one(
    name: str,
    expected: list[np.ndarray],
    actual: list[np.ndarray],
    rtol: float,
    class_scores: bool,
) -> OutputFidelity:
    sums = _Sums()
    for sample, (want, got) in enumerate(zip(expected, actual, strict=True)):
        if want.shape != got.shape:
            raise ValueError(
                f"output '{name}' of sample {sample} has shape {got.shape}, expected {want.shape}"
            )
        sums.add(want, got, rtol)
    top1 = expected_top1 = None
    if class_scores and expected and all(_holds_classes(array) for array in expected):
        want_scores = np.concatenate([_rows(array) for array in expected])
        got_scores = np.concatenate([_rows(array) for array in actual])
        top1 = float(np.mean(want_scores.argmax(-1) == got_scores.argmax(-1)))
        expected_top1 = expected_agreement(want_scores, got_scores)
    return OutputFidelity(
        name=name,
        max_abs_error=sums.max_abs_error,
        max_error_beyond_rtol=sums.max_beyond,
        cosine=sums.cosine(),
        sqnr_db=sums.sqnr_db(),
        top1_agreement=top1,
        expected_top1_agreement=expected_top1,
        mismatched=sums.mismatched(),
    )


@dataclasses.dataclass
class _Sums:
    """Running sums over samples, so large outputs are compared one sample at a time.

    A NaN where the reference has one too counts as equal; a NaN on one side only is an
    infinite error. Cosine and SQNR read NaNs as zeros.
    """

    max_abs_error: float = 0.0
    max_beyond: float = 0.0
    dot: float = 0.0
    reference_power: float = 0.0
    observed_power: float = 0.0
    noise_power: float = 0.0
    integer_elements: int = 0
    integer_mismatches: int = 0
    values_seen: bool = False

    def add(self, want: np.ndarray, got: np.ndarray, rtol: float) -> None:
        if want.dtype.kind in "biuO":
            self.integer_elements += want.size
            self.integer_mismatches += int(np.count_nonzero(want != got))
        if want.size == 0:
            return
        reference = want.reshape(-1).astype(np.float64)
        observed = got.reshape(-1).astype(np.float64)
        error = np.abs(observed - reference)
        if np.isnan(error).any():
            both_nan = np.isnan(reference) & np.isnan(observed)
            error = np.where(both_nan, 0.0, np.nan_to_num(error, nan=math.inf))
            reference = np.nan_to_num(reference)
            observed = np.nan_to_num(observed)
        if not self.values_seen:
            self.max_abs_error = self.max_beyond = -math.inf
            self.values_seen = True
        self.max_abs_error = max(self.max_abs_error, float(error.max()))
        beyond = error - rtol * np.abs(reference) if rtol else error
        self.max_beyond = max(self.max_beyond, float(beyond.max()))
        self.dot += float(np.dot(reference, observed))
        self.reference_power += float(np.dot(reference, reference))
        self.observed_power += float(np.dot(observed, observed))
        difference = observed - reference
        self.noise_power += float(np.dot(difference, difference))

    def cosine(self) -> float:
        norms = math.sqrt(self.reference_power) * math.sqrt(self.observed_power)
        if norms == 0.0:
            return 1.0 if self.noise_power == 0.0 else 0.0
        return self.dot / norms

    def sqnr_db(self) -> float:
        return sqnr_db(self.reference_power, self.noise_power)

    def mismatched(self) -> float | None:
        if not self.integer_elements:
            return None
        return self.integer_mismatches / self.integer_elements


# The margin noise of a sample is measured against this many of its highest classes: the
# classes that can take the top place. Quantization error grows with a score's size, so the
# spread over every class (most of them far below the top, with small errors) understates it:
# on EfficientNet-Lite0 that estimate gave 0.979 where 0.963 of 512 images kept their class;
# the margin noise of the top five gives 0.969.
COMPETING_CLASSES = 5

# Margins, in spreads of their noise, beyond which a class cannot pass the top one.
NEGLIGIBLE = 8.5

# Rows of class scores worked on at once: a sequence of 512 steps over a 30000-word vocabulary
# would otherwise take gigabytes.
ROWS_AT_ONCE = 256


def expected_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """The top-1 agreement to expect from the candidate's noise, rows being decisions.

    For a sample with reference scores z, top class t and error e = candidate - z, the margin
    z_t - z_j moves by e_j - e_t. Its spread sigma is the root mean square of that change over
    the sample's COMPETING_CLASSES highest classes; class j then passes the top class with
    probability P(N(0, sigma^2) > z_t - z_j), the sample keeps its top class with the product
    of the complements, and the expected agreement is the mean over samples.
    """
    kept = [
        _kept_top(reference[start : start + ROWS_AT_ONCE], candidate[start : start + ROWS_AT_ONCE])
        for start in range(0, len(reference), ROWS_AT_ONCE)
    ]
    return float(np.mean(np.concatenate(kept)))


def _kept_top(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Each row's chance of keeping its top class (``expected_agreement``)."""
    reference = reference.astype(np.float64)
    error = candidate.astype(np.float64) - reference
    rows = np.arange(len(reference))
    top = reference.argmax(axis=1)
    rivals = _rivals(reference, top, COMPETING_CLASSES - 1)
    margin_noise = np.take_along_axis(error, rivals, axis=1) - error[rows, top][:, None]
    spread = np.sqrt(np.mean(margin_noise**2, axis=1, keepdims=True))
    margins = reference[rows, top][:, None] - reference
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(spread > 0, margins / spread, np.inf)
    # A class NEGLIGIBLE spreads below the top passes it with a chance under 1e-16: the
    # erfc is worked out only for the others, which keeps a 30000-word vocabulary cheap.
    passed = np.zeros_like(scaled)
    near = scaled < NEGLIGIBLE
    passed[near] = 0.5 * _erfc(scaled[near] / math.sqrt(2.0))
    passed[rows, top] = 0.0
    return np.exp(np.sum(np.log1p(-np.minimum(passed, 1.0 - 1e-12)), axis=1))


def _rivals(scores: np.ndarray, top: np.ndarray, count: int) -> np.ndarray:
    """The indices of each row's ``count`` highest scores after its ``top`` class, in no order."""
    others = scores.copy()
    others[np.arange(len(scores)), top] = -np.inf
    count = min(count, scores.shape[1] - 1)
    if count == scores.shape[1] - 1:
        return np.argsort(others, axis=1)[:, 1:]
    return np.argpartition(-others, count - 1, axis=1)[:, :count]


def _erfc(values: np.ndarray) -> np.ndarray:
    """The complementary error function, elementwise (math.erfc; numpy has none)."""
    return np.vectorize(math.erfc, otypes=[np.float64])(values)


def _holds_classes(array: np.ndarray) -> bool:
    return array.dtype.kind == "f" and array.ndim in (1, 2, 3) and array.shape[-1] >= 2


def _rows(scores: np.ndarray) -> np.ndarray:
    """Class scores as rows, one per decision: each sample's, or each step's of a sequence."""
    return scores.reshape(-1, scores.shape[-1])
