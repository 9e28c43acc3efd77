from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.fidelity import reference_comparison

# y = 2x everywhere, and "garbage" adds 100 where the mask is 0; pooled sums y over the kept
# positions, so it never sees the garbage.
ENCODER = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, S, 4] x, int64[N, S] MASK) => (float[N, S, 4] y, float[N, 4] pooled) {
    two = Constant<value = float {2.0}>()
    one = Constant<value = float {1.0}>()
    garbage = Constant<value = float {GARBAGE}>()
    last = Constant<value = int64[1] {-1}>()
    sequence = Constant<value = int64[1] {1}>()
    keep = Cast<to = 1>(MASK)
    padded = Sub(one, keep)
    offset = Mul(padded, garbage)
    offsets = Unsqueeze(offset, last)
    doubled = Mul(x, two)
    y = Add(doubled, offsets)
    weights = Unsqueeze(keep, last)
    kept = Mul(y, weights)
    pooled = ReduceSum<keepdims = 0>(kept, sequence)
}
"""


def model(mask: str, garbage: float) -> ir.Model:
    text = ENCODER.replace("MASK", mask).replace("GARBAGE", str(garbage))
    return ir.from_proto(onnx.parser.parse_model(text))


def feeds(mask: str = "attention_mask"):
    rng = np.random.default_rng(0)
    return [
        {
            "x": rng.standard_normal((1, 5, 4)).astype(np.float32),
            mask: np.array([[1, 1, 1, 0, 0]], dtype=np.int64),
        }
    ]


def test_padded_positions_of_sequence_outputs_are_left_out_of_the_comparison():
    comparison = reference_comparison(model("attention_mask", 0.0), feeds(), "samples", count=1)
    assert comparison.padding_mask == "attention_mask"
    assert "'attention_mask' is 0 (padding) left out" in comparison.description
    outputs = {output.name: output for output in comparison.measure(model("attention_mask", 100.0))}
    assert outputs["y"].max_abs_error == 0.0 and outputs["pooled"].max_abs_error == 0.0


def test_without_an_attention_mask_every_position_counts():
    comparison = reference_comparison(model("lengths", 0.0), feeds("lengths"), "samples", count=1)
    assert comparison.padding_mask is None
    outputs = {output.name: output for output in comparison.measure(model("lengths", 100.0))}
    assert outputs["y"].max_abs_error > 99.0 and outputs["pooled"].max_abs_error == 0.0


def test_the_sensitivity_ranking_leaves_padded_positions_out_too():
    """Fallback ranks layers by the noise they put on the outputs; at padded positions a model
    computes what it likes, which must not count there either."""
    from onnxopt import runtime
    from onnxopt.quantization.fallback import _output_noise_ratio

    for mask, noisy in (("attention_mask", False), ("lengths", True)):
        samples = feeds(mask)
        comparison = reference_comparison(model(mask, 0.0), samples, "samples", count=1)
        outputs = runtime.run(runtime.sample_session(model(mask, 100.0)), samples)
        assert (_output_noise_ratio(comparison, samples, outputs) > 1.0) is noisy
