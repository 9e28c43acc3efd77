"""Running ir models with onnxruntime, and describing what they take."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import tempfile
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxopt.mapped import mapped_weights, unmap_read_weights
from onnxopt.openvino_runtime import OpenVinoSession
from onnxopt.shapes import known_sizes

# One sample as onnxruntime takes it: an array per model input, by input name.
Feed = dict[str, np.ndarray]

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")

# The files a model in memory is written to for onnxruntime: the graph, and its weights.
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"

# Protobuf cannot serialize a message over 2 GiB; models above this are saved with external data.
PROTOBUF_LIMIT_BYTES = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A model input as a user must feed it: name, numpy dtype and shape (str or None for free dims)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None

    def describe(self) -> str:
        if self.shape is None:
            return f"{self.name}: {self.dtype} of any shape"
        dims = ", ".join("?" if dim is None else str(dim) for dim in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The inputs a caller must feed, leaving out initializers that old IR versions list as inputs."""
    specs = []
    for value in model.graph.inputs:
        if value.const_value is not None or value.name in model.graph.initializers:
            continue
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        shape = None
        if value.shape is not None:
            # Some exporters (Paddle) write -1 for a free dimension: it is one.
            shape = tuple(
                (dim if dim >= 0 else None) if isinstance(dim, int) else dim.value
                for dim in value.shape
            )
        specs.append(InputSpec(value.name, np.dtype(dtype), shape))
    return specs


def concrete_shape(spec: InputSpec, free_dim: int = 1, batch: int | None = None) -> tuple[int, ...]:
    """The shape of one sample, with every free dimension set to ``free_dim``.

    With ``batch``, a free axis 0 of an input of rank 2 or more (the batch axis, as a rule) gets
    ``batch`` instead.
    """
    if spec.shape is None:
        return ()
    return tuple(
        dim
        if isinstance(dim, int)
        else (batch if batch is not None and axis == 0 and len(spec.shape) > 1 else free_dim)
        for axis, dim in enumerate(spec.shape)
    )


def random_feeds(
    model: ir.Model | Sequence[InputSpec],
    count: int,
    seed: int = 0,
    free_dim: int = 1,
    batch: int | None = None,
) -> list[Feed]:
    """Random samples of the right shapes and dtypes, for checks when the user gave no data.

    Free dimensions get ``free_dim`` (a free batch axis ``batch``, see ``concrete_shape``).
    Integer inputs get 0 or 1 so that indices stay in range of any embedding table.
    """
    specs = input_specs(model) if isinstance(model, ir.Model) else list(model)
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        feed = {}
        for spec in specs:
            shape = concrete_shape(spec, free_dim, batch)
            if spec.dtype.kind == "f":
                feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            elif spec.dtype.kind == "b":
                feed[spec.name] = rng.integers(0, 2, shape).astype(bool)
            else:
                feed[spec.name] = rng.integers(0, 2, shape).astype(spec.dtype)
        feeds.append(feed)
    return feeds


# Sizes tried for free dimensions until the model runs: batch 1 first, then lengths that
# sequence and signal models accept (a reflect Pad needs more samples than it pads).
FREE_DIM_CANDIDATES = (1, 16, 64, 256, 512, 1024, 4096)


def runnable_random_feeds(
    model: ir.Model, count: int, seed: int = 0
) -> tuple[list[Feed], str | None]:
    """Random samples the model itself runs on, and None; or no samples and why none ran.

    Tries the sizes of FREE_DIM_CANDIDATES for every free dimension but the batch axis (which
    stays 1), in order, until the model runs on a sample: a model whose If branch pads an audio frame fails at size 1 and runs at
    512, and comparing another model with it on samples it fails on would blame the wrong model.
    """
    specs = input_specs(model)
    try:
        session = create_session(model)
    except Exception as error:  # onnxruntime raises several unrelated types
        return [], f"onnxruntime cannot load the model: {type(error).__name__}: {error}"
    free = any(
        spec.shape is not None and any(not isinstance(dim, int) for dim in spec.shape)
        for spec in specs
    )
    failure = ""
    for size in FREE_DIM_CANDIDATES if free else (1,):
        [probe] = random_feeds(specs, 1, seed, size, batch=1)
        try:
            session.run(None, probe)
        except Exception as error:  # onnxruntime raises several unrelated types
            failure = f"{type(error).__name__}: {error}"
            continue
        return random_feeds(specs, count, seed, size, batch=1), None
    tried = ", ".join(str(size) for size in FREE_DIM_CANDIDATES) if free else "its fixed shapes"
    return [], f"the model fails on random inputs (free dimensions tried: {tried}): {failure}"


