"""The expected top-1 agreement: an estimate a budget can rest on."""

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxopt.metrics import compare_outputs, expected_agreement, output_parts


def _scores(samples: int, classes: int, seed: int) -> np.ndarray:
    """Class scores with a clear leader or two, as a trained classifier's logits have."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(0.0, 1.0, (samples, classes))
    leaders = rng.integers(0, classes, (samples, 2))
    rows = np.arange(samples)
    scores[rows, leaders[:, 0]] += 6.0
    scores[rows, leaders[:, 1]] += rng.uniform(3.0, 6.5, samples)
    return scores


@pytest.mark.parametrize("spread", [0.15, 0.25])
def test_expected_agreement_follows_the_flips_when_the_top_classes_are_noisier(
    spread: float,
) -> None:
    # Quantization error grows with a score's size: on EfficientNet-Lite0 the top class's error
    # is about twice the error of the bulk of the classes, so the spread over every class
    # understates the noise that decides top-1 (that estimate gave 0.946 here where 0.907 of
    # the samples kept their class).
    reference = _scores(20000, 100, seed=0)
    rng = np.random.default_rng(1)
    noise = rng.normal(0.0, 1.0, reference.shape) * spread * (1.0 + 0.15 * np.maximum(reference, 0))
    candidate = reference + noise
    agreement = float(np.mean(reference.argmax(1) == candidate.argmax(1)))
    assert agreement < 0.96
    assert expected_agreement(reference, candidate) == pytest.approx(agreement, abs=0.02)


def test_expected_agreement_of_a_few_samples_is_steadier_than_counting_their_flips() -> None:
    reference = _scores(4000, 50, seed=2)
    rng = np.random.default_rng(3)
    candidate = reference + rng.normal(0.0, 0.5, reference.shape)
    truth = float(np.mean(reference.argmax(1) == candidate.argmax(1)))
    counted, expected = [], []
    for start in range(0, 4000, 32):
        part = slice(start, start + 32)
        counted.append(np.mean(reference[part].argmax(1) == candidate[part].argmax(1)))
        expected.append(expected_agreement(reference[part], candidate[part]))
    assert np.mean(expected) == pytest.approx(truth, abs=0.01)
    assert np.std(expected) < 0.5 * np.std(counted)


def test_expected_agreement_without_noise_is_one_and_two_classes_work() -> None:
    reference = _scores(64, 10, seed=4)
    assert expected_agreement(reference, reference.copy()) == 1.0
    pairs = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 0.9]])
    flipped = np.array([[2.0, 0.0], [0.0, 3.0], [0.8, 1.1]])
    assert expected_agreement(pairs, flipped) < 1.0
    assert expected_agreement(pairs, pairs) == 1.0
    ties = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
    assert expected_agreement(ties, ties) == 1.0


def test_expected_agreement_of_a_large_vocabulary_matches_the_exact_sum() -> None:
    """Classes far below the top are left out of the sum and rows are taken in chunks: the
    figure must stay the one every class gives, computed in one go."""
    from onnxopt import metrics

    reference = _scores(600, 3000, seed=5)
    candidate = reference + np.random.default_rng(6).normal(0.0, 0.6, reference.shape)
    error = candidate - reference
    top = reference.argmax(1)
    rows = np.arange(len(reference))
    rivals = np.argsort(-reference, axis=1, kind="stable")[:, 1 : metrics.COMPETING_CLASSES]
    margin_noise = np.take_along_axis(error, rivals, axis=1) - error[rows, top][:, None]
    spread = np.sqrt(np.mean(margin_noise**2, axis=1, keepdims=True))
    scaled = (reference[rows, top][:, None] - reference) / spread
    passed = 0.5 * np.vectorize(math.erfc)(scaled / math.sqrt(2.0))
    passed[rows, top] = 0.0
    exact = float(np.mean(np.prod(1.0 - passed, axis=1)))
    assert exact < 0.99
    assert expected_agreement(reference, candidate) == pytest.approx(exact, rel=1e-9)


def test_sequence_class_scores_count_one_decision_per_step() -> None:
    # A CTC text recognizer's [steps, batch, classes]: each step's top class is a character.
    reference = [_scores(20, 30, seed=7).reshape(20, 1, 30) for _ in range(2)]
    candidate = [array.copy() for array in reference]
    flipped = candidate[1][3, 0]
    flipped[[flipped.argmax(), flipped.argmin()]] = flipped[[flipped.argmin(), flipped.argmax()]]
    [fidelity] = compare_outputs(
        ["logits"], [[a] for a in reference], [[a] for a in candidate], 0.0, {"logits"}
    )
    assert fidelity.top1_agreement == pytest.approx(39 / 40)
    assert fidelity.expected_top1_agreement < 1.0


JOINED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, N, 3] a, float[2, N, 5] b, float[2, 4, M] c) => (float[2, N, 8] joined, y)
{
    joined = Concat<axis = -1>(a, b)
    y = Concat<axis = 2>(c, c)
}
"""


def test_output_parts_are_the_concat_inputs_of_known_size():
    # The second output joins parts whose sizes on the axis are unknown: it is measured whole.
    model = ir.from_proto(onnx.parser.parse_model(JOINED))
    parts = output_parts(model)
    assert [part.name("joined") for part in parts["joined"]] == [
        "joined[:, :, 0:3]",
        "joined[:, :, 3:8]",
    ]
    assert "y" not in parts
    array = np.arange(2 * 1 * 8).reshape(2, 1, 8)
    assert parts["joined"][1].of(array).tolist() == array[:, :, 3:8].tolist()


SCALES_JOINED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 4, 2, 2] box_a, float[1, 2, 2, 2] score_a, float[1, 4, 1, 2] box_b,
   float[1, 2, 1, 2] score_b) => (float[1, 6, 6] output) <int64[3] flat = {1, 6, -1}> {
    a = Concat<axis = 1>(box_a, score_a)
    b = Concat<axis = 1>(box_b, score_b)
    flat_a = Reshape(a, flat)
    flat_b = Reshape(b, flat)
    scales = Concat<axis = 2>(flat_a, flat_b)
    output = Transpose<perm = [0, 2, 1]>(scales)
}
"""


def test_output_parts_are_followed_through_reshapes_other_joins_and_transposes():
    # A YOLOX-like head: boxes and scores joined per scale on the channel axis, each scale
    # flattened, the scales joined, then transposed: [1, anchors, 4 + 2].
    model = ir.from_proto(onnx.parser.parse_model(SCALES_JOINED))
    names = [part.name("output") for part in output_parts(model)["output"]]
    assert names == ["output[:, 0:4]", "output[:, 4:6]", "output[:, :, 0:4]", "output[:, :, 4:6]"]


def test_output_parts_need_the_same_parts_in_every_joined_input():
    # The scales join different parts on the channel axis: only the scales are parts.
    text = SCALES_JOINED.replace("float[1, 4, 1, 2] box_b", "float[1, 3, 1, 2] box_b").replace(
        "float[1, 2, 1, 2] score_b", "float[1, 3, 1, 2] score_b"
    )
    model = ir.from_proto(onnx.parser.parse_model(text))
    names = [part.name("output") for part in output_parts(model)["output"]]
    assert names == ["output[:, 0:4]", "output[:, 4:6]"]
