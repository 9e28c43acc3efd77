"""Data sources for calibration and validation: .npz files, folders of them, and Python feeds.

Every source becomes a ``DataSource`` that yields one checked feed dict per sample. Data is never
cast: a float64 array for a float32 input is an error with a fix, because a silent cast hides the
preprocessing mismatch that usually causes it.
"""

from __future__ import annotations

import logging
import math
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import onnx_ir as ir

from onnxopt.errors import InputError
from onnxopt.runtime import Feed, InputSpec, input_specs

logger = logging.getLogger(__name__)


ACCEPTED_SOURCES = (
    "accepted: an .npz file, a folder of .npz files, an iterable of feed dicts, "
    "or an onnxruntime CalibrationDataReader"
)

_END = object()

# An array of this name beside the inputs holds each sample's labels (class indices), for the
# importances that compute a task loss; feeds never carry it.
LABELS = "labels"


class DataReader(Protocol):
    """What onnxruntime's ``CalibrationDataReader`` offers; ``rewind()`` is optional."""

    def get_next(self) -> Mapping[str, np.ndarray] | None: ...


class _Samples(Protocol):
    """Raw samples, each with a label that says where it came from, for error messages."""

    count: int | None

    def read(self, start: int, stop: int | None) -> Iterator[tuple[str, Any]]: ...


class DataSource:
    """Checked samples for one model, read lazily: one .npz file or one Python sample at a time.

    Iterating yields one feed dict per sample and checks each against the model's inputs. Files,
    folders and sequences can be iterated any number of times. Generators and readers are pulled
    as they are iterated; iterating one again calls the reader's ``rewind()``, or, without one,
    raises ``InputError``. Samples already pulled by ``take`` and ``split`` are kept, so those
    never use up a one-shot source. Made by ``open_data``.

    Attributes:
        specs: the model inputs every sample is checked against.
    """

    def __init__(
        self,
        specs: Sequence[InputSpec],
        samples: _Samples,
        label: str,
        *,
        start: int = 0,
        stop: int | None = None,
    ):
        self.specs = list(specs)
        self._samples = samples
        self._label = label
        self._start = start
        self._stop = samples.count if stop is None else stop

    @property
    def count(self) -> int | None:
        """Number of samples; None for a generator or reader, whose length shows only at its end."""
        return None if self._stop is None else self._stop - self._start

    @property
    def description(self) -> str:
        """What the data is, for reports, e.g. 'calib.npz (512 samples)'."""
        total = self._samples.count
        if self._stop is None:
            window = f"from sample {self._start}, " if self._start else ""
            return f"{self._label} ({window}count unknown)"
        if self._start == 0 and self._stop == total:
            return f"{self._label} ({_plural(total, 'sample')})"
        if self.count == 0:
            return f"{self._label}, no samples"
        samples = (
            f"sample {self._start}"
            if self.count == 1
            else f"samples {self._start}-{self._stop - 1}"
        )
        return f"{self._label}, {samples}" + (f" of {total}" if total is not None else "")

    def __repr__(self) -> str:
        return f"DataSource({self.description})"

    def __iter__(self) -> Iterator[Feed]:
        for where, sample in self._samples.read(self._start, self._stop):
            yield _checked_feed(sample, self.specs, where)

    def take(self, count: int, max_bytes: int | None = None, least: int = 1) -> list[Feed]:
        """The first ``count`` samples (fewer if the source is shorter), checked; with
        ``max_bytes``, only as many as fit in that many bytes of arrays, but at least
        ``least`` (where the source has them)."""
        feeds: list[Feed] = []
        size = 0
        for feed in self._window(self._start, self._stop_after(count)):
            size += sum(np.asarray(array).nbytes for array in feed.values())
            if len(feeds) >= least and max_bytes is not None and size > max_bytes:
                break
            feeds.append(feed)
        return feeds

    def take_labels(self, count: int) -> list[np.ndarray] | None:
        """The labels (array ``LABELS``) of the first ``count`` samples, as integer arrays, or
        None where the samples have none. Raises InputError where only some samples have
        labels, or labels that are not integers."""
        if _is_input(LABELS, self.specs):
            return None
        labels: list[np.ndarray] = []
        unlabelled = None
        for where, sample in self._samples.read(self._start, self._stop_after(count)):
            value = sample.get(LABELS) if isinstance(sample, Mapping) else None
            if value is None:
                unlabelled = unlabelled or where
                if labels:
                    raise _partial_labels(
                        f"{where} has no '{LABELS}' array, but the samples before it have"
                    )
            elif unlabelled:
                raise _partial_labels(f"{where} has a '{LABELS}' array, but {unlabelled} has none")
            else:
                labels.append(_checked_labels(value, where))
        return labels or None

    def _stop_after(self, count: int) -> int:
        stop = self._start + max(count, 0)
        return stop if self._stop is None else min(stop, self._stop)

    def split(self, holdout: int, max_share: float = 1.0) -> tuple[DataSource, DataSource]:
        """Split into (calibration, validation): validation measures samples calibration never saw.

        With a known count, validation is the last ``holdout`` samples, but at most ``max_share``
        of them (at least one) and at most all but one, so calibration keeps samples; a single
        sample serves both. With an unknown count, the first ``holdout / max_share`` samples are
        pulled into memory to learn whether the source is that long: if so, validation is its
        first ``holdout`` samples and calibration the rest of the stream; if not, the count is
        known and the rule above applies. ``holdout=0`` gives an empty validation source.
        """
        if holdout < 0:
            raise ValueError(f"holdout must be 0 or more, got {holdout}")
        if not 0.0 < max_share <= 1.0:
            raise ValueError(f"max_share must be in (0, 1], got {max_share}")
        if holdout == 0:
            return self, self._window(self._start, self._start)
        if self.count is None:
            needed = max(holdout + 1, math.ceil(holdout / max_share))
            pulled = len(self.take(needed))
            if pulled >= needed:
                middle = self._start + holdout
                return self._window(middle, None), self._window(self._start, middle)
            return self._window(self._start, self._start + pulled).split(holdout, max_share)
        if self.count <= 1:
            return self, self
        kept = min(holdout, self.count - 1, max(1, int(self.count * max_share)))
        middle = self._stop - kept
        return self._window(self._start, middle), self._window(middle, self._stop)

    @property
    def in_files(self) -> bool:
        """Whether the samples live in .npz files, which other processes and machines with
        the same storage can read themselves (a ``part`` then pickles as paths, not arrays)."""
        return isinstance(self._samples, _NpzFiles)

    def part(self, start: int, stop: int) -> DataSource:
        """Samples ``start`` to ``stop`` (excluded) of this source, as a source of its own."""
        if start < 0 or stop < start or (self.count is not None and stop > self.count):
            raise ValueError(f"part {start}:{stop} outside the source's {self.count} samples")
        return self._window(self._start + start, self._start + stop)

    def _window(self, start: int, stop: int | None) -> DataSource:
        return DataSource(self.specs, self._samples, self._label, start=start, stop=stop)


