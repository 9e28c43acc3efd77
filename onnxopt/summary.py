"""What a model is made of: interface, operators, parameters, size, sparsity; as data and as tables.

Used by ``onnxopt inspect`` and by the before/after table of ``onnxopt optimize``. Counting reads
shapes only, so it costs nothing on huge models; only sparsity reads weights, one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnx_ir as ir
from rich.console import Console
from rich.table import Table

from onnxopt.graph import DEFAULT_DOMAINS, declared_default_opset

logger = logging.getLogger(__name__)

TOP_SPARSE_TENSORS = 5
# Weights with at least this share of zeros count at their deflated size in SparsitySummary.
SPARSE_SHARE = 0.1
# Zeros are counted over slices of this many elements, so no full-size temporary is ever built.
ZERO_COUNT_CHUNK_ELEMENTS = 1 << 24


@dataclasses.dataclass
class ValueSummary:
    """A graph input or output as a user feeds or reads it.

    Attributes:
        name: the value's name.
        dtype: ONNX type name in lower case ("float", "int64", "sequence(tensor(float))"), or None
            when the model does not say.
        shape: dims as ints, names of symbolic dims as str, None for unnamed free dims; None when
            the rank is unknown.
    """

    name: str
    dtype: str | None
    shape: list[int | str | None] | None


@dataclasses.dataclass
class TensorSparsity:
    """Share of exact zeros in one weight tensor."""

    name: str
    shape: list[int]
    sparsity: float


@dataclasses.dataclass
class SparsitySummary:
    """Exact zeros among float weight initializers of two or more dims (biases and norms left out).

    Attributes:
        overall: zero_elements / elements; 0.0 when the model has no such weights.
        zero_elements: exactly-zero elements (-0.0 counts as zero, NaN does not).
        elements: all elements of the weights counted.
        tensors: how many weight tensors were counted.
        top: the sparsest tensors that hold any zero, sparsest first, at most TOP_SPARSE_TENSORS.
        bytes: the raw size of the weights counted.
        compressed_bytes: their size as deflate (zip, gzip) stores them: weights with at least
            SPARSE_SHARE zeros deflated (level 1), the others at their raw size, since float
            data without zeros deflates by under a tenth and reading it all would be slow.
    """

    overall: float
    zero_elements: int
    elements: int
    tensors: int
    top: list[TensorSparsity]
    bytes: int = 0
    compressed_bytes: int = 0


@dataclasses.dataclass
class ModelSummary:
    """What ``summarize`` found; ``as_dict`` is the JSON form.

    Counts cover the main graph, every subgraph (If, Loop, Scan bodies) and every model-local
    function body, each node once however often it is called.

    Attributes:
        path: the file the model was read from, when given.
        ir_version: the model's IR version.
        opset_imports: domain -> version, as the model declares them.
        producer_name: the tool that wrote the model, when it says.
        producer_version: that tool's version, when it says.
        inputs: what a caller feeds (initializers that old IR versions list as inputs left out).
        outputs: what the model returns.
        op_histogram: op type -> node count, most frequent first; ops outside the default domain
            are keyed "domain::op_type".
        node_count: all nodes counted in op_histogram.
        parameter_count: elements of all initializers plus values of Constant nodes.
        tensor_bytes: bytes of those tensors, from their shapes and types.
        file_bytes: the model file plus its external data files; None without a path.
        external_data_files: data files the tensors point to, relative to the model's folder.
        sparsity: None when not computed.
        metadata_props: the model's free-form key/value metadata.
    """

    path: str | None
    ir_version: int
    opset_imports: dict[str, int]
    producer_name: str | None
    producer_version: str | None
    inputs: list[ValueSummary]
    outputs: list[ValueSummary]
    op_histogram: dict[str, int]
    node_count: int
    parameter_count: int
    tensor_bytes: int
    file_bytes: int | None
    external_data_files: list[str]
    sparsity: SparsitySummary | None
    metadata_props: dict[str, str]

    @property
    def uses_external_data(self) -> bool:
        return bool(self.external_data_files)

    @property
    def default_opset(self) -> int | None:
        """The version of the default ONNX domain, the one that decides which ops and passes apply."""
        return declared_default_opset(self.opset_imports)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``json.dumps``; every number is finite."""
        result = dataclasses.asdict(self)
        result["uses_external_data"] = self.uses_external_data
        return result


