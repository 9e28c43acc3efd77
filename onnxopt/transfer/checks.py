"""What a transfer changed in the outputs, and whether source and target are one network.

Two graphs whose layers all pair one to one with the same shapes, that take and give the same
tensors and compute the same nonlinear functions, are taken for one network: the result must
then reproduce the source's outputs, or the transfer is wrong and must not be written.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.errors import ProcessingError
from onnxopt.metrics import OutputFidelity, compare_outputs
from onnxopt.runtime import Feed, create_session, run, runnable_random_feeds

logger = logging.getLogger(__name__)

# Where source and target are one network, the result must reproduce the source this well:
# noise a millionth of the output's power (float32 reordering and BatchNorm folding stay
# far below it; a scale or a layer the match missed does not).
EQUIVALENT_MIN_SQNR_DB = 60.0


@dataclasses.dataclass
class OutputChange:
    """One target output on the check samples: its cosine with the source model's output
    before and after the transfer (None where the shapes differ), its SQNR against the
    source's after, and its cosine with its own output before the transfer."""

    name: str
    cosine_with_source_before: float | None
    cosine_with_source_after: float | None
    cosine_with_target_before: float
    sqnr_db_with_source_after: float | None = None


def random_feeds(model: ir.Model, count: int) -> list[Feed]:
    """Random samples the target runs on, for when the caller gave none (none, with a
    warning, when it runs on none)."""
    feeds, failure = runnable_random_feeds(model, count)
    if failure is not None:
        logger.warning("the target's outputs are not compared: %s", failure)
    return feeds


def renamed(feeds: Sequence[Feed], target: ir.Model, source: ir.Model) -> list[Feed]:
    """The target's samples under the source's input names (inputs paired by position)."""
    if len(target.graph.inputs) != len(source.graph.inputs):
        return []
    names = {
        mine.name: theirs.name
        for mine, theirs in zip(target.graph.inputs, source.graph.inputs, strict=True)
    }
    return [{names[name]: array for name, array in feed.items()} for feed in feeds]


def outputs(
    model: ir.Model, feeds: Sequence[Feed], quiet: bool = False
) -> list[list[np.ndarray]] | None:
    """The model's outputs on ``feeds`` in onnxruntime; None without feeds or when it fails
    on them (logged: a warning, or only for debugging when ``quiet``)."""
    if not feeds:
        return None
    try:
        return run(create_session(model), feeds)
    except Exception as error:  # onnxruntime raises several unrelated types
        log = logger.debug if quiet else logger.warning
        log("cannot run '%s' on the check samples: %s", model.graph.name, error)
        return None


def same_signature(target: ir.Model, source: ir.Model) -> bool:
    """Whether the graphs take and give the same tensors: types, ranks, and the sizes both
    fix (one export may leave the batch free where the other fixes it)."""

    def signature(model: ir.Model) -> list[tuple]:
        return [
            (value.dtype, None if value.shape is None else tuple(value.shape))
            for value in (*model.graph.inputs, *model.graph.outputs)
        ]

    def agree(a: tuple, b: tuple) -> bool:
        if a[0] != b[0] or (a[1] is None) != (b[1] is None):
            return False
        if a[1] is None:
            return True
        return len(a[1]) == len(b[1]) and all(
            x == y or not isinstance(x, int) or not isinstance(y, int)
            for x, y in zip(a[1], b[1], strict=True)
        )

    mine, theirs = signature(target), signature(source)
    return len(mine) == len(theirs) and all(agree(a, b) for a, b in zip(mine, theirs, strict=True))


# Activations by the function they are built from, whatever op or fusion holds them: two
# graphs whose layers all pair are one network only when they apply the same activations.
# (Square roots and the like are left out: a LayerNorm spelled out has them, a fused one not.)
FAMILIES = {
    "Erf": "Gelu",
    "Gelu": "Gelu",
    "BiasGelu": "Gelu",
    "FastGelu": "Tanh",  # the tanh approximation, as exporters spell it out
    "QuickGelu": "Sigmoid",  # x * sigmoid(1.702 x)
    "Relu": "Relu",
    "LeakyRelu": "LeakyRelu",
    "Elu": "Elu",
    "Selu": "Selu",
    "Sigmoid": "Sigmoid",
    "HardSigmoid": "HardSigmoid",
    "HardSwish": "HardSigmoid",  # x * HardSigmoid(x)
    "Tanh": "Tanh",
    "Softmax": "Softmax",
    "LogSoftmax": "LogSoftmax",
    "Softplus": "Softplus",
    "Mish": "Mish",
    "Clip": "Clip",
}


def activation_families(model: ir.Model) -> frozenset[str]:
    """The nonlinear functions the main graph computes (FAMILIES), fused activations included."""
    found = set()
    for node in model.graph:
        family = FAMILIES.get(node.op_type)
        if node.op_type == "Gelu" and node.attributes.get_string("approximate", "none") == "tanh":
            family = "Tanh"
        if family is not None:
            found.add(family)
        if node.op_type in ("FusedConv", "FusedGemm") and "activation" in node.attributes:
            name = node.attributes.get_string("activation")
            found.add(FAMILIES.get(name, name))
    return frozenset(found)


def output_changes(
    target: ir.Model,
    before: list[list[np.ndarray]] | None,
    after: list[list[np.ndarray]] | None,
    source: list[list[np.ndarray]] | None,
) -> list[OutputChange]:
    if before is None or after is None:
        return []
    names = [value.name for value in target.graph.outputs]
    with_before = compare_outputs(names, before, after)
    comparable = source is not None and all(
        len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b, strict=True))
        for a, b in zip(source, after, strict=True)
    )
    with_source_before: list[OutputFidelity | None] = [None] * len(names)
    with_source_after: list[OutputFidelity | None] = [None] * len(names)
    if comparable:
        with_source_before = compare_outputs(names, source, before)
        with_source_after = compare_outputs(names, source, after)
    return [
        OutputChange(
            name,
            None if b is None else b.cosine,
            None if a is None else a.cosine,
            own.cosine,
            None if a is None else a.sqnr_db,
        )
        for name, b, a, own in zip(
            names, with_source_before, with_source_after, with_before, strict=True
        )
    ]


def check_reproduces(outputs: Sequence[OutputChange]) -> None:
    wrong = [
        change
        for change in outputs
        if change.sqnr_db_with_source_after is not None
        and change.sqnr_db_with_source_after < EQUIVALENT_MIN_SQNR_DB
    ]
    if wrong:
        raise ProcessingError(
            "every weight was transferred between what look like one network, but the "
            "result does not reproduce the source's outputs",
            details=[
                f"{change.name}: SQNR {change.sqnr_db_with_source_after:.1f} dB against the "
                f"source's (cosine {change.cosine_with_source_after:.6f})"
                for change in wrong
            ],
            fix="pair the layers explicitly with --map FILE, or report the two models as a bug",
        )