def open_data(
    source: str | os.PathLike[str] | DataSource | Iterable[Mapping[str, np.ndarray]] | DataReader,
    model: ir.Model,
) -> DataSource:
    """Open samples for ``model`` and check what can be checked before any work starts.

    Files are checked from their array headers (names, dtypes, shapes, counts) without reading the
    data; for Python sources the first sample is pulled and checked. NaN and Inf are found as
    samples are read.

    Raises:
        InputError: the source is missing, unreadable, empty, or does not fit the model's inputs.
    """
    specs = input_specs(model)
    if isinstance(source, DataSource):
        return DataSource(
            specs, source._samples, source._label, start=source._start, stop=source._stop
        )
    if isinstance(source, (str, os.PathLike)):
        data = _open_path(os.fspath(source), specs)
    else:
        data = _open_python(source, specs)
        if not data.take(1):
            raise InputError(
                f"data from a {data._label} holds no samples",
                fix="give at least one sample; calibration and validation need real inputs",
            )
    logger.info("data: %s", data.description)
    return data


def _open_python(source: Any, specs: list[InputSpec]) -> DataSource:
    label = type(source).__name__
    if callable(getattr(source, "get_next", None)):
        return DataSource(specs, _reader_samples(source), label)
    if isinstance(source, np.ndarray):
        raise InputError(
            "data is a single numpy array, but each sample must name the model inputs it feeds",
            details=[f"model inputs: {_describe_all(specs)}"],
            fix=f"save it with {_savez_example('calib.npz', specs)} and pass the file, "
            "or pass a list of feed dicts",
        )
    if isinstance(source, Mapping):
        raise InputError(
            "data is a single dict; it must be an iterable of feed dicts, one per sample",
            fix="wrap one sample in a list, [feed]; for arrays that hold many samples, save them "
            f"with {_savez_example('calib.npz', specs)} and pass the file",
        )
    if isinstance(source, Sequence):
        return DataSource(specs, _FeedList(list(source)), label)
    if isinstance(source, Iterable):
        return DataSource(specs, _iterable_samples(source), label)
    raise InputError(f"data of type {label} is not a data source", details=[ACCEPTED_SOURCES])