def model_size_bytes(model: ir.Model) -> int:
    """Bytes of all initializers: what the model weighs on disk, give or take the graph."""
    return sum(
        value.const_value.nbytes
        for value in model.graph.initializers.values()
        if value.const_value is not None
    )


def create_session(
    model: ir.Model | str | os.PathLike,
    *,
    threads: int | None = None,
    optimization_level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    memory_arena: bool = True,
    runtime: str = "onnxruntime",
) -> ort.InferenceSession | OpenVinoSession:
    """An onnxruntime CPU session for a model in memory or on disk; with
    ``runtime="openvino"``, the model compiled for OpenVINO's CPU plugin instead, run through
    the same interface (``openvino_runtime``).

    A model in memory travels through a temporary file with external data, which onnxruntime
    maps into memory: serializing it into one protobuf message would hold its weights three
    times over while the session loads (MiniLM: 350 MB above its start, against 50 MB; and
    twice as slow). A model that still keeps weights in its own external data files needs no
    temporary file: onnxruntime reads those from there, and takes the ones changed in memory
    as arrays. ``memory_arena=False`` returns each run's memory as it is freed, instead of
    keeping the largest run's in an arena for the session's life: for sessions whose runs hold
    many tensors.
    """
    if runtime == "openvino":
        return OpenVinoSession(model, threads=threads)
    options = ort.SessionOptions()
    options.graph_optimization_level = optimization_level
    options.enable_cpu_mem_arena = memory_arena
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if not isinstance(model, ir.Model):
        return ort.InferenceSession(os.fspath(model), options, providers=providers)
    unmap_read_weights(mapped_weights(model))
    session = _session_reading_weights_in_place(model, options, providers)
    if session is not None:
        return session
    with tempfile.TemporaryDirectory(
        prefix="onnxopt-session-", ignore_cleanup_errors=True
    ) as folder:
        path = os.path.join(folder, MODEL_FILE)
        ir.save(model, path, external_data=DATA_FILE)
        return ort.InferenceSession(path, options, providers=providers)


# onnxruntime's option naming the folder the external data of a model given as bytes is in.
EXTERNAL_DATA_FOLDER_OPTION = "session.model_external_initializers_file_folder_path"

# Weights in memory at least this large are handed to a session as arrays, not serialized.
HANDED_WEIGHT_BYTES = 2**16

# The external data location written for weights handed over as arrays; never read.
HANDED_LOCATION = "onnxopt-handed-over.bin"

# The arrays handed to a session, kept alive as long as it lives (onnxruntime may read them
# in place).
_HANDED_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _session_reading_weights_in_place(
    model: ir.Model, options: ort.SessionOptions, providers: list[str]
) -> ort.InferenceSession | None:
    """A session that reads the weights the model still keeps in its own external data files
    from those files, as onnxruntime reads a model file, and takes the large weights changed
    in memory as arrays: no copy of any weight is serialized or written.

    Writing the model to a temporary file copies every weight (a second each GB, per session)
    and, where the weights come from mapped files, first brings them all into this process's
    memory: sessions of a 1 GB model peaked at 2x its size where onnxruntime alone, reading
    the file, peaks at 1x. None where the model keeps no weights on disk, or keeps them in
    more than one folder.
    """
    folders = {os.path.abspath(tensor.base_dir or ".") for tensor in mapped_weights(model)}
    if len(folders) != 1:
        return None
    (folder,) = folders
    handed = _large_weights_in_memory(model)
    originals = {value: value.const_value for value, _ in handed}
    try:
        for value, array in handed:
            value.const_value = ir.ExternalTensor(
                HANDED_LOCATION,
                offset=0,
                length=array.nbytes,
                dtype=value.const_value.dtype,
                shape=value.const_value.shape,
                name=value.name,
                base_dir=folder,
            )
        proto = ir.serde.serialize_model(model)
    finally:
        for value, tensor in originals.items():
            value.const_value = tensor
    if handed:
        options.add_external_initializers(
            [value.name for value, _ in handed],
            [ort.OrtValue.ortvalue_from_numpy(array) for _, array in handed],
        )
    options.add_session_config_entry(EXTERNAL_DATA_FOLDER_OPTION, folder)
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=providers)
    if handed:
        _HANDED_WEIGHTS[session] = [array for _, array in handed]
    return session


