"""Run a model over calibration data and fold its activations into per-tensor statistics.

The tensors become extra outputs of a copy of the model, and onnxruntime runs the copy over the
data a batch at a time. Each batch is folded into the statistics (while the next one runs, when
batches are small) and dropped, so memory holds one or two batches of activations and the
fixed-size statistics, however many samples there are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxopt import runtime
from onnxopt.calibration.collectors import TensorStatistics
from onnxopt.runtime import Feed, ProbeSession
from onnxopt.shapes import infer_shapes, value_bytes

logger = logging.getLogger(__name__)

# One onnxruntime run: its feed, the fetched arrays by name, and the samples in the feed.
_Run = tuple[Feed, dict[str, np.ndarray], int]

# Batches up to this many bytes of activations are folded while the next one runs, at the cost
# of one more batch in memory (PP-LCNet: 2.9 -> 2.1 s; MiniLM: 4.6 -> 2.9 s for 50 MB).
OVERLAP_MAX_BYTES = 2**26

# Batches hold at most this many bytes of activations (if a sample alone does not hold more);
# larger batches run no faster.
MAX_BATCH_BYTES = 2**25

# Activation types onnxruntime can hand back as numpy arrays (it has no numpy type for bfloat16).
COLLECTED_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE})


def collect_statistics(
    model: ir.Model,
    tensor_names: Sequence[str] | None,
    data: Iterable[Feed],
    *,
    batch_size: int = 8,
    max_samples: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, TensorStatistics]:
    """Statistics of the named tensors (default: every float activation) over the data.

    ``model`` is left untouched; a copy of it gets the extra outputs, and shape inference if some
    activations have no type. When every model input has a free first dimension and the samples
    have a first dimension of 1, up to ``batch_size`` consecutive samples of equal shapes (fewer
    if their activations would pass MAX_BATCH_BYTES) run as one batch; a first batch that fails,
    or whose outputs differ from those of its first and last samples run alone, turns batching
    off. Memory holds the activations of a run, and of the next while one up to
    OVERLAP_MAX_BYTES is folded, and the statistics, however many samples there are.

    Args:
        model: the model whose activations to collect.
        tensor_names: graph inputs and node outputs to collect; None for every float one.
        data: feed dicts, one per sample, e.g. a ``DataSource``.
        batch_size: samples per onnxruntime run when the model can take batches.
        max_samples: stop after this many samples; None for all.
        progress: called with the number of samples each run folded in.

    Returns:
        Statistics by tensor name, for the tensors onnxruntime returned as float arrays.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be 1 or more, got {batch_size}")
    feeds = limited(data, max_samples)
    first = next(feeds, None)
    collection = _Collection(model, tensor_names, progress)
    # The first sample runs alone, and shows how much memory a sample's activations take.
    sample_bytes = 0 if first is None else collection.collector.collect([first])
    batch = collection.batch_for(batch_size, sample_bytes)
    collection.collect_all(_groups(feeds, batch), sample_bytes * batch)
    return collection.finish()


def collect_first(
    model: ir.Model, tensor_names: Sequence[str] | None, first: Feed, batch_size: int
) -> tuple[dict[str, TensorStatistics], int]:
    """The statistics of one sample run alone, and the batch size ``collect_statistics``
    would run the samples after it in: how a sharded collection groups its samples as one
    process does (``collect_groups`` then runs the rest, a part at a time)."""
    collection = _Collection(model, tensor_names, None)
    sample_bytes = collection.collector.collect([first])
    return collection.finish(), collection.batch_for(batch_size, sample_bytes)


def collect_groups(
    model: ir.Model,
    tensor_names: Sequence[str] | None,
    data: Iterable[Feed],
    batch: int,
    progress: Callable[[int], None] | None = None,
) -> dict[str, TensorStatistics]:
    """Statistics over ``data`` run in consecutive groups of ``batch`` samples (the batch
    ``collect_first`` chose), with no sample run alone first."""
    collection = _Collection(model, tensor_names, progress)
    collection.collect_all(_groups(iter(data), batch), None)
    return collection.finish()


