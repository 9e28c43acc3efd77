"""Which quantized ops onnxruntime really turns into integer kernels.

A QDQ model is only fast if onnxruntime's graph optimizer fuses DequantizeLinear -> op ->
QuantizeLinear into one integer kernel. This loads the model with the extended optimizations,
saves what onnxruntime would run, and counts.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import tempfile

import onnx
import onnx_ir as ir
import onnxruntime as ort

INTEGER_KERNELS = frozenset(
    {
        "QLinearConv",
        "QGemm",
        "QLinearMatMul",
        "MatMulIntegerToFloat",
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeMatMul",
    }
)
HEAVY_FLOAT_OPS = frozenset(
    {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "ConvTranspose"}
)


@dataclasses.dataclass
class FusionReport:
    """Integer kernels onnxruntime runs, heavy ops it still runs in float on dequantized input,
    and the conversions left between int8 and float.

    Attributes:
        boundaries: the QuantizeLinear and DequantizeLinear nodes left after fusion, by the
            float op (or graph input and output) on their float side, e.g.
            ``{"DequantizeLinear -> ConvTranspose": 1, "input -> QuantizeLinear": 1}``.
    """

    integer_kernels: int
    unfused: int
    op_counts: dict[str, int]
    boundaries: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def rate(self) -> float:
        total = self.integer_kernels + self.unfused
        return 1.0 if total == 0 else self.integer_kernels / total


def onnxruntime_optimized(model: ir.Model | str | os.PathLike) -> onnx.GraphProto:
    """The graph onnxruntime's CPU provider runs after its extended optimizations (weights left out)."""
    with tempfile.TemporaryDirectory(prefix="onnxopt-fusion-") as folder:
        source = model
        if isinstance(model, ir.Model):
            source = os.path.join(folder, "model.onnx")
            ir.save(model, source, external_data="model.onnx.data")
        optimized = os.path.join(folder, "optimized.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = optimized
        options.log_severity_level = 3
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "optimized.data"
        )
        ort.InferenceSession(os.fspath(source), options, providers=["CPUExecutionProvider"])
        return onnx.load(optimized, load_external_data=False).graph


def fusion_report(model: ir.Model | str | os.PathLike) -> FusionReport:
    """Count what onnxruntime's CPU provider runs after its extended graph optimizations."""
    graph = onnxruntime_optimized(model)
    producers = {output: node for node in graph.node for output in node.output}
    counts = collections.Counter(node.op_type for node in graph.node)
    unfused = sum(
        1
        for node in graph.node
        if node.op_type in HEAVY_FLOAT_OPS
        and any(
            producers.get(name) is not None and producers[name].op_type == "DequantizeLinear"
            for name in node.input
        )
    )
    integer_kernels = sum(counts[op] for op in INTEGER_KERNELS)
    return FusionReport(
        integer_kernels, unfused, dict(sorted(counts.items())), _boundaries(graph, producers)
    )


def _boundaries(graph: onnx.GraphProto, producers: dict[str, onnx.NodeProto]) -> dict[str, int]:
    consumers: dict[str, list[str]] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node.op_type)
    for output in graph.output:
        consumers[output.name].append("output")
    found: collections.Counter[str] = collections.Counter()
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            producer = producers.get(node.input[0])
            found[f"{producer.op_type if producer else 'input'} -> QuantizeLinear"] += 1
        elif node.op_type == "DequantizeLinear" and node.input[0] in producers:
            for consumer in sorted(set(consumers[node.output[0]])):
                found[f"DequantizeLinear -> {consumer}"] += 1
    return dict(found.most_common())