def _large_weights_in_memory(model: ir.Model) -> list[tuple[ir.Value, np.ndarray]]:
    """The main graph's weights held in memory and at least HANDED_WEIGHT_BYTES large, with
    their arrays, in the types numpy and onnxruntime share."""
    handed = []
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if (
            tensor is None
            or isinstance(tensor, ir.ExternalTensor)
            or tensor.nbytes < HANDED_WEIGHT_BYTES
        ):
            continue
        try:
            array = np.ascontiguousarray(tensor.numpy())
        except (TypeError, ValueError):
            continue
        if array.dtype.kind in "fiub" and array.dtype.itemsize in (1, 2, 4, 8):
            handed.append((value, array))
    return handed


def release_freed_memory() -> None:
    """Hand memory that was freed back to the system, where the C library keeps it (glibc).

    onnxruntime's output buffers, once numpy frees them, stay in glibc's heaps for reuse, and
    runs that allocate them from several threads fragment those heaps: calibrating
    EfficientNet-Lite0 ended holding 250 MB it had freed. Called between runs of many
    samples (calibration batches, fallback trials), it keeps peak memory to what is live.
    A no-op where the C library is not glibc.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def concurrently(function: Callable[[_Item], _Result], items: Iterable[_Item]) -> list[_Result]:
    """``function`` of every item, in order, one item per core at a time.

    For onnxruntime runs, which release the GIL: samples run one per core on sessions of one
    intra-op thread each use the cores better than one batch-1 run spread over all of them
    (1.6x on 2 cores for EfficientNet-Lite0, PicoDet and PP-LCNet samples).
    """
    items = list(items)
    if len(items) < 2 or cores() < 2:
        return [function(item) for item in items]
    with ThreadPoolExecutor(min(cores(), len(items))) as pool:
        return list(pool.map(function, items))


def sample_session(
    model: ir.Model | str | os.PathLike, runtime: str = "onnxruntime"
) -> ort.InferenceSession | OpenVinoSession:
    """A session to run many samples with ``run``: one intra-op thread, as ``run`` runs the
    samples one per core."""
    return create_session(model, threads=1, runtime=runtime)


def run(session: ort.InferenceSession, feeds: Sequence[Feed]) -> list[list[np.ndarray]]:
    """Outputs of every feed, in the session's output order; feeds run one per core at a time
    (see ``concurrently``), so a ``sample_session`` uses every core."""
    return concurrently(lambda feed: session.run(None, feed), feeds)


def tensor_bytes(
    source: ir.Model | SerializedModel, names: Collection[str], feed: Feed
) -> dict[str, int]:
    """Bytes of each named tensor on ``feed``: from the shapes where those are known (free
    dimensions of the inputs bound by ``feed``), the others measured in one run on ``feed``.
    Shapes first: a detector's tensors all exposed at once would hold a gigabyte (PicoDet)."""
    model = source.model if isinstance(source, SerializedModel) else source
    sizes = known_sizes(model, set(names), feed)
    unknown = sorted(set(names) - set(sizes))
    if unknown:
        measured = ProbeSession(source, unknown, prune=True).run(feed)
        sizes.update((name, array.nbytes) for name, array in measured.items())
    return sizes


def memory_headroom() -> int:
    """Bytes this process held at its peak beyond what it holds now: memory it can fill again
    without raising its peak resident set. 0 where that is unknown (outside Linux)."""
    try:
        import resource

        with open("/proc/self/statm") as statm:
            resident_pages = int(statm.read().split()[1])
    except (ImportError, OSError, ValueError, IndexError):
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return max(0, peak - resident_pages * os.sysconf("SC_PAGE_SIZE"))


def groups_within(sizes: Iterable[tuple[_Item, int]], max_bytes: int) -> list[list[_Item]]:
    """Consecutive items in groups of at most ``max_bytes`` (an item larger than that alone)."""
    groups: list[list[_Item]] = []
    group_bytes = 0
    for item, size in sizes:
        if not groups or (groups[-1] and group_bytes + size > max_bytes):
            groups.append([])
            group_bytes = 0
        groups[-1].append(item)
        group_bytes += size
    return groups


