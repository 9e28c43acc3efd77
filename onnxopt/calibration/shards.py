"""Calibration statistics collected by several processes, merged into one pass's.

The samples are grouped exactly as one process groups them (the first sample alone, then
runs of the batch size it chose), the groups are dealt out in contiguous parts, each part's
statistics are collected by a worker with a session of its own, and the parts merge exactly
(``collectors``): the statistics equal one process's, bit for bit.

Workers are local processes (``workers``), or Ray tasks on a cluster (``ray_address``;
the optional ``ray`` extra). Samples in .npz files are read by each worker from the files
(shared storage on a cluster); samples only this process can read (a list of arrays, a
generator, an onnxruntime reader) are sent, ``SEND_GROUPS`` groups at a time, so no worker
and no message holds more than that.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import multiprocessing
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence

import onnx
import onnx_ir as ir

from onnxopt.calibration.collect import collect_first, collect_groups, limited
from onnxopt.calibration.collectors import TensorStatistics
from onnxopt.data import DataSource
from onnxopt.errors import InputError
from onnxopt.runtime import Feed

logger = logging.getLogger(__name__)

# Groups of samples sent to a worker in one message when it cannot read the data itself.
SEND_GROUPS = 8
MODEL_FILE = "model.onnx"


def collect_sharded(
    model: ir.Model,
    tensor_names: Sequence[str] | None,
    data: DataSource,
    *,
    workers: int,
    batch_size: int = 8,
    max_samples: int | None = None,
    ray_address: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, TensorStatistics], int]:
    """The statistics ``collect_statistics`` would collect, by ``workers`` processes (or
    Ray tasks at ``ray_address``), and the samples they hold."""
    count = data.count if max_samples is None else min(data.count or max_samples, max_samples)
    samples = iter(data)
    first = next(samples, None)
    if first is None or count == 1:
        return ({}, 0) if first is None else (_first_only(model, tensor_names, first), 1)
    statistics, batch = collect_first(model, tensor_names, first, batch_size)
    _advance(progress, 1)
    with tempfile.TemporaryDirectory(
        prefix="onnxopt-shards-", ignore_cleanup_errors=True
    ) as folder:
        path = os.path.join(folder, MODEL_FILE)
        ir.save(model, path, external_data=f"{MODEL_FILE}.data")
        backend = _RayBackend(ray_address, path) if ray_address else _ProcessBackend(workers, path)
        with backend:
            if data.in_files and count is not None:
                parts: Iterator[DataSource | list[Feed]] = (
                    data.part(start, stop) for start, stop in _parts(count, batch, backend.workers)
                )
            else:
                remaining = limited(samples, None if count is None else count - 1)
                parts = _chunks(remaining, batch * SEND_GROUPS)
            seen = 1
            for part, part_samples in backend.run(parts, tensor_names, batch):
                _merge(statistics, part)
                seen += part_samples
                _advance(progress, part_samples)
    return statistics, seen


def _first_only(
    model: ir.Model, tensor_names: Sequence[str] | None, first: Feed
) -> dict[str, TensorStatistics]:
    return collect_first(model, tensor_names, first, 1)[0]


def _parts(count: int, batch: int, workers: int) -> list[tuple[int, int]]:
    """Sample ranges after the first, each a whole number of groups of ``batch`` but the
    last, about the same number of groups each."""
    groups = math.ceil((count - 1) / batch)
    per_worker = math.ceil(groups / max(1, workers))
    parts = []
    for first_group in range(0, groups, per_worker):
        start = 1 + first_group * batch
        stop = min(count, 1 + (first_group + per_worker) * batch)
        parts.append((start, stop))
    return parts


def _chunks(samples: Iterator[Feed], size: int) -> Iterator[list[Feed]]:
    chunk: list[Feed] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _merge(statistics: dict[str, TensorStatistics], part: dict[str, TensorStatistics]) -> None:
    for name, tensor in part.items():
        if name in statistics:
            statistics[name].merge(tensor)
        else:
            statistics[name] = tensor


def _advance(progress: Callable[[int], None] | None, samples: int) -> None:
    if progress is not None:
        progress(samples)


def collect_part(
    model: str | bytes,
    tensor_names: Sequence[str] | None,
    samples: DataSource | list[Feed],
    batch: int,
) -> tuple[dict[str, TensorStatistics], int]:
    """A worker's part: the statistics of ``samples`` in groups of ``batch``, and their count.
    ``model``: a path this worker can read, or the serialized model."""
    model = (
        ir.load(model) if isinstance(model, str) else ir.from_proto(onnx.load_from_string(model))
    )
    counted = 0

    def count(samples_folded: int) -> None:
        nonlocal counted
        counted += samples_folded

    statistics = collect_groups(model, tensor_names, samples, batch, count)
    return statistics, counted


class _ProcessBackend:
    """Local worker processes, started fresh (spawn: onnxruntime's threads do not survive a
    fork) and stopped when the collection ends; they read the model from ``model_path``."""

    def __init__(self, workers: int, model_path: str):
        self.workers = workers
        self.model_path = model_path
        self.pool = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn")
        )

    def __enter__(self) -> _ProcessBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.pool.shutdown(cancel_futures=True)

    def run(
        self, parts: Iterator, tensor_names: Sequence[str] | None, batch: int
    ) -> Iterator[tuple[dict[str, TensorStatistics], int]]:
        """Each part's result, as they finish; at most two parts a worker are in flight, so
        samples sent to workers wait in memory only that long."""
        pending: set[concurrent.futures.Future] = set()
        for part in parts:
            pending.add(self.pool.submit(collect_part, self.model_path, tensor_names, part, batch))
            if len(pending) >= 2 * self.workers:
                done, pending = concurrent.futures.wait(
                    pending, return_when=concurrent.futures.FIRST_COMPLETED
                )
                yield from (job.result() for job in done)
        for job in concurrent.futures.as_completed(pending):
            yield job.result()


class _RayBackend:
    """Ray tasks on the cluster at ``address`` (``auto``: the cluster this machine belongs
    to; ``local``: a new one on this machine). The model travels through Ray's object
    store, so workers on other machines need no shared storage for it."""

    def __init__(self, address: str, model_path: str):
        try:
            import ray
        except ImportError:
            raise InputError(
                "calibrate.ray_address needs Ray, which is not installed",
                fix="pip install 'onnxopt[ray]', or calibrate with calibrate.workers instead",
            ) from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(
                address=None if address == "local" else address,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        # The weights travel inside the message: a worker elsewhere cannot read this
        # machine's files (and protobuf holds up to 2 GB).
        self.model = ray.put(onnx.load(model_path).SerializeToString())
        self.task = ray.remote(collect_part)

    def __enter__(self) -> _RayBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.started:
            self.ray.shutdown()

    def run(
        self, parts: Iterator, tensor_names: Sequence[str] | None, batch: int
    ) -> Iterator[tuple[dict[str, TensorStatistics], int]]:
        """Each part's result, as they finish, with at most two parts a worker in flight."""
        pending: list = []
        for part in parts:
            pending.append(self.task.remote(self.model, tensor_names, part, batch))
            if len(pending) >= 2 * self.workers:
                done, pending = self.ray.wait(pending, num_returns=1)
                yield from self.ray.get(done)
        yield from self.ray.get(pending)
