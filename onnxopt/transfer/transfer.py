"""Copy learned weights from a source graph into a target graph.

Both graphs are read as canonical layers (``layers.find_layers``), paired by name, structure
or an explicit map (``match.pair_layers``), and each target slot gets its source's value,
sliced to the channels a pruned target kept, fitted to another shape when asked, and stored
the target's way (transposed back, into a BatchNorm made an identity, requantized with the
target's int8 scales). A transfer that pairs nothing, a pair that is ambiguous, a shape that
differs under ``on_mismatch = "error"``, or a result that does not reproduce the source's
outputs where the two graphs are the same network, raises instead of writing garbage.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from onnxopt.errors import InputError, ProcessingError
from onnxopt.metrics import OutputFidelity, compare_outputs
from onnxopt.runtime import Feed, create_session, run, runnable_random_feeds
from onnxopt.transfer.finetune import TuningResult
from onnxopt.transfer.fit import fitted, kept_slice, removed_by_pruning
from onnxopt.transfer.layers import Layer, RequantizationError, find_layers
from onnxopt.transfer.match import MatchMode, pair_layers
from onnxopt.transfer.sharing import retie, untie

logger = logging.getLogger(__name__)

OnMismatch = Literal["error", "skip", "fit"]
WeightScales = Literal["keep", "widen"]
# Where source and target are one network, the result must reproduce the source this well:
# noise a millionth of the output's power (float32 reordering and BatchNorm folding stay
# far below it; a scale or a layer the match missed does not).
EQUIVALENT_MIN_SQNR_DB = 60.0
CHECK_SAMPLES = 4
LISTED = 10


@dataclasses.dataclass(frozen=True)
class TransferSettings:
    """How to transfer.

    Attributes:
        match: ``auto`` (names where unambiguous, structure elsewhere), ``name`` or ``structure``.
        on_mismatch: a slot whose shape differs: ``error``, ``skip`` it, or ``fit`` (slice,
            pad, adapt an input convolution's channels).
        include: regular expressions; only target layers whose node or tensor names match one
            receive weights (all when empty).
        exclude: regular expressions; target layers whose node or tensor names match keep theirs.
        mapping: target tensor name -> source tensor name, pairs taken before any matching.
        pruning: the pruning report of a pruned target (its ``pruning`` JSON section, or the
            whole report): source weights are sliced to the channels it kept.
        weight_scales: an int8 target's weight scales: ``keep`` them (new weights they would
            clip are an error) or ``widen`` those that would clip (with the int32 biases'
            scales; the activations' ranges stay).
    """

    match: MatchMode = "auto"
    on_mismatch: OnMismatch = "error"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    mapping: Mapping[str, str] = dataclasses.field(default_factory=dict)
    pruning: Mapping[str, Any] | None = None
    weight_scales: WeightScales = "keep"


@dataclasses.dataclass
class SlotTransfer:
    """One target tensor: where its new value came from and how, or why it kept its own.

    Attributes:
        target: the target tensor's name (``<weight>:bias`` for a bias the layer lacks).
        layer: the target node.
        role: ``weight``, ``bias``, ``scale`` or ``input<i>``.
        source: the source tensor, or None.
        match: ``name``, ``structure`` or ``map``; None when unpaired.
        transform: what was done to the source value (``copy``, ``BatchNorm folded``, ...).
        left: why the tensor kept its value; None when it was transferred.
    """

    target: str
    layer: str
    role: str
    source: str | None = None
    match: str | None = None
    transform: str = ""
    left: str | None = None


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


@dataclasses.dataclass
class TransferReport:
    """What ``transfer_weights`` did (and the fine-tune after it, where one ran).

    ``written`` names the target initializers that now hold source values (a layer's
    BatchNorm parameters among them when the values went into one).
    """

    slots: list[SlotTransfer] = dataclasses.field(default_factory=list)
    target_layers: int = 0
    source_layers: int = 0
    paired_layers: int = 0
    unused_source: list[str] = dataclasses.field(default_factory=list)
    written: list[str] = dataclasses.field(default_factory=list)
    equivalent: bool = False
    outputs: list[OutputChange] = dataclasses.field(default_factory=list)
    check_samples: int = 0
    seconds: float = 0.0
    tuning: TuningResult | None = None

    @property
    def transferred(self) -> int:
        return sum(slot.left is None for slot in self.slots)

    def counts(self) -> dict[str, int]:
        by_match: dict[str, int] = {}
        for slot in self.slots:
            key = slot.match if slot.left is None else "left"
            by_match[key] = by_match.get(key, 0) + 1
        return by_match


def transfer_weights(
    target: ir.Model,
    source: ir.Model,
    settings: TransferSettings = TransferSettings(),
    feeds: Sequence[Feed] = (),
) -> TransferReport:
    """Write ``source``'s weights into ``target`` (in place; ``source`` is not changed).

    ``feeds``: samples of the target's inputs for the before/after comparison and the check
    that equivalent graphs give the source's outputs (random ones when empty). Raises
    InputError for nothing in common, ambiguous pairs, unknown names in the map, shapes that
    differ under ``error``, or int8 storage that would clip; ProcessingError when graphs that
    are one network do not reproduce the source's outputs. ``target`` may be partly changed
    when it raises: give a copy.
    """
    start = time.perf_counter()
    source = source.clone()
    LiftConstantsToInitializersPass(size_limit=0)(source)
    LiftConstantsToInitializersPass(size_limit=0)(target)
    copies = untie(target)
    check_feeds = list(feeds[:CHECK_SAMPLES]) or _random_feeds(target)
    before = _outputs(target, check_feeds)
    source_outputs = _outputs(source, _renamed(check_feeds, target, source), quiet=True)
    target_layers = [layer for layer in find_layers(target) if _selected(layer, settings)]
    source_layers = find_layers(source)
    if not target_layers:
        raise InputError(
            "no target layer holds learned weights"
            + (" that --include/--exclude select" if settings.include or settings.exclude else ""),
            fix="check the target model and the include/exclude patterns",
        )
    explicit = _explicit_pairs(settings.mapping, target_layers, source_layers)
    pairing = pair_layers(
        target_layers, source_layers, target.graph, source.graph, settings.match, explicit
    )
    paired = {id(t) for t, _, _ in pairing.pairs}
    ambiguous = {name: options for name, options in pairing.ambiguous.items()}
    ambiguous = {
        layer.name: ambiguous[layer.name]
        for layer in target_layers
        if id(layer) not in paired and layer.name in ambiguous
    }
    if ambiguous:
        raise InputError(
            f"{len(ambiguous)} target layer(s) match several source layers alike",
            details=[
                f"{name}: candidates {', '.join(options[:4])}"
                + (" ..." if len(options) > 4 else "")
                for name, options in list(ambiguous.items())[:LISTED]
            ],
            fix="pair them with --map FILE (lines 'TARGET_TENSOR SOURCE_TENSOR') or leave "
            "them out with --exclude",
        )
    if not pairing.pairs:
        raise InputError(
            "the source and target graphs have no layer in common "
            f"({len(target_layers)} target and {len(source_layers)} source layers, "
            f"matched by {settings.match})",
            fix="check that the source is the right model, or pair tensors with --map FILE",
        )
    removed = removed_by_pruning(_pruning_section(settings.pruning)) if settings.pruning else {}
    report = TransferReport(
        target_layers=len(target_layers),
        source_layers=len(source_layers),
        paired_layers=len(pairing.pairs),
    )
    used_source = {id(s) for _, s, _ in pairing.pairs}
    report.unused_source = [layer.name for layer in source_layers if id(layer) not in used_source]
    exact = True
    mismatched: list[str] = []
    clipping: list[str] = []
    pairs = {id(t): (s, how) for t, s, how in pairing.pairs}
    for layer in target_layers:
        if id(layer) not in pairs:
            report.slots += [
                SlotTransfer(slot.name, layer.node.name, role, left="no source layer matched")
                for role, slot in layer.slots.items()
            ]
            exact = False
            continue
        other, how = pairs[id(layer)]
        values: dict[str, np.ndarray] = {}
        rows = []
        for role, slot in layer.slots.items():
            row = SlotTransfer(slot.name, layer.node.name, role)
            rows.append(row)
            counterpart = other.slots.get(role)
            if counterpart is None:
                row.left = f"the source layer {other.name} has no {role}"
                exact = False
                continue
            row.source, row.match = counterpart.name, how
            value = counterpart.read()
            notes = _storage_notes(
                counterpart.stored, slot.stored, settings.weight_scales == "widen"
            )
            kept = kept_slice(value, slot.name, slot.axes or tuple(range(value.ndim)), removed)
            if kept is not None:
                value, kept_notes = kept
                notes += kept_notes
                exact = False
            if value.shape != slot.shape:
                exact = False
                if settings.on_mismatch == "fit":
                    result = fitted(value, slot.read(), 1 if _input_conv(layer, role) else None)
                    if result is not None:
                        value, note = result
                        notes.append(note)
                if value.shape != slot.shape:
                    reason = f"shape {list(value.shape)} in the source, {list(slot.shape)} here"
                    if settings.on_mismatch == "error":
                        mismatched.append(f"{slot.name} <- {counterpart.name}: {reason}")
                    row.source = row.match = None
                    row.left = reason
                    continue
            if slot.stored.startswith(("int", "uint")):
                exact = False
            row.transform = ", ".join(notes) or "copy"
            values[role] = value
        if values:
            try:
                report.written += layer.write(values, widen=settings.weight_scales == "widen")
            except (RequantizationError, ValueError) as error:
                clipping.append(str(error))
        report.slots += rows
    if mismatched:
        raise InputError(
            f"{len(mismatched)} target tensor(s) have another shape than their source",
            details=mismatched[:LISTED] + (["..."] if len(mismatched) > LISTED else []),
            fix="--on-mismatch fit (slice or pad) or skip, or leave them out with --exclude",
        )
    if clipping:
        raise InputError(
            f"{len(clipping)} target tensor(s) cannot store their new weights",
            details=clipping[:LISTED],
            fix="--weight-scales widen (raise the scales that would clip), or transfer into "
            "the float model and quantize it again, or leave these out with --exclude",
        )
    if report.transferred == 0:
        raise InputError(
            "no target tensor received a weight: every paired layer was left",
            details=[f"{slot.target}: {slot.left}" for slot in report.slots[:LISTED]],
            fix="--on-mismatch fit, or check that the source is the right model",
        )
    retie(target, copies)
    report.equivalent = (
        exact
        and not report.unused_source
        and _same_signature(target, source)
        and activation_families(target) == activation_families(source)
    )
    after = _outputs(target, check_feeds)
    report.check_samples = len(check_feeds)
    report.outputs = _output_changes(target, before, after, source_outputs)
    if report.equivalent:
        _check_reproduces(report.outputs)
    report.seconds = time.perf_counter() - start
    return report


def _selected(layer: Layer, settings: TransferSettings) -> bool:
    names = [layer.node.name or "", *(slot.name for slot in layer.slots.values())]
    if settings.include and not any(
        re.search(pattern, name) for pattern in settings.include for name in names
    ):
        return False
    return not any(re.search(pattern, name) for pattern in settings.exclude for name in names)


def _explicit_pairs(
    mapping: Mapping[str, str], target: Sequence[Layer], source: Sequence[Layer]
) -> dict[str, str]:
    """The map's tensor pairs as layer pairs (by ``Layer.name``); unknown names raise."""
    target_by_tensor = {slot.name: layer for layer in target for slot in layer.slots.values()}
    source_by_tensor = {slot.name: layer for layer in source for slot in layer.slots.values()}
    unknown = [f"target tensor '{name}'" for name in mapping if name not in target_by_tensor]
    unknown += [
        f"source tensor '{name}'" for name in mapping.values() if name not in source_by_tensor
    ]
    if unknown:
        raise InputError(
            f"the map names {len(unknown)} tensor(s) that hold no learned weight",
            details=unknown[:LISTED],
            fix="name the weight initializers as 'onnxopt inspect' lists them "
            "(a layer's weight, bias or scale)",
        )
    pairs: dict[str, str] = {}
    for target_name, source_name in mapping.items():
        layer = target_by_tensor[target_name].name
        chosen = source_by_tensor[source_name].name
        if pairs.get(layer, chosen) != chosen:
            raise InputError(
                f"the map pairs target layer {layer} with two source layers",
                details=[pairs[layer], chosen],
                fix="give each target layer one source layer",
            )
        pairs[layer] = chosen
    return pairs


def _pruning_section(pruning: Mapping[str, Any]) -> Mapping[str, Any]:
    section = pruning.get("pruning", pruning) if "groups" not in pruning else pruning
    if not isinstance(section, Mapping) or not all(
        "tensors" in group for group in section.get("groups", [])
    ):
        raise InputError(
            "the pruning report lists no tensors per group",
            fix="give the JSON report (--report) of an onnxopt prune run of version 0.1 or later",
        )
    return section


def _storage_notes(source: str, target: str, widen: bool) -> list[str]:
    notes = []
    if source.endswith("+ BatchNorm") and not target.endswith("+ BatchNorm"):
        notes.append("BatchNorm folded")
    if target.endswith("+ BatchNorm"):
        notes.append("into the BatchNorm" if not source.endswith("+ BatchNorm") else "")
    if source.endswith("[in, out]") != target.endswith("[in, out]"):
        notes.append("transposed")
    if target.startswith(("int", "uint")):
        notes.append(f"requantized to {target.split()[0]}")
        if widen:
            notes.append("scales widened where needed")
    return [note for note in notes if note]


def _input_conv(layer: Layer, role: str) -> bool:
    return layer.kind == "conv" and role == "weight" and layer.reads_input


def _random_feeds(model: ir.Model) -> list[Feed]:
    feeds, failure = runnable_random_feeds(model, CHECK_SAMPLES)
    if failure is not None:
        logger.warning("the target's outputs are not compared: %s", failure)
    return feeds


def _renamed(feeds: Sequence[Feed], target: ir.Model, source: ir.Model) -> list[Feed]:
    """The target's samples under the source's input names (inputs paired by position)."""
    if len(target.graph.inputs) != len(source.graph.inputs):
        return []
    names = {
        mine.name: theirs.name
        for mine, theirs in zip(target.graph.inputs, source.graph.inputs, strict=True)
    }
    return [{names[name]: array for name, array in feed.items()} for feed in feeds]


def _outputs(
    model: ir.Model, feeds: Sequence[Feed], quiet: bool = False
) -> list[list[np.ndarray]] | None:
    if not feeds:
        return None
    try:
        return run(create_session(model), feeds)
    except Exception as error:  # onnxruntime raises several unrelated types
        log = logger.debug if quiet else logger.warning
        log("cannot run '%s' on the check samples: %s", model.graph.name, error)
        return None


def _same_signature(target: ir.Model, source: ir.Model) -> bool:
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


# Nonlinear ops by the function they compute, whatever the op or fusion that holds it: two
# graphs whose layers all pair are one network only when they compute the same functions.
FAMILIES = {
    "Erf": "Gelu",
    "Gelu": "Gelu",
    "BiasGelu": "Gelu",
    "FastGelu": "Gelu",
    "QuickGelu": "Gelu",
    "Relu": "Relu",
    "LeakyRelu": "LeakyRelu",
    "Elu": "Elu",
    "Selu": "Selu",
    "Sigmoid": "Sigmoid",
    "HardSigmoid": "HardSigmoid",
    "HardSwish": "HardSwish",
    "Tanh": "Tanh",
    "Softmax": "Softmax",
    "LogSoftmax": "LogSoftmax",
    "Softplus": "Softplus",
    "Mish": "Mish",
    "Clip": "Clip",
    "Exp": "Exp",
    "Log": "Log",
    "Sqrt": "Sqrt",
    "Sin": "Sin",
    "Cos": "Cos",
}


def activation_families(model: ir.Model) -> frozenset[str]:
    """The nonlinear functions the main graph computes (FAMILIES), fused activations included."""
    found = set()
    for node in model.graph:
        family = FAMILIES.get(node.op_type)
        if family is not None:
            found.add(family)
        if node.op_type in ("FusedConv", "FusedGemm") and "activation" in node.attributes:
            name = node.attributes.get_string("activation")
            found.add(FAMILIES.get(name, name))
    return frozenset(found)


def _output_changes(
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


def _check_reproduces(outputs: Sequence[OutputChange]) -> None:
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