def _open_path(path: str, specs: list[InputSpec]) -> DataSource:
    """An .npz file, or a folder whose .npz files, sorted by name, form one stream of samples."""
    if os.path.isdir(path):
        files = [os.path.join(path, name) for name in _npz_names(path, specs)]
    elif os.path.exists(path):
        files = [path]
    else:
        raise InputError(
            f"data file '{path}' does not exist", details=[ACCEPTED_SOURCES], fix="check the path"
        )
    samples = _NpzFiles([(file, _count_npz_samples(file, specs)) for file in files])
    if samples.count == 0:
        raise InputError(
            f"data '{path}' holds no samples",
            details=["axis 0 of each array indexes samples, and it has length 0"],
            fix="give at least one sample; calibration and validation need real inputs",
        )
    return DataSource(specs, samples, path)


def _npz_names(folder: str, specs: list[InputSpec]) -> list[str]:
    """The .npz files of a folder, sorted by name; hidden files such as '._x.npz' are not data.
    A link to a file outside the folder is refused: a data folder is read as a tree of its own."""
    found = sorted(os.listdir(folder))
    names = [name for name in found if name.endswith(".npz") and not name.startswith(".")]
    root = os.path.realpath(folder)
    outside = [
        name
        for name in names
        if os.path.commonpath([root, os.path.realpath(os.path.join(folder, name))]) != root
    ]
    if outside:
        raise InputError(
            f"data folder '{folder}' links to files outside it",
            details=[
                f"{name} -> {os.path.realpath(os.path.join(folder, name))}" for name in outside[:10]
            ],
            fix="onnxopt follows no link out of a data folder: copy those files into it, or "
            "pass a file itself as the data",
        )
    if not names:
        listing = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise InputError(
            f"data folder '{folder}' holds no .npz files",
            details=[f"files found: {listing}" if found else "it is empty"],
            fix="put the samples in .npz files in it, e.g. "
            + _savez_example(os.path.join(folder, "part-000.npz"), specs),
        )
    return names


class _NpzFiles:
    """Samples stored in .npz files, read one whole file at a time.

    Each sample is copied out of its file's arrays, so a caller that keeps a few samples does not
    keep the whole file in memory.
    """

    def __init__(self, files: list[tuple[str, int]]):
        self.files = files
        self.count = sum(count for _, count in files)

    def read(self, start: int, stop: int | None) -> Iterator[tuple[str, Feed]]:
        stop = self.count if stop is None else stop
        offset = 0
        for path, count in self.files:
            first, last = max(start - offset, 0), min(stop - offset, count)
            if first < last:
                logger.debug("reading samples %d-%d of %s", first, last - 1, path)
                arrays = _load_npz(path)
                for index in range(first, last):
                    yield (
                        f"sample {index} of '{path}'",
                        {name: array[index].copy() for name, array in arrays.items()},
                    )
            offset += count


class _FeedList:
    """Feed dicts held in memory."""

    def __init__(self, feeds: list[Any]):
        self.feeds = feeds
        self.count = len(feeds)

    def read(self, start: int, stop: int | None) -> Iterator[tuple[str, Any]]:
        for index in range(start, self.count if stop is None else stop):
            yield f"sample {index}", self.feeds[index]


class _Stream:
    """Samples pulled from an iterator that may not be restartable.

    Samples pulled by bounded reads (``take``, ``split``) are kept in ``head``, in order, so that
    later reads replay them instead of needing the iterator again.
    """

    count = None

    def __init__(
        self,
        start_iterator: Callable[[], Iterator[Any]],
        restart: Callable[[], Iterator[Any]] | None,
    ):
        self._start_iterator = start_iterator
        self._restart = restart
        self._iterator: Iterator[Any] | None = None
        self._position = 0
        self.head: list[Any] = []

    def read(self, start: int, stop: int | None) -> Iterator[tuple[str, Any]]:
        index = start
        while stop is None or index < stop:
            if index < len(self.head):
                sample = self.head[index]
            else:
                sample = self._pull(index)
                if sample is _END:
                    return
                if stop is not None and index == len(self.head):
                    self.head.append(sample)
            yield f"sample {index}", sample
            index += 1

    def _pull(self, index: int) -> Any:
        if self._iterator is None:
            self._iterator = self._start_iterator()
        elif self._position > index:
            if self._restart is None:
                raise InputError(
                    "data from a one-shot generator or reader was already read, "
                    "and cannot be read again",
                    fix="pass a list of feeds or an .npz file, "
                    "or give the reader a rewind() method",
                )
            self._iterator, self._position = self._restart(), 0
        while self._position < index and next(self._iterator, _END) is not _END:
            self._position += 1
        sample = next(self._iterator, _END)
        if sample is not _END:
            self._position += 1
        return sample


