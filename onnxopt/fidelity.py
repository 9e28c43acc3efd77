"""What every fidelity figure of a run is measured against: the original model's outputs on fixed
samples, computed once.

Validation and the repairs that search for a model meeting a budget (fallback) both measure
through one ``ReferenceComparison``: the same reference, samples, session settings and metric,
so a repair never reports a fidelity the written model does not have.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt import runtime
from onnxopt.metrics import (
    OutputFidelity,
    OutputPart,
    class_score_outputs,
    compare_outputs,
    output_parts,
)
from onnxopt.padding import padding_mask_input, token_rows
from onnxopt.runtime import Feed


@dataclasses.dataclass
class ReferenceComparison:
    """The reference model's outputs on fixed samples, to measure candidates against.

    Attributes:
        feeds: the samples; empty when no comparison can run.
        description: where the samples come from, for the report.
        reference_outputs: the reference's outputs, sample by sample.
        class_outputs: outputs that hold class scores, where top-1 agreement is measured.
        problem: why no comparison can run (the reference fails on every sample tried), or None.
        padding_mask: the input whose zeros mark padded positions (a transformer's attention
            mask), or None. Outputs of shape [batch, sequence, ...] are compared at the other
            positions only: what a model computes at a padded position is never used, and
            differs freely between two equally good models.
        parts: the parts of outputs a Concat joins (``metrics.output_parts``), each measured
            on its own too; none where padding is left out (the rows kept lose the axes).
    """

    feeds: list[Feed]
    description: str
    reference_outputs: list[list[np.ndarray]]
    class_outputs: frozenset[str]
    problem: str | None = None
    padding_mask: str | None = None
    parts: dict[str, list[OutputPart]] = dataclasses.field(default_factory=dict)

    def measure(
        self, model: ir.Model, rtol: float = 0.0, runtime_name: str = "onnxruntime"
    ) -> list[OutputFidelity]:
        """Fidelity of every output of ``model``, run in ``runtime_name`` (onnxruntime or
        openvino), against the reference, on the same samples."""
        session = runtime.sample_session(model, runtime_name)
        outputs = runtime.run(session, self.feeds)
        names = [output.name for output in session.get_outputs()]
        fidelity = compare_outputs(
            names,
            [
                self.unpadded(feed, sample)
                for feed, sample in zip(self.feeds, self.reference_outputs, strict=True)
            ],
            [self.unpadded(feed, sample) for feed, sample in zip(self.feeds, outputs, strict=True)],
            rtol=rtol,
            class_outputs=self.class_outputs,
            parts=self.parts,
        )
        del session, outputs
        runtime.release_freed_memory()
        return fidelity

    def unpadded(self, feed: Feed, outputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The outputs with the padded positions of [batch, sequence, ...] outputs left out."""
        return [token_rows(np.asarray(output), feed, self.padding_mask) for output in outputs]


def reference_comparison(
    reference: ir.Model | str | os.PathLike,
    feeds: Iterable[Feed] | None,
    description: str,
    count: int = 8,
    seed: int = 0,
    max_seconds: float | None = None,
    min_samples: int = 8,
    max_values: int | None = None,
) -> ReferenceComparison:
    """The reference's outputs on up to ``count`` of ``feeds``, or on random samples it runs on.

    Past ``min_samples``, stops taking samples once the reference has run ``max_seconds`` or its
    outputs hold ``max_values`` values: a slow model is compared on fewer samples rather than
    for minutes, and outputs as large as a detector's maps give stable figures from a few. Never raises for a reference that fails: the comparison then carries the reason in
    ``problem``, since a model cannot be blamed for failing where the original fails too.
    """
    model = reference if isinstance(reference, ir.Model) else ir.load(os.fspath(reference))
    classes = frozenset(class_score_outputs(model))
    mask = padding_mask_input(model)
    taken = list(itertools.islice(feeds, count)) if feeds is not None else []
    if not taken:
        taken, problem = runtime.runnable_random_feeds(model, count, seed)
        if problem is not None:
            return ReferenceComparison([], "no samples", [], classes, problem)
        description = "random samples (no data given)"
    session = runtime.sample_session(reference)
    start = time.perf_counter()
    used: list[Feed] = []
    outputs: list[list[np.ndarray]] = []
    values = 0
    step = runtime.cores()
    for first in range(0, len(taken), step):
        chunk = taken[first : first + step]
        try:
            chunk_outputs = runtime.run(session, chunk)
        except Exception as error:  # onnxruntime raises several unrelated types
            problem = f"the original model fails on {description}: {type(error).__name__}: {error}"
            return ReferenceComparison([], description, [], classes, problem)
        used.extend(chunk)
        outputs.extend(chunk_outputs)
        values += sum(np.asarray(output).size for sample in chunk_outputs for output in sample)
        if len(used) >= min_samples and (
            (max_seconds is not None and time.perf_counter() - start > max_seconds)
            or (max_values is not None and values >= max_values)
        ):
            break
    if mask is not None:
        description += f"; positions where '{mask}' is 0 (padding) left out"
    parts = output_parts(model) if mask is None else {}
    return ReferenceComparison(
        used, f"{len(used)} {description}", outputs, classes, None, mask, parts
    )