class SerializedModel:
    """A model written once, with its weights as external data, for probe sessions that each
    expose other tensors of it: each session then costs writing the graph alone, not cloning
    and writing the whole model (0.3 s a session on a 419-layer detector). Close it, or use it
    as a context manager, to delete the files.
    """

    def __init__(self, model: ir.Model):
        self.model = model
        self._folder = tempfile.TemporaryDirectory(
            prefix="onnxopt-probe-", ignore_cleanup_errors=True
        )
        path = os.path.join(self._folder.name, MODEL_FILE)
        ir.save(model, path, external_data=DATA_FILE)
        self._graph = onnx.load(path, load_external_data=False)
        self._sessions = 0

    def with_outputs(self, values: Sequence[ir.Value], *, prune: bool = False) -> str:
        """A file of the model with ``values`` as extra graph outputs, beside its weights; with
        ``prune``, ``values`` are its only outputs and the nodes they do not need are gone."""
        self._sessions += 1
        path = os.path.join(self._folder.name, f"probe{self._sessions}.onnx")
        if prune:
            pruned = onnx.ModelProto()
            pruned.CopyFrom(self._graph)
            del pruned.graph.output[:]
            _add_outputs(pruned.graph, values)
            needed = _needed_nodes(pruned.graph)
            del pruned.graph.node[:]
            pruned.graph.node.extend(needed)
            onnx.save(pruned, path)
            return path
        outputs = self._graph.graph.output
        count = len(outputs)
        try:
            _add_outputs(self._graph.graph, values)
            onnx.save(self._graph, path)
        finally:
            del outputs[count:]
        return path

    def close(self) -> None:
        self._folder.cleanup()

    def __enter__(self) -> SerializedModel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _add_outputs(graph: onnx.GraphProto, values: Sequence[ir.Value]) -> None:
    present = {output.name for output in graph.output}
    for value in values:
        if value.name not in present:
            output = graph.output.add()
            output.name = value.name
            if value.dtype is not None:
                output.type.tensor_type.elem_type = value.dtype.value
            present.add(value.name)


def _needed_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes the graph's outputs depend on, in graph order; a node with subgraphs (If,
    Loop) depends on every name its subgraphs read."""
    producers = {name: index for index, node in enumerate(graph.node) for name in node.output}
    needed: set[int] = set()
    pending = [output.name for output in graph.output]
    while pending:
        index = producers.get(pending.pop())
        if index is None or index in needed:
            continue
        needed.add(index)
        pending.extend(_names_read(graph.node[index]))
    return [node for index, node in enumerate(graph.node) if index in needed]


def _names_read(node: onnx.NodeProto) -> Iterator[str]:
    yield from node.input
    for attribute in node.attribute:
        subgraphs = [attribute.g] if attribute.HasField("g") else []
        for subgraph in [*subgraphs, *attribute.graphs]:
            for inner in subgraph.node:
                yield from _names_read(inner)


class ProbeSession:
    """A session of a copy of the model in which the named values are outputs too.

    How calibration and the accuracy measurements see inside a model: intermediate tensors
    become extra graph outputs of a copy (the model itself is not changed), and values that are
    graph inputs are read from the feed.

    ``prune`` makes the named values the copy's only outputs and drops the nodes they do not
    need: probes of a detector's early layers then run those layers, not the whole model
    (onnxruntime runs every node of a session, whatever outputs a run asks for).

    Attributes:
        session: the onnxruntime session of the copy; None when pruned to graph inputs alone.
        output_names: the model's own outputs (none when pruned).
        fetched: the named node outputs, now outputs of the copy too.
        fed: the named graph inputs, which ``run`` takes from the feed.
    """

    def __init__(
        self,
        model: ir.Model | SerializedModel,
        names: Sequence[str],
        *,
        copy: bool = True,
        threads: int | None = None,
        prune: bool = False,
    ):
        serialized = model if isinstance(model, SerializedModel) else None
        if serialized is not None:
            model = serialized.model
        elif copy:
            model = model.clone()
        graph = model.graph
        values = {value.name: value for value in graph.inputs}
        values.update((value.name, value) for node in graph for value in node.outputs)
        wanted = [name for name in dict.fromkeys(names) if name in values]
        self.output_names = [] if prune else [value.name for value in graph.outputs]
        self.fed = [name for name in wanted if values[name].producer() is None]
        self.fetched = [name for name in wanted if values[name].producer() is not None]
        self.session: ort.InferenceSession | None = None
        if prune and not self.fetched:
            return
        if serialized is not None:
            exposed = serialized.with_outputs([values[name] for name in self.fetched], prune=prune)
            self.session = create_session(exposed, threads=threads, memory_arena=False)
            return
        if prune:
            graph.outputs.clear()
        outputs = set(graph.outputs)
        graph.outputs.extend(values[name] for name in self.fetched if values[name] not in outputs)
        if prune:
            RemoveUnusedNodesPass()(model)
        self.session = create_session(model, threads=threads, memory_arena=False)

    def run(self, feed: Feed, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The named outputs (default: all of them) and the fed values, by name."""
        arrays = {}
        if self.session is not None:
            fetch = names if names is not None else [o.name for o in self.session.get_outputs()]
            arrays = dict(zip(fetch, self.session.run(list(fetch), feed), strict=True))
        arrays.update({name: feed[name] for name in self.fed if name in feed})
        return arrays