def summarize(
    model: ir.Model, path: str | os.PathLike | None = None, *, sparsity: bool = True
) -> ModelSummary:
    """Describe a model without changing it.

    Args:
        model: the model to describe.
        path: the file holding this very model; gives the size on disk, external data included.
            The data files are found through the model's external tensors, so summarize a model
            just saved with external data by loading it back (``ir.load`` maps, it does not read).
        sparsity: count exact zeros in the weights. This reads every float weight (one at a time,
            external ones unmapped again afterwards), so turn it off for a quick look at huge models.
    """
    histogram = Counter(_op_key(node) for node in _all_nodes(model))
    parameters = 0
    tensor_bytes = 0
    for tensor in _all_tensors(model):
        parameters += tensor.size
        tensor_bytes += tensor.nbytes
    for node in _all_nodes(model):
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            elements, size = _constant_elements_and_bytes(node)
            parameters += elements
            tensor_bytes += size
    external_files = sorted(
        {
            os.fspath(tensor.location)
            for tensor in _all_tensors(model)
            if isinstance(tensor, ir.ExternalTensor)
        }
    )
    graph = model.graph
    initializer_names = set(graph.initializers)
    return ModelSummary(
        path=os.fspath(path) if path is not None else None,
        ir_version=model.ir_version,
        opset_imports=dict(model.opset_imports),
        producer_name=model.producer_name or None,
        producer_version=model.producer_version or None,
        inputs=[
            _value_summary(value)
            for value in graph.inputs
            if value.const_value is None and value.name not in initializer_names
        ],
        outputs=[_value_summary(value) for value in graph.outputs],
        op_histogram=dict(sorted(histogram.items(), key=lambda item: (-item[1], item[0]))),
        node_count=sum(histogram.values()),
        parameter_count=parameters,
        tensor_bytes=tensor_bytes,
        file_bytes=_file_bytes(path, external_files) if path is not None else None,
        external_data_files=external_files,
        sparsity=_sparsity(model) if sparsity else None,
        metadata_props=dict(model.metadata_props),
    )


def _all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    yield from ir.traversal.RecursiveGraphIterator(model.graph)
    for function in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(function)


def _all_graphs(model: ir.Model) -> Iterator[ir.Graph]:
    yield model.graph
    for node in _all_nodes(model):
        for attribute in node.attributes.values():
            if attribute.is_ref():
                continue
            if attribute.type == ir.AttributeType.GRAPH:
                yield attribute.value
            elif attribute.type == ir.AttributeType.GRAPHS:
                yield from attribute.value


def _all_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Initializer tensors of the main graph and of every subgraph."""
    for graph in _all_graphs(model):
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value


def _op_key(node: ir.Node) -> str:
    if node.domain in DEFAULT_DOMAINS:
        return node.op_type
    return f"{node.domain}::{node.op_type}"


def _constant_elements_and_bytes(node: ir.Node) -> tuple[int, int]:
    """The Constant's value, whichever of its value attributes holds it.

    A Constant in a function body may take its value from the caller; that counts as nothing here.
    """
    for attribute in node.attributes.values():
        if attribute.is_ref():
            continue
        if attribute.type == ir.AttributeType.TENSOR:
            return attribute.value.size, attribute.value.nbytes
        if attribute.type in (ir.AttributeType.FLOATS, ir.AttributeType.INTS):
            return len(attribute.value), np.asarray(attribute.value).nbytes
        if attribute.type == ir.AttributeType.STRINGS:
            return len(attribute.value), sum(len(text) for text in attribute.value)
        if attribute.type in (ir.AttributeType.FLOAT, ir.AttributeType.INT):
            return 1, np.asarray(attribute.value).nbytes
        if attribute.type == ir.AttributeType.STRING:
            return 1, len(attribute.value)
    return 0, 0


def _value_summary(value: ir.Value) -> ValueSummary:
    shape = None
    if value.shape is not None:
        shape = [dim if isinstance(dim, int) else dim.value for dim in value.shape]
    dtype = str(value.type).lower() if value.type is not None else None
    return ValueSummary(name=value.name or "", dtype=dtype, shape=shape)


def _file_bytes(path: str | os.PathLike, external_files: list[str]) -> int:
    """The model file and its data files, which the ONNX spec places relative to the model's folder."""
    total = os.path.getsize(path)
    folder = os.path.dirname(os.fspath(path))
    for location in external_files:
        data_path = os.path.join(folder, location)
        if os.path.exists(data_path):
            total += os.path.getsize(data_path)
        else:
            logger.warning(
                "external data file %s of %s not found; size leaves it out", data_path, path
            )
    return total