def _reader_samples(reader: DataReader) -> _Stream:
    """A stream over ``get_next()`` until it returns None; ``rewind()``, if any, restarts it."""

    def start() -> Iterator[Any]:
        return iter(reader.get_next, None)

    def restart() -> Iterator[Any]:
        reader.rewind()
        return start()

    return _Stream(start, restart if callable(getattr(reader, "rewind", None)) else None)


def _iterable_samples(source: Iterable[Any]) -> _Stream:
    """A stream over an iterable: an iterator is one-shot, other iterables restart with iter()."""
    if isinstance(source, Iterator):
        return _Stream(lambda: source, None)
    return _Stream(lambda: iter(source), lambda: iter(source))


def _npz_headers(path: str, specs: list[InputSpec]) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Dtype and shape of each array of an .npz, from the array headers alone, not the data."""
    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                with archive.open(member) as stream:
                    version = np.lib.format.read_magic(stream)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
                headers[member.removesuffix(".npy")] = (dtype, shape)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise _not_an_npz(
            path, error, fix=f"write it with {_savez_example(path, specs)}"
        ) from error
    return headers


def _load_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise _not_an_npz(
            path, error, fix="check that nothing changed the file since it was opened"
        ) from error


def _not_an_npz(path: str, error: Exception, fix: str) -> InputError:
    details = [str(error)]
    if _is_npy(path):
        details.append("it is a .npy file: one array, with no input name")
    return InputError(
        f"data file '{path}' is not a valid .npz archive",
        details=details,
        fix=fix,
    )


def _is_npy(path: str) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read(6) == b"\x93NUMPY"
    except OSError:
        return False


def _count_npz_samples(path: str, specs: list[InputSpec]) -> int:
    """Check an .npz against the model from its headers, and count its samples."""
    headers = _npz_headers(path, specs)
    _check_names(
        [name for name in headers if name != LABELS or _is_input(LABELS, specs)],
        specs,
        f"data file '{path}'",
        fix=f"name one array per model input, e.g. {_savez_example(path, specs)}",
    )
    counts = {}
    for spec in specs:
        dtype, shape = headers[spec.name]
        if not shape:
            raise InputError(
                f"array '{spec.name}' in '{path}' is a scalar, "
                "but axis 0 of each array must index samples",
                details=[f"the model expects {spec.describe()} per sample"],
                fix="stack the samples along a new axis 0, e.g. numpy.stack(samples)",
            )
        if spec.shape is not None and len(shape) == len(spec.shape):
            raise InputError(
                f"array '{spec.name}' in '{path}' has shape {shape}, the rank of one sample: "
                "it lacks the sample axis",
                details=[
                    "axis 0 of each array indexes samples, "
                    f"and each sample is one feed of {spec.describe()}"
                ],
                fix="add the sample axis: array[:, None] (numpy.expand_dims(array, 1)) makes each "
                "row one sample of batch size 1; array[None] if the whole array is one sample",
            )
        _check_array(spec, dtype, shape[1:], f"each sample of array '{spec.name}' in '{path}'")
        counts[spec.name] = shape[0]
    if LABELS in headers and not _is_input(LABELS, specs):
        dtype, shape = headers[LABELS]
        _checked_labels(np.zeros((), dtype), f"'{path}'")
        counts[LABELS] = shape[0] if shape else 0
    if len(set(counts.values())) > 1:
        raise InputError(
            f"arrays in '{path}' hold different numbers of samples",
            details=[", ".join(f"{name}: {count}" for name, count in counts.items())],
            fix="axis 0 of each array indexes samples: give every array the same length on it",
        )
    return next(iter(counts.values()), 0)


def _checked_feed(sample: Any, specs: list[InputSpec], where: str) -> Feed:
    """The sample as a feed of exactly the model's inputs, or an InputError saying what is wrong."""
    if not isinstance(sample, Mapping):
        raise InputError(
            f"{where} is a {type(sample).__name__}, not a dict of model input name to array",
            details=[f"model inputs: {_describe_all(specs)}"],
            fix="give one dict per sample, e.g. {"
            + ", ".join(f"'{spec.name}': array" for spec in specs)
            + "}",
        )
    _check_names(
        [name for name in sample if name != LABELS or _is_input(LABELS, specs)],
        specs,
        where,
        fix="give every sample one array per model input, keyed by input name",
    )
    feed = {}
    for spec in specs:
        value = sample[spec.name]
        subject = f"input '{spec.name}' of {where}"
        if isinstance(value, np.generic):
            # A scalar input's sample, array[i] of an (N,) array: a 0-d feed of its own dtype.
            value = np.asarray(value)
        if not isinstance(value, np.ndarray):
            raise InputError(
                f"{subject} is a {type(value).__name__}, not a numpy array",
                details=[f"the model expects {spec.describe()}"],
                fix="convert it where the data is made: "
                f"numpy.asarray(value, dtype=numpy.{spec.dtype.type.__name__})",
            )
        _check_array(spec, value.dtype, value.shape, subject)
        _check_finite(value, subject)
        feed[spec.name] = value
    return feed


