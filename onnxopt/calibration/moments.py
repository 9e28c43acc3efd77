"""The second moments ``H = X X^T`` of each layer's input columns, measured on calibration
samples: what GPTQ rounds against (quantization.gptq) and SparseGPT prunes against (pruning).

A layer reads its input as columns: a Gemm or MatMul its last axis, a convolution the patches
under its kernel, per group (``InputLayout``). ``collect_hessians`` measures ``H`` of layers on
a few samples; ``LayerBatches`` measures them a batch of layers at a time, as they are asked
for, so that the H of all layers is never held at once. ``weight_rows`` gives a weight as rows
over the same columns. A transformer's padded positions (``padding``) are left out: nothing
reads them.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.padding import padding_mask_input, token_rows
from onnxopt.progress import QUIET, Progress
from onnxopt.runtime import (
    Feed,
    ProbeSession,
    SerializedModel,
    concurrently,
    cores,
    groups_within,
    release_freed_memory,
    tensor_bytes,
)

# Output positions (pixels, tokens) that go into a layer's H, per column of H over all samples:
# GPTQ's own setting for language models is about 64 (128 samples of 2048 tokens, 4096 columns).
# More cost time and change little; a detector's 100,000 pixels per sample would cost minutes.
ROWS_PER_COLUMN = 128


# The layer inputs fetched from the model at once, and the columns built from them at once.
PROBE_BYTES = 2**25


CHUNK_BYTES = 2**24


# A layer whose samples give it fewer rows than this share of H's columns (a classifier's Gemm
# reads one vector a sample, a squeeze-excite layer one pixel) has no H: GPTQ fitted to so few
# rows only overfits them, and measuring and solving a 3136-column H would cost a second.
MIN_ROWS_PER_COLUMN = 0.25


# H (fit and held rows, float32) of the layers measured and solved together: each batch of
# layers costs runs of the samples (up to its last layer), and holds this much at most.
HESSIAN_BATCH_BYTES = 2**25


# H measured in all, layers in graph order; the layers past it round to nearest. A time bound
# as much as a memory one: accumulating a layer's H costs 2 * ROWS_PER_COLUMN * columns^3
# flops, about 5 s for a 1536-wide MatMul (ViT-S: 264 MB of H in all, 30 s more for all of it).
MAX_HESSIAN_BYTES = 2**27


# Input rows gathered, per H, before they are multiplied into it: up to a quarter of H's
# columns (so they hold a quarter of H's memory at most), or PENDING_BYTES. A layer that sees a
# row or a few a sample (after global pooling, the time steps of an unrolled RNN) would
# otherwise add a rank-one product to H a row at a time, each reading and writing all of H: the
# CRNN's LSTM weight, 4096 columns read by 20 steps, took 70 s of the 72 its moments cost.
PENDING_BYTES = 2**24


# Every this-many-th sample's rows are held back from GPTQ's fit, to choose the damping (or
# rounding to nearest) on rows it did not fit.
CHECK_EVERY = 4


@dataclasses.dataclass(frozen=True)
class InputLayout:
    """How a layer reads its input as columns, one matrix per group.

    Attributes:
        input: the name of the input tensor the weight multiplies.
        groups: groups of a grouped convolution (1 otherwise); each has its own H.
        kernel: a convolution's kernel shape; empty for Gemm and MatMul.
        strides, dilations: a convolution's.
        pads: a convolution's explicit pads (begins, then ends), or None for ``auto_pad`` SAME.
        same_upper: for ``auto_pad`` SAME, whether the odd pad goes at the end.
        transposed: whether the weight is stored (in, out), as MatMul and Gemm without transB.
    """

    input: str
    groups: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] | None = ()
    same_upper: bool = True
    transposed: bool = False

    def column_count(self, weight_shape: Sequence[int]) -> int:
        """Columns of each group's H: the input features one output reads."""
        if self.kernel:
            return int(weight_shape[1]) * math.prod(self.kernel)
        return int(weight_shape[0] if self.transposed else weight_shape[1])

    def columns(
        self, array: np.ndarray, positions: int, rng: np.random.Generator
    ) -> Iterator[np.ndarray]:
        """One sample's input as (positions, groups, columns per group) float32 chunks of at
        most CHUNK_BYTES, over at most ``positions`` output positions (chosen at random when
        there are more). A convolution's columns run tap by tap, the channels within each."""
        if not self.kernel:
            yield _subsample(array.reshape(-1, 1, array.shape[-1]), positions, rng)
            return
        spatial = array.shape[2:]
        begins, ends = self._pads_for(spatial)
        if all(size == 1 for size in self.kernel) and not any(begins) and not any(ends):
            # A pointwise convolution reads each (strided) pixel's channels: no patches to build.
            strided = array[
                (slice(None), slice(None), *(slice(None, None, s) for s in self.strides))
            ]
            flat = np.moveaxis(strided, 1, -1).reshape(
                -1, self.groups, array.shape[1] // self.groups
            )
            yield _subsample(flat, positions, rng)
            return
        padded = np.pad(array, [(0, 0), (0, 0), *zip(begins, ends, strict=True)])
        extents = [(k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations, strict=True)]
        out = [
            (size + begin + end - extent) // stride + 1
            for size, begin, end, extent, stride in zip(
                spatial, begins, ends, extents, self.strides, strict=True
            )
        ]
        total = array.shape[0] * math.prod(out)
        chosen = np.arange(total)
        if total > positions:
            chosen = np.sort(rng.choice(total, positions, replace=False))
        taps = np.meshgrid(*[np.arange(k) for k in self.kernel], indexing="ij")
        channels = array.shape[1]
        step = max(1, CHUNK_BYTES // (channels * math.prod(self.kernel) * 4))
        expand = (-1, *[1] * len(self.kernel))
        for start in range(0, len(chosen), step):
            index = np.unravel_index(chosen[start : start + step], (array.shape[0], *out))
            batch, origins = index[0], index[1:]
            coordinates = [
                origin.reshape(expand) * stride + tap * dilation
                for origin, tap, stride, dilation in zip(
                    origins, taps, self.strides, self.dilations, strict=True
                )
            ]
            # Advanced indices around a slice put the positions and taps first, the channels last.
            patches = padded[(batch.reshape(expand), slice(None), *coordinates)]
            patches = patches.reshape(len(batch), -1, self.groups, channels // self.groups)
            if self.groups > 1:
                patches = patches.transpose(0, 2, 1, 3)
            yield np.ascontiguousarray(patches, dtype=np.float32).reshape(
                len(batch), self.groups, -1
            )

    def _pads_for(self, spatial: tuple[int, ...]) -> tuple[list[int], list[int]]:
        rank = len(self.kernel)
        if self.pads is not None:
            return list(self.pads[:rank]), list(self.pads[rank:])
        begins, ends = [], []
        for size, kernel, stride, dilation in zip(
            spatial, self.kernel, self.strides, self.dilations, strict=True
        ):
            out = -(-size // stride)
            total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begins.append(small if self.same_upper else large)
            ends.append(large if self.same_upper else small)
        return begins, ends


@dataclasses.dataclass
class InputMoments:
    """``H = X X^T / n`` of a layer's input columns: (groups, columns, columns), float32.

    Attributes:
        fit: over the rows GPTQ fits the weights to.
        check: over held rows, to choose between fits; None when too few samples to hold any.
        diagonal: only the diagonal was kept, each column's input power: the layer saw fewer
            rows than MIN_ROWS_PER_COLUMN a column, too few to measure how the columns
            correlate (``collect_hessians(few_rows_diagonal=True)``).
    """

    fit: np.ndarray
    check: np.ndarray | None
    diagonal: bool = False


def input_layout(node: ir.Node) -> InputLayout | None:
    """How ``node`` reads its input, or None when it is not a layer with a constant weight
    read as columns (no constant weight, a weight of another rank, Gemm with transA)."""
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return None
    weight = node.inputs[1].const_value
    if weight is None:
        return None
    name = node.inputs[0].name
    if node.op_type in ("MatMul", "Gemm"):
        if len(weight.shape) != 2 or node.attributes.get_int("transA", 0):
            return None
        return InputLayout(name, transposed=not node.attributes.get_int("transB", 0))
    if node.op_type != "Conv" or len(weight.shape) < 3:
        return None
    rank = len(weight.shape) - 2
    kernel = tuple(int(size) for size in weight.shape[2:])
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        return None
    pads: tuple[int, ...] | None = tuple(node.attributes.get_ints("pads", [0] * 2 * rank))
    if auto_pad.startswith("SAME"):
        pads = None
    elif auto_pad == "VALID":
        pads = (0,) * 2 * rank
    return InputLayout(
        name,
        groups=node.attributes.get_int("group", 1),
        kernel=kernel,
        strides=tuple(node.attributes.get_ints("strides", [1] * rank)),
        dilations=tuple(node.attributes.get_ints("dilations", [1] * rank)),
        pads=pads,
        same_upper=auto_pad != "SAME_LOWER",
    )


def _subsample(flat: np.ndarray, positions: int, rng: np.random.Generator) -> np.ndarray:
    if len(flat) > positions:
        flat = flat[np.sort(rng.choice(len(flat), positions, replace=False))]
    return np.asarray(flat, dtype=np.float32)


def _hessian_bytes(node: ir.Node, layout: InputLayout) -> int:
    columns = layout.column_count(node.inputs[1].const_value.shape)
    return 2 * layout.groups * columns * columns * 4


# What collect_hessians measures: how a layer reads its input, and the key of the weight whose
# readers' rows are pooled (``shared``), None for a layer's own.
Measured = tuple[InputLayout, str | None]


def collect_hessians(
    model: ir.Model,
    nodes: Iterable[ir.Node],
    feeds: Sequence[Feed],
    *,
    max_bytes: int = MAX_HESSIAN_BYTES,
    progress: Progress = QUIET,
    source: SerializedModel | None = None,
    shared: Mapping[str, str] | None = None,
    few_rows_diagonal: bool = False,
) -> dict[str, InputMoments]:
    """The input moments of each node over ``feeds``, by node name; every CHECK_EVERY-th
    sample goes to ``check``. Nodes that share an input and a layout (the query, key and value
    of attention) share them. Nodes that ``shared`` maps to one key (the weight they all read:
    the time steps of an unrolled RNN, the branches of a siamese network) share one H over the
    inputs of all of them, held once: that weight is fitted to all its readers' outputs at
    once, their squared errors added up. Nodes past ``max_bytes`` of them get none, nor nodes
    that would see fewer rows than MIN_ROWS_PER_COLUMN a column (the rows of all the inputs a
    shared H pools), unless ``few_rows_diagonal``: those then get the diagonal of their H
    alone (``InputMoments.diagonal``). ``source`` is ``model`` written already, for callers
    that measure it more than once."""
    shared = shared or {}
    # What is measured: a layout, and the shared weight its rows are pooled for, if any.
    entries: dict[Measured, list[str]] = {}
    # The entry whose H each entry's rows are added to: its own, or the first of its weight's.
    pooled_into: dict[Measured, Measured] = {}
    first_reader: dict[str, Measured] = {}
    columns: dict[Measured, int] = {}
    budget = max_bytes
    for node in nodes:
        layout = input_layout(node)
        if layout is None:
            continue
        key = shared.get(node.name)
        entry = (layout, key)
        if entry not in entries:
            if key is not None and key in first_reader:
                pooled_into[entry] = first_reader[key]
            else:
                size = _hessian_bytes(node, layout)
                if size > budget:
                    continue
                budget -= size
                pooled_into[entry] = entry
                if key is not None:
                    first_reader[key] = entry
            entries[entry] = []
            columns[entry] = layout.column_count(node.inputs[1].const_value.shape)
        entries[entry].append(node.name)
    if not entries or not feeds:
        return {}
    inputs_pooled = collections.Counter(pooled_into.values())
    sums = _MomentSums()
    rng = np.random.default_rng(0)
    too_few: set[Measured] = set()
    diagonal: set[Measured] = set()
    judged: set[Measured] = set()
    mask = padding_mask_input(model)
    written = contextlib.nullcontext(source) if source is not None else SerializedModel(model)
    with written as source:
        wanted = list(dict.fromkeys(layout.input for layout, _ in entries))
        groups = _input_groups(source, wanted, feeds[0])
        steps = len(groups) * len(feeds)
        with progress.task("measuring layer inputs", total=steps) as advance:
            for names in groups:
                probe = ProbeSession(source, names, threads=1, prune=True)
                readers = [entry for entry in entries if entry[0].input in names]
                for start in range(0, len(feeds), cores()):
                    # Samples run one per core; their columns are added in order.
                    outputs = concurrently(probe.run, feeds[start : start + cores()])
                    for index, arrays in enumerate(outputs, start):
                        held = len(feeds) >= CHECK_EVERY and index % CHECK_EVERY == CHECK_EVERY - 1
                        for entry in readers:
                            target = pooled_into[entry]
                            if target in too_few:
                                continue
                            layout = entry[0]
                            positions = -(-ROWS_PER_COLUMN * columns[entry] // len(feeds))
                            array = arrays.get(layout.input)
                            if array is not None and not layout.kernel:
                                array = token_rows(array, feeds[index], mask)
                            key = (target, held)
                            sums.add(layout, key, array, positions, rng)
                            if index == 0 and target not in judged:
                                judged.add(target)
                                expected_rows = (
                                    sums.counts[key] * len(feeds) * inputs_pooled[target]
                                )
                                if expected_rows < MIN_ROWS_PER_COLUMN * columns[entry]:
                                    if few_rows_diagonal:
                                        diagonal.add(target)
                                    else:
                                        too_few.add(target)
                                        sums.drop(key)
                        advance(1)
                del probe
                release_freed_memory()
    measured = {}
    for target in inputs_pooled:
        fit, check = (sums.mean((target, held)) for held in (False, True))
        if fit is None:
            continue
        if target in diagonal:
            fit, check = (_diagonal_only(one) for one in (fit, check))
        measured[target] = InputMoments(fit, check, target in diagonal)
    return {
        name: measured[pooled_into[entry]]
        for entry, names in entries.items()
        if pooled_into[entry] in measured
        for name in names
    }


def _diagonal_only(hessians: np.ndarray | None) -> np.ndarray | None:
    """(groups, columns, columns) with everything off the diagonal zeroed."""
    if hessians is None:
        return None
    columns = hessians.shape[-1]
    return hessians * np.eye(columns, dtype=hessians.dtype)[None]


class _MomentSums:
    """Running sums of ``X X^T`` and their row counts, by key (what is measured, and whether
    the rows are held for the check); rows are gathered (PENDING_BYTES) before they are
    multiplied in."""

    def __init__(self) -> None:
        self.sums: dict[tuple[Measured, bool], np.ndarray] = {}
        self.counts: dict[tuple[Measured, bool], int] = collections.defaultdict(int)
        self.pending: dict[tuple[Measured, bool], list[np.ndarray]] = collections.defaultdict(list)
        self.pending_rows: dict[tuple[Measured, bool], int] = collections.defaultdict(int)

    def add(
        self,
        layout: InputLayout,
        key: tuple[Measured, bool],
        array: np.ndarray | None,
        positions: int,
        rng: np.random.Generator,
    ) -> None:
        """Add one sample's rows (at most ``positions`` of them) to the sum of ``key``; inputs
        of an unexpected type, rank or width (a layer whose H cannot be measured keeps rounding
        to nearest) are skipped."""
        expected_rank = len(layout.kernel) + 2 if layout.kernel else None
        if array is None or array.dtype.kind != "f" or array.ndim == 0:
            return
        if expected_rank is not None and array.ndim != expected_rank:
            return
        for part in layout.columns(np.asarray(array), positions, rng):
            pending = self.pending[key]
            width = pending[0].shape[1:] if pending else None
            if width is None and key in self.sums:
                width = self.sums[key].shape[:2]
            if width is not None and part.shape[1:] != width:
                return
            pending.append(part)
            self.pending_rows[key] += part.shape[0]
            self.counts[key] += part.shape[0]
            rows, columns = self.pending_rows[key], part.shape[2]
            if 4 * rows >= columns or rows * part.shape[1] * columns * 4 >= PENDING_BYTES:
                self._flush(key)

    def _flush(self, key: tuple[Measured, bool]) -> None:
        parts = self.pending.pop(key, None)
        self.pending_rows.pop(key, None)
        if not parts:
            return
        rows = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if rows.shape[1] == 1:
            flat = rows[:, 0, :]
            product = (flat.T @ flat)[None]  # numpy computes X^T X as one symmetric update
        else:
            product = np.matmul(rows.transpose(1, 2, 0), rows.transpose(1, 0, 2))
        if key in self.sums:
            self.sums[key] += product
        else:
            self.sums[key] = product

    def drop(self, key: tuple[Measured, bool]) -> None:
        self.sums.pop(key, None)
        self.pending.pop(key, None)
        self.pending_rows.pop(key, None)

    def mean(self, key: tuple[Measured, bool]) -> np.ndarray | None:
        """The sum over its rows, taken out; None without rows."""
        self._flush(key)
        if key not in self.sums or not self.counts[key]:
            return None
        total = self.sums.pop(key)
        total /= self.counts[key]
        return total


class LayerBatches:
    """Measures the input moments of a model's layers a batch at a time, as they are asked
    for: the quantizer asks in graph order, so H of at most one batch (HESSIAN_BATCH_BYTES)
    is held at once (EfficientNet-Lite0's layers take 96 MB in all). Close it to delete the
    written model.

    Args:
        model: the float model; not changed.
        feeds: the samples to measure on.
        batch_bytes: H held at once, at most (a larger layer is a batch alone).
        max_bytes: H measured in all, layers in graph order; the others are not measured.
        progress: shows each batch's runs.
    """

    def __init__(
        self,
        model: ir.Model,
        feeds: Sequence[Feed],
        *,
        batch_bytes: int = HESSIAN_BATCH_BYTES,
        max_bytes: int = MAX_HESSIAN_BYTES,
        progress: Progress = QUIET,
    ):
        self.model = model
        self.feeds = list(feeds)
        self.batch_bytes = batch_bytes
        self.max_bytes = max_bytes
        self.progress = progress
        # Each layer with the bytes of its H; layers that share a layout share their H.
        self.layers: list[tuple[ir.Node, int]] = []
        seen: set[InputLayout] = set()
        budget = max_bytes
        for node in model.graph:
            layout = input_layout(node)
            if layout is None:
                continue
            size = 0 if layout in seen else _hessian_bytes(node, layout)
            if size > budget:
                continue
            budget -= size
            seen.add(layout)
            self.layers.append((node, size))
        self.positions = {node.name: index for index, (node, _) in enumerate(self.layers)}
        self.measured: set[str] = set()
        self.batches = 0
        self._source: SerializedModel | None = None

    def moments_for(self, name: str) -> dict[str, InputMoments]:
        """The moments of the batch of layers not yet measured that starts with layer
        ``name``, by node name; empty when that layer was measured already or cannot be."""
        index = self.positions.get(name)
        if index is None or name in self.measured or not self.feeds:
            return {}
        batch: list[ir.Node] = []
        total = 0
        for node, size in self.layers[index:]:
            if node.name in self.measured:
                continue
            if batch and total + size > self.batch_bytes:
                break
            batch.append(node)
            total += size
        self.measured.update(node.name for node in batch)
        if self._source is None:
            self._source = SerializedModel(self.model)
        self.batches += 1
        return collect_hessians(
            self.model,
            batch,
            self.feeds,
            max_bytes=self.max_bytes,
            progress=self.progress,
            source=self._source,
        )

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None


def _input_groups(source: SerializedModel, names: Sequence[str], feed: Feed) -> list[list[str]]:
    """The input names in groups of at most PROBE_BYTES on ``feed``."""
    unique = list(dict.fromkeys(names))
    sizes = tensor_bytes(source, unique, feed)
    return groups_within(((name, sizes.get(name, 0)) for name in unique), PROBE_BYTES)


def weight_rows(weight: np.ndarray, layout: InputLayout, groups: int):
    """The weight as (groups, rows per group, columns) in the order ``InputLayout.columns``
    gives the inputs, and how to put such rows (changed weights, integers) back in the
    weight's shape."""
    shape = weight.shape
    if layout.transposed:
        rows = weight.T.reshape(1, shape[1], shape[0])
        return rows, lambda rows: np.ascontiguousarray(rows.reshape(shape[1], shape[0]).T)
    if not layout.kernel:
        return weight.reshape(1, shape[0], shape[1]), lambda rows: rows.reshape(shape)
    # (out, channels, *kernel) -> (groups, out per group, taps x channels), tap by tap.
    by_tap = weight.reshape(shape[0], shape[1], -1).transpose(0, 2, 1)
    rows = by_tap.reshape(groups, shape[0] // groups, -1)

    def restore(rows: np.ndarray) -> np.ndarray:
        by_channel = rows.reshape(shape[0], -1, shape[1]).transpose(0, 2, 1)
        return np.ascontiguousarray(by_channel).reshape(shape)

    return rows, restore