def _sparsity(model: ir.Model) -> SparsitySummary:
    zeros = 0
    elements = 0
    counted = 0
    raw_bytes = 0
    compressed_bytes = 0
    sparse_tensors = []
    for tensor in _all_tensors(model):
        if not tensor.dtype.is_floating_point() or len(tensor.shape) < 2 or tensor.size == 0:
            continue
        tensor_zeros = _count_zeros(tensor)
        zeros += tensor_zeros
        elements += tensor.size
        counted += 1
        raw_bytes += tensor.nbytes
        if tensor_zeros >= SPARSE_SHARE * tensor.size:
            compressed_bytes += _deflated_bytes(tensor)
        else:
            compressed_bytes += tensor.nbytes
        if tensor_zeros:
            sparse_tensors.append(
                TensorSparsity(
                    name=tensor.name or "",
                    shape=list(tensor.shape.numpy()),
                    sparsity=tensor_zeros / tensor.size,
                )
            )
    sparse_tensors.sort(key=lambda item: -item.sparsity)
    return SparsitySummary(
        overall=zeros / elements if elements else 0.0,
        zero_elements=zeros,
        elements=elements,
        tensors=counted,
        top=sparse_tensors[:TOP_SPARSE_TENSORS],
        bytes=raw_bytes,
        compressed_bytes=compressed_bytes,
    )


def _deflated_bytes(tensor: ir.TensorProtocol) -> int:
    """The tensor's size deflated (zlib level 1), streamed in chunks; unmapped again after."""
    mapped_here = isinstance(tensor, ir.ExternalTensor) and tensor.raw is None
    data = memoryview(np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8))
    compressor = zlib.compressobj(1)
    size = 0
    for start in range(0, len(data), ZERO_COUNT_CHUNK_ELEMENTS):
        size += len(compressor.compress(data[start : start + ZERO_COUNT_CHUNK_ELEMENTS]))
    size += len(compressor.flush())
    del data
    if mapped_here:
        tensor.release()
    return size


def _count_zeros(tensor: ir.TensorProtocol) -> int:
    """Exact zeros in one tensor; an external tensor this maps is unmapped again before returning."""
    mapped_here = isinstance(tensor, ir.ExternalTensor) and tensor.raw is None
    flat = tensor.numpy().reshape(-1)
    zeros = 0
    for start in range(0, flat.size, ZERO_COUNT_CHUNK_ELEMENTS):
        zeros += int(np.count_nonzero(flat[start : start + ZERO_COUNT_CHUNK_ELEMENTS] == 0))
    del flat
    if mapped_here:
        tensor.release()
    return zeros


