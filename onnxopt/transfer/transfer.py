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
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from onnxopt.errors import InputError
from onnxopt.options import regular_expression_problem
from onnxopt.runtime import Feed
from onnxopt.transfer.checks import (
    OutputChange,
    activation_families,
    check_reproduces,
    output_changes,
    outputs,
    random_feeds,
    renamed,
    same_signature,
)
from onnxopt.transfer.files import pruning_section
from onnxopt.transfer.finetune import TuningResult
from onnxopt.transfer.fit import RemovedPositions, fitted, kept_slice, removed_by_pruning
from onnxopt.transfer.layers import Layer, find_layers
from onnxopt.transfer.match import MatchMode, Pairing, pair_layers
from onnxopt.transfer.sharing import retie, untie
from onnxopt.transfer.storage import UnstorableError

OnMismatch = Literal["error", "skip", "fit"]
WeightScales = Literal["keep", "widen"]
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
    for option, patterns in (("include", settings.include), ("exclude", settings.exclude)):
        problem = regular_expression_problem(patterns)
        if problem is not None:
            raise InputError(
                f"transfer's {option} {problem}",
                fix="escape the characters regular expressions treat specially, e.g. \\[ for [",
            )
    source = source.clone()
    LiftConstantsToInitializersPass(size_limit=0)(source)
    LiftConstantsToInitializersPass(size_limit=0)(target)
    copies = untie(target)
    check_feeds = list(feeds[:CHECK_SAMPLES]) or random_feeds(target, CHECK_SAMPLES)
    before = outputs(target, check_feeds)
    source_outputs = outputs(source, renamed(check_feeds, target, source), quiet=True)
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
    _refuse_ambiguous(pairing, target_layers)
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
    problems = _Problems()
    pairs = {id(t): (s, how) for t, s, how in pairing.pairs}
    exact = True
    for layer in target_layers:
        if id(layer) in pairs:
            other, how = pairs[id(layer)]
            exact &= _transfer_layer(layer, other, how, settings, removed, report, problems)
        else:
            report.slots += [
                SlotTransfer(slot.name, layer.node.name, role, left="no source layer matched")
                for role, slot in layer.slots.items()
            ]
            exact = False
    problems.raise_any()
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
        and same_signature(target, source)
        and activation_families(target) == activation_families(source)
    )
    after = outputs(target, check_feeds)
    report.check_samples = len(check_feeds)
    report.outputs = output_changes(target, before, after, source_outputs)
    if report.equivalent:
        check_reproduces(report.outputs)
    report.seconds = time.perf_counter() - start
    return report


@dataclasses.dataclass
class _Problems:
    """What stops a transfer, gathered over all layers so the error lists every tensor."""

    mismatched: list[str] = dataclasses.field(default_factory=list)
    unstorable: list[str] = dataclasses.field(default_factory=list)

    def raise_any(self) -> None:
        if self.mismatched:
            raise InputError(
                f"{len(self.mismatched)} target tensor(s) have another shape than their source",
                details=_listed(self.mismatched),
                fix="--on-mismatch fit (slice or pad) or skip, or leave them out with --exclude",
            )
        if self.unstorable:
            raise InputError(
                f"{len(self.unstorable)} target tensor(s) cannot store their new weights",
                details=_listed(self.unstorable),
                fix="where int8 scales would clip, --weight-scales widen, or transfer into the "
                "float model and quantize it again; or leave these out with --exclude",
            )


def _listed(lines: list[str]) -> list[str]:
    return lines[:LISTED] + ([f"... {len(lines) - LISTED} more"] if len(lines) > LISTED else [])