class _Collection:
    """A copy of the model with the tensors as outputs, its session and the statistics."""

    def __init__(
        self,
        model: ir.Model,
        tensor_names: Sequence[str] | None,
        progress: Callable[[int], None] | None,
    ):
        self.model = model
        copy = model.clone()
        if any(value.dtype is None for value in _activations(copy.graph)):
            infer_shapes(copy, data_prop=False)
        values = _collected_values(copy, tensor_names)
        # Overlapping runs leave onnxruntime one core fewer, as one folds meanwhile.
        estimate = _sample_bytes(values)
        self.overlap = estimate is not None and estimate <= OVERLAP_MAX_BYTES
        probe = ProbeSession(
            copy,
            [value.name for value in values],
            copy=False,
            threads=max(1, runtime.cores() - 1) if self.overlap else None,
        )
        runner = _Runner(probe.session, probe.output_names, probe.fetched)
        self.collector = _Collector(runner, probe.fed, progress, _channel_axes_read(copy.graph))

    def batch_for(self, batch_size: int, sample_bytes: int) -> int:
        """The samples per run: ``batch_size`` where the model takes batches, fewer when a
        sample's activations are large."""
        if batch_size > 1 and _takes_batches(self.model):
            return min(batch_size, max(1, MAX_BATCH_BYTES // max(sample_bytes, 1)))
        return 1

    def collect_all(self, groups: Iterable[list[Feed]], batch_bytes: int | None) -> None:
        """Run every group; overlapped when a batch's activations (``batch_bytes``, None:
        unknown, estimated from the graph) are small."""
        overlap = self.overlap and (batch_bytes is None or batch_bytes <= OVERLAP_MAX_BYTES)
        self.collector.collect_all(groups, overlap)

    def finish(self) -> dict[str, TensorStatistics]:
        logger.info(
            "collected statistics of %d tensors over %d samples",
            len(self.collector.statistics),
            self.collector.samples,
        )
        return self.collector.statistics


class _Collector:
    """Folds the activations of each run into per-tensor statistics, and counts samples."""

    def __init__(
        self,
        runner: _Runner,
        fed: list[str],
        progress: Callable[[int], None] | None,
        channel_axes: Mapping[str, set[str]],
    ):
        self.runner = runner
        self.fed = fed
        self.progress = progress
        self.channel_axes = channel_axes
        self.statistics: dict[str, TensorStatistics] = {}
        self.samples = 0

    def collect(self, group: list[Feed]) -> int:
        """Run and fold a group of samples; the bytes of one sample's folded activations."""
        return self._fold_runs(self.runner.run(group))

    def collect_all(self, groups: Iterable[list[Feed]], overlap: bool) -> None:
        """Run and fold every group; with ``overlap``, fold each while onnxruntime runs the
        next (folding costs about what running does), for the memory of one more batch."""
        if not overlap:
            for group in groups:
                self.collect(group)
            return
        with ThreadPoolExecutor(1) as runner_thread:
            ahead: Future[list[_Run]] | None = None
            for group in groups:
                running = runner_thread.submit(lambda group=group: list(self.runner.run(group)))
                if ahead is not None:
                    self._fold_runs(ahead.result())
                ahead = running
            if ahead is not None:
                self._fold_runs(ahead.result())

    def _fold_runs(self, runs: Iterable[_Run]) -> int:
        """Fold runs in; the bytes of one sample's folded activations."""
        folded = 0
        for feed, outputs, count in runs:
            arrays = {name: feed[name] for name in self.fed}
            arrays.update(outputs)
            _fold(self.statistics, arrays, count, self.channel_axes)
            folded = sum(array.nbytes for array in arrays.values()) // count
            self.samples += count
            if self.progress is not None:
                self.progress(count)
        runtime.release_freed_memory()
        return folded


class _Runner:
    """Runs groups of samples, as one batch once a first batch has shown that batching works."""

    def __init__(self, session: ort.InferenceSession, output_names: list[str], fetched: list[str]):
        self.session = session
        self.output_names = output_names
        self.fetched = fetched
        self.fetch = list(dict.fromkeys([*output_names, *fetched]))
        self.batching: bool | None = None

    def run(self, group: list[Feed]) -> Iterator[_Run]:
        """Yield (feed, fetched arrays, samples in the feed) for each run the group needed."""
        alone: dict[int, dict[str, np.ndarray]] = {}
        if len(group) > 1 and self.batching is not False:
            feed = {name: np.concatenate([sample[name] for sample in group]) for name in group[0]}
            if self.batching:
                yield feed, self._fetched(self._run(feed)), len(group)
                return
            alone = {0: self._run(group[0]), len(group) - 1: self._run(group[-1])}
            batched = self._run_batch(feed, alone[0], alone[len(group) - 1])
            self.batching = batched is not None
            if batched is not None:
                yield feed, self._fetched(batched), len(group)
                return
        for index, sample in enumerate(group):
            arrays = alone[index] if index in alone else self._run(sample)
            yield sample, self._fetched(arrays), 1

    def _run(self, feed: Feed) -> dict[str, np.ndarray]:
        return dict(zip(self.fetch, self.session.run(self.fetch, feed), strict=True))

    def _fetched(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: arrays[name] for name in self.fetched}

    def _run_batch(
        self, feed: Feed, first: dict[str, np.ndarray], last: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray] | None:
        """The batch's outputs if the model's outputs for it are those of its first and last
        samples run alone, stacked; None, logged, if the model fails on batches or mixes samples.
        """
        try:
            batched = self._run(feed)
        except Exception as error:  # onnxruntime raises several unrelated types
            logger.info("the model fails on batches (%s); running one sample at a time", error)
            return None
        count = len(next(iter(feed.values())))
        for name in self.output_names:
            if not _stacks(batched[name], first[name], last[name], count):
                logger.info(
                    "output '%s' of a batch differs from that of its samples; "
                    "running one sample at a time",
                    name,
                )
                return None
        return batched


def _stacks(batch_output: np.ndarray, first: np.ndarray, last: np.ndarray, count: int) -> bool:
    """Whether a batch's output has the shape of ``count`` stacked outputs, starting with
    ``first`` and ending with ``last`` (within float tolerance)."""
    if first.ndim == 0 or batch_output.shape != (first.shape[0] * count, *first.shape[1:]):
        return False
    rows = first.shape[0]
    return _close(batch_output[:rows], first) and _close(batch_output[-rows:], last)


def _close(actual: np.ndarray, expected: np.ndarray) -> bool:
    if actual.shape != expected.shape:
        return False
    if expected.dtype.kind != "f":
        return bool(np.array_equal(actual, expected))
    scale = float(np.max(np.abs(expected), initial=0.0, where=np.isfinite(expected)))
    return bool(np.allclose(actual, expected, rtol=1e-3, atol=1e-4 * scale, equal_nan=True))


def _fold(
    statistics: dict[str, TensorStatistics],
    arrays: dict[str, np.ndarray],
    count: int,
    channel_axes: Mapping[str, set[str]],
) -> None:
    folded = []
    for name, array in arrays.items():
        if array.dtype.kind != "f":
            logger.debug("skipping '%s': onnxruntime returned %s", name, array.dtype)
            continue
        folded.append((statistics.setdefault(name, TensorStatistics()), name, array))

    def update(item: tuple[TensorStatistics, str, np.ndarray]) -> None:
        tensor, name, array = item
        per_sample = count > 1 and array.ndim > 0 and array.shape[0] == count
        tensor.update(array, per_sample, channel_axes.get(name, ()))

    runtime.concurrently(update, folded)


def _sample_bytes(values: Sequence[ir.Value]) -> int | None:
    """The bytes of one sample's values, free dimensions taken as 1; None when a shape is
    unknown."""
    sizes = [value_bytes(value, free=1) for value in values]
    return None if None in sizes else sum(sizes)


def _channel_axes_read(graph: ir.Graph) -> dict[str, set[str]]:
    """The activations that feed Conv, Gemm or MatMul, with the axes (keys of CHANNEL_AXES) bias
    correction reads their per-channel means along: channels (axis 1) for a Conv, features (the
    last axis) for the others. No other means are ever used, and summing channels costs as much
    as the histogram."""
    axes: dict[str, set[str]] = {}
    for node in graph:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or not node.inputs:
            continue
        if node.inputs[0] is not None:
            axis = "axis1" if node.op_type == "Conv" else "last_axis"
            axes.setdefault(node.inputs[0].name, set()).add(axis)
    return axes


def _activations(graph: ir.Graph) -> list[ir.Value]:
    """The graph inputs and the outputs of its nodes, but not initializers or Constant outputs."""
    values = [
        value
        for value in graph.inputs
        if value.name not in graph.initializers and value.const_value is None
    ]
    for node in graph:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            values.extend(value for value in node.outputs if value.name)
    return values


def _collected_values(model: ir.Model, tensor_names: Sequence[str] | None) -> list[ir.Value]:
    """The activations to collect, each once; those of a type numpy cannot hold are left out."""
    activations = _activations(model.graph)
    if tensor_names is None:
        untyped = sum(value.dtype is None for value in activations)
        if untyped:
            logger.warning(
                "not collecting %d values whose type shape inference did not find", untyped
            )
        return [value for value in activations if value.dtype in COLLECTED_TYPES]
    by_name = {value.name: value for value in activations}
    missing = [name for name in tensor_names if name not in by_name]
    if missing:
        raise ValueError(
            f"no graph input or node output named {', '.join(repr(name) for name in missing)}"
        )
    values = []
    for name in dict.fromkeys(tensor_names):
        value = by_name[name]
        if value.dtype in COLLECTED_TYPES:
            values.append(value)
        else:
            logger.warning("not collecting '%s': its type is %s, not float", name, value.dtype)
    return values


def _takes_batches(model: ir.Model) -> bool:
    """Whether every input has a free first dimension, so samples can stack along it."""
    specs = runtime.input_specs(model)
    return bool(specs) and all(
        spec.shape is not None and spec.shape and not isinstance(spec.shape[0], int)
        for spec in specs
    )


def limited(data: Iterable[Feed], max_samples: int | None) -> Iterator[Feed]:
    """The first ``max_samples`` feeds, pulling no more than that from the source."""
    if max_samples is None:
        yield from data
        return
    if max_samples < 1:
        return
    for index, feed in enumerate(data, start=1):
        yield feed
        if index == max_samples:
            return


def _groups(feeds: Iterable[Feed], batch_size: int) -> Iterator[list[Feed]]:
    """Consecutive samples that can stack into one batch: first dimension 1, equal shapes."""
    group: list[Feed] = []
    for feed in feeds:
        shapes = _shapes(feed)
        stackable = batch_size > 1 and all(shape and shape[0] == 1 for shape in shapes.values())
        if group and (not stackable or _shapes(group[0]) != shapes):
            yield group
            group = []
        group.append(feed)
        if not stackable or len(group) == batch_size:
            yield group
            group = []
    if group:
        yield group


def _shapes(feed: Feed) -> dict[str, tuple[int, ...]]:
    return {name: array.shape for name, array in feed.items()}