def format_bytes(size: int) -> str:
    """Decimal units, as file managers and model hubs show sizes."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(value) < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def format_count(count: int) -> str:
    """Parameter counts as people say them: 11.7M, 1.3B."""
    value = float(count)
    for unit in ("", "k", "M"):
        if abs(value) < 1000:
            return f"{value:.0f}" if unit == "" else f"{value:.1f}{unit}"
        value /= 1000
    return f"{value:.1f}B"


def _format_shape(shape: list[int | str | None] | None) -> str:
    if shape is None:
        return "any"
    return "[" + ", ".join("?" if dim is None else str(dim) for dim in shape) + "]"


def _format_opsets(opset_imports: dict[str, int]) -> str:
    return ", ".join(
        f"{domain or 'ai.onnx'} {version}" for domain, version in sorted(opset_imports.items())
    )


def _size_text(summary: ModelSummary) -> str:
    weights = f"weights {format_bytes(summary.tensor_bytes)}"
    if summary.file_bytes is None:
        return weights
    return f"{format_bytes(summary.file_bytes)} on disk, {weights}"


def _sparsity_text(sparsity: SparsitySummary | None) -> str:
    if sparsity is None:
        return "not computed"
    plural = "" if sparsity.tensors == 1 else "s"
    return (
        f"{sparsity.overall:.1%} zeros in {sparsity.tensors} float weight tensor{plural} "
        f"({format_count(sparsity.elements)} elements)"
    )


def _parameters_text(count: int) -> str:
    short = format_count(count)
    return short if short == str(count) else f"{short} ({count:,})"


def render_summary(summary: ModelSummary, console: Console) -> None:
    """Print the summary as tables: overview, interface, operators, sparsest weights, metadata."""
    overview = Table(show_header=False, box=None, padding=(0, 2))
    overview.add_column(style="bold")
    overview.add_column()
    if summary.path is not None:
        overview.add_row("file", summary.path)
    overview.add_row("IR version", str(summary.ir_version))
    overview.add_row("opsets", _format_opsets(summary.opset_imports))
    producer = " ".join(part for part in (summary.producer_name, summary.producer_version) if part)
    overview.add_row("producer", producer or "unknown")
    overview.add_row("nodes", f"{summary.node_count:,}")
    overview.add_row("parameters", _parameters_text(summary.parameter_count))
    overview.add_row("size", _size_text(summary))
    external = ", ".join(summary.external_data_files) if summary.uses_external_data else "no"
    overview.add_row("external data", external)
    overview.add_row("sparsity", _sparsity_text(summary.sparsity))
    console.print(overview)

    interface = Table(title="inputs and outputs", title_justify="left")
    for column in ("", "name", "type", "shape"):
        interface.add_column(column)
    for kind, values in (("input", summary.inputs), ("output", summary.outputs)):
        for value in values:
            interface.add_row(
                kind, value.name, value.dtype or "unknown", _format_shape(value.shape)
            )
    console.print(interface)

    operators = Table(title="operators", title_justify="left")
    operators.add_column("op type")
    operators.add_column("count", justify="right")
    for op_type, count in summary.op_histogram.items():
        operators.add_row(op_type, str(count))
    console.print(operators)

    if summary.sparsity is not None and summary.sparsity.top:
        sparsest = Table(title="sparsest weights", title_justify="left")
        for column in ("name", "shape", "zeros"):
            sparsest.add_column(column, justify="right" if column == "zeros" else "left")
        for tensor in summary.sparsity.top:
            sparsest.add_row(tensor.name, _format_shape(tensor.shape), f"{tensor.sparsity:.1%}")
        console.print(sparsest)

    if summary.metadata_props:
        metadata = Table(title="metadata", title_justify="left")
        metadata.add_column("key")
        metadata.add_column("value")
        for key, text in summary.metadata_props.items():
            metadata.add_row(key, text)
        console.print(metadata)


def _change(before: float, after: float, formatter: Callable[[Any], str]) -> str:
    """Signed difference, with the relative change when there is something to be relative to."""
    difference = after - before
    if difference == 0:
        return ""
    sign = "+" if difference > 0 else "-"
    text = f"{sign}{formatter(abs(difference))}"
    if before:
        text += f" ({difference / before:+.1%})"
    return text


def render_before_after(before: ModelSummary, after: ModelSummary, console: Console) -> None:
    """Print what optimizing changed: size, nodes, parameters, opset, then every op type either has.

    Sizes compare file sizes when both models were read from or written to files, and tensor
    bytes otherwise, so the two numbers in a row always measure the same thing.
    """
    table = Table(title="before and after", title_justify="left")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")

    if before.file_bytes is not None and after.file_bytes is not None:
        table.add_row(
            "size on disk",
            format_bytes(before.file_bytes),
            format_bytes(after.file_bytes),
            _change(before.file_bytes, after.file_bytes, format_bytes),
        )
    else:
        table.add_row(
            "weights size",
            format_bytes(before.tensor_bytes),
            format_bytes(after.tensor_bytes),
            _change(before.tensor_bytes, after.tensor_bytes, format_bytes),
        )
    table.add_row(
        "nodes",
        f"{before.node_count:,}",
        f"{after.node_count:,}",
        _change(before.node_count, after.node_count, lambda count: f"{count:,}"),
    )
    table.add_row(
        "parameters",
        format_count(before.parameter_count),
        format_count(after.parameter_count),
        _change(before.parameter_count, after.parameter_count, format_count),
    )
    opset_before, opset_after = before.default_opset, after.default_opset
    table.add_row(
        "opset",
        str(opset_before or "-"),
        str(opset_after or "-"),
        _count_change(opset_before, opset_after)
        if opset_before is not None and opset_after is not None
        else "",
    )
    if before.sparsity is not None and after.sparsity is not None:
        difference = after.sparsity.overall - before.sparsity.overall
        table.add_row(
            "sparsity",
            f"{before.sparsity.overall:.1%}",
            f"{after.sparsity.overall:.1%}",
            f"{difference * 100:+.1f} pt" if difference else "",
        )
        if after.sparsity.compressed_bytes < before.sparsity.compressed_bytes:
            table.add_row(
                "weights compressed",
                format_bytes(before.sparsity.compressed_bytes),
                format_bytes(after.sparsity.compressed_bytes),
                _change(
                    before.sparsity.compressed_bytes,
                    after.sparsity.compressed_bytes,
                    format_bytes,
                ),
            )

    table.add_section()

    def largest_count(op_type: str) -> int:
        return max(before.op_histogram.get(op_type, 0), after.op_histogram.get(op_type, 0))

    for op_type in sorted(
        set(before.op_histogram) | set(after.op_histogram),
        key=lambda op_type: (-largest_count(op_type), op_type),
    ):
        count_before = before.op_histogram.get(op_type, 0)
        count_after = after.op_histogram.get(op_type, 0)
        table.add_row(
            op_type,
            str(count_before),
            str(count_after),
            _count_change(count_before, count_after),
            style="dim" if count_before == count_after else None,
        )
    console.print(table)


def _count_change(before: int, after: int) -> str:
    return f"{after - before:+d}" if after != before else ""