def _is_input(name: str, specs: list[InputSpec]) -> bool:
    return any(spec.name == name for spec in specs)


def _partial_labels(message: str) -> InputError:
    return InputError(message, fix=f"give every sample its '{LABELS}', or none of them")


def _checked_labels(value: Any, where: str) -> np.ndarray:
    """A sample's labels as an integer array, or an InputError."""
    array = np.asarray(value)
    if array.dtype.kind not in "iu":
        raise InputError(
            f"'{LABELS}' of {where} is {array.dtype}, not integer class indices",
            fix="store each sample's class index (or one per row of the class scores) as "
            "integers: numpy.asarray(labels, dtype=numpy.int64)",
        )
    return array


def _check_names(found: list[str], specs: list[InputSpec], subject: str, fix: str) -> None:
    expected = [spec.name for spec in specs]
    missing = [name for name in expected if name not in found]
    extra = [name for name in found if name not in expected]
    if not missing and not extra:
        return
    if missing:
        message = f"{subject} has no array for model input {_quoted(missing)}"
    else:
        arrays = f"{_plural(len(extra), 'array')} {_quoted(extra)}"
        message = f"{subject} has {arrays} that the model does not take as input"
    details = [
        f"arrays found: {', '.join(found) or 'none'}",
        f"model inputs: {_describe_all(specs)}",
    ]
    raise InputError(message, details=details, fix=fix)


def _check_array(spec: InputSpec, dtype: np.dtype, shape: tuple[int, ...], subject: str) -> None:
    if dtype != spec.dtype:
        raise InputError(
            f"{subject} is {dtype}; the model expects {spec.describe()}",
            details=[
                "onnxopt never casts data: a wrong dtype often means a preprocessing step differs"
            ],
            fix="convert it where the data is made: "
            f"array.astype(numpy.{spec.dtype.type.__name__})",
        )
    if spec.shape is None:
        return
    if len(shape) != len(spec.shape):
        raise InputError(
            f"{subject} has shape {shape}; the model expects {spec.describe()}",
            details=[f"rank {len(shape)}, where the model takes rank {len(spec.shape)}"],
            fix="give one full feed per sample, with the model's rank",
        )
    for axis, (size, dim) in enumerate(zip(shape, spec.shape, strict=True)):
        if isinstance(dim, int) and size != dim:
            raise InputError(
                f"{subject} has shape {shape}; the model expects {spec.describe()}",
                details=[f"axis {axis} is {size}; the model fixes it at {dim}"],
                fix="resize or crop the data to the model's shape, "
                "or export the model with that axis dynamic",
            )


def _check_finite(value: np.ndarray, subject: str) -> None:
    if value.dtype.kind != "f":
        return
    finite = np.isfinite(value)
    if finite.all():
        return
    bad = finite.size - int(np.count_nonzero(finite))
    first = tuple(int(index) for index in np.argwhere(~finite)[0])
    raise InputError(
        f"{subject} has {bad} NaN or Inf {'value' if bad == 1 else 'values'}",
        details=[f"the first is at index {first}"],
        fix="clean or drop these samples: "
        "NaN and Inf make calibration ranges and accuracy checks meaningless",
    )


def _savez_example(path: str, specs: list[InputSpec]) -> str:
    """A numpy.savez call that names one array per model input, as the user would write it."""
    if all(spec.name.isidentifier() for spec in specs):
        arrays = ", ".join(f"{spec.name}=..." for spec in specs)
    else:
        arrays = "**{" + ", ".join(f"'{spec.name}': ..." for spec in specs) + "}"
    return f"numpy.savez('{path}', {arrays})"


def _describe_all(specs: list[InputSpec]) -> str:
    return "; ".join(spec.describe() for spec in specs) or "none"


def _quoted(names: list[str]) -> str:
    return ", ".join(f"'{name}'" for name in names)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