def _refuse_ambiguous(pairing: Pairing, target_layers: Sequence[Layer]) -> None:
    """Raise for target layers left unpaired because several source layers fit them alike."""
    paired = {id(t) for t, _, _ in pairing.pairs}
    ambiguous = {
        layer.name: pairing.ambiguous[layer.name]
        for layer in target_layers
        if id(layer) not in paired and layer.name in pairing.ambiguous
    }
    if ambiguous:
        raise InputError(
            f"{len(ambiguous)} target layer(s) match several source layers alike",
            details=_listed(
                [
                    f"{name}: candidates {', '.join(options[:4])}"
                    + (" ..." if len(options) > 4 else "")
                    for name, options in ambiguous.items()
                ]
            ),
            fix="pair them with --map FILE (lines 'TARGET_TENSOR SOURCE_TENSOR') or leave "
            "them out with --exclude",
        )


def _transfer_layer(
    layer: Layer,
    other: Layer,
    how: str,
    settings: TransferSettings,
    removed: RemovedPositions,
    report: TransferReport,
    problems: _Problems,
) -> bool:
    """Write ``other``'s values into ``layer``, a row per slot in ``report``; whether every
    value went in unchanged (no slice, fit or requantization, nothing left)."""
    exact = True
    values: dict[str, np.ndarray] = {}
    widen = settings.weight_scales == "widen"
    for role, slot in layer.slots.items():
        row = SlotTransfer(slot.name, layer.node.name, role)
        report.slots.append(row)
        counterpart = other.slots.get(role)
        if counterpart is None:
            row.left = f"the source layer {other.name} has no {role}"
            exact = False
            continue
        value = counterpart.read()
        if slot.stored == "none" and counterpart.stored == "none":
            report.slots.remove(row)  # no bias on either side: nothing to move
            continue
        notes = _storage_notes(counterpart.stored, slot.stored, widen)
        kept = kept_slice(value, slot.name, slot.axes or tuple(range(value.ndim)), removed)
        if kept is not None:
            value, kept_notes = kept
            notes += kept_notes
        if value.shape != slot.shape and settings.on_mismatch == "fit":
            result = fitted(value, slot.read(), 1 if _input_conv(layer, role) else None)
            if result is not None:
                value, note = result
                notes.append(note)
        if value.shape != slot.shape:
            row.left = f"shape {list(value.shape)} in the source, {list(slot.shape)} here"
            if settings.on_mismatch == "error":
                problems.mismatched.append(f"{slot.name} <- {counterpart.name}: {row.left}")
            exact = False
            continue
        exact &= all(_lossless(note) for note in notes)
        row.source, row.match = counterpart.name, how
        row.transform = ", ".join(notes) or "copy"
        values[role] = value
    if values:
        try:
            report.written += layer.write(values, widen=widen)
        except UnstorableError as error:
            problems.unstorable.append(str(error))
    return exact


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
    """The pruning report's section, which must list each group's tensors."""
    section = pruning_section(dict(pruning))
    if section is None or not all("tensors" in group for group in section["groups"]):
        raise InputError(
            "the pruning report lists no tensors per group",
            fix="give the JSON report (--report) of an onnxopt prune run of version 0.1 or later",
        )
    return section


def _storage_notes(source: str, target: str, widen: bool) -> list[str]:
    """What the stored forms of a source and a target tensor (``StoredTensor.stored``, with
    `` + BatchNorm, Mul`` for ops folded in) make the transfer do to the value."""
    notes = []
    source_ops = source.partition(" + ")[2].split(" [")[0]
    target_ops = target.partition(" + ")[2].split(" [")[0]
    if source_ops and source_ops != target_ops:
        notes.append(f"{source_ops} folded")
    if target_ops and source_ops != target_ops:
        notes.append(f"{target_ops} made identity")
    if source.endswith("[in, out]") != target.endswith("[in, out]"):
        notes.append("transposed")
    if target.startswith(("int", "uint")):
        notes.append(f"requantized to {target.split()[0]}")
        if widen:
            notes.append("scales widened where needed")
    return notes


def _lossless(note: str) -> bool:
    """A transform that changes how a value is stored, not what the network computes."""
    return note == "transposed" or note.endswith((" folded", " made identity"))


def _input_conv(layer: Layer, role: str) -> bool:
    return layer.kind == "conv" and role == "weight" and layer.reads_input
