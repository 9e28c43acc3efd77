"""`optimize --plot`: where quantization loses accuracy, as a picture (matplotlib, optional)."""

from __future__ import annotations

import math
import os

from onnxopt.errors import InputError
from onnxopt.quantization.state import QuantizationState

INSTALL_HINT = "pip install 'onnxopt[plot]' (or pip install matplotlib)"


def require_matplotlib() -> None:
    """Fail before any work when the plot cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise InputError(
            "--plot needs matplotlib, which is not installed", fix=INSTALL_HINT
        ) from error


def plot_layers(state: QuantizationState, path: str | os.PathLike) -> None:
    """Per-layer SQNR of the written model in graph order, the layers kept float, the budget.

    Each bar is one quantized tensor's SQNR against the float model (noise from everything
    quantized before it included), so the chart shows where the error grows. Layers kept float
    by the fallback are listed in the title, and its budget on the outputs is a dashed line (a
    cosine budget as the SQNR it amounts to).
    """
    budget_sqnr_db = _budget_sqnr_db(state)
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    order = {value.name: index for index, value in enumerate(_graph_values(state))}
    layers = sorted(state.layers, key=lambda layer: order.get(layer.tensor, math.inf))
    values = [min(layer.sqnr_db, 80.0) for layer in layers]
    figure, axes = pyplot.subplots(figsize=(max(6.0, 0.18 * len(layers) + 2.0), 4.0))
    colors = ["#c0392b" if value < (budget_sqnr_db or 0.0) else "#2e86c1" for value in values]
    axes.bar(range(len(layers)), values, color=colors)
    axes.set_xticks(range(len(layers)))
    axes.set_xticklabels([layer.node or layer.tensor for layer in layers], rotation=90, fontsize=6)
    axes.set_ylabel("SQNR against float (dB)")
    if budget_sqnr_db is not None:
        axes.axhline(budget_sqnr_db, color="#7f8c8d", linestyle="--", label="output budget")
        axes.legend(loc="upper right")
    kept = state.fallback.kept_float if state.fallback is not None else []
    title = f"{len(layers)} quantized tensors"
    if kept:
        shown = ", ".join(kept[:6]) + (f" and {len(kept) - 6} more" if len(kept) > 6 else "")
        title += f"; kept float: {shown}"
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(os.fspath(path), dpi=120)
    pyplot.close(figure)


def cosine_as_sqnr_db(cosine: float) -> float:
    """The SQNR an output with this cosine similarity has when the noise is uncorrelated:
    cos = 1 / sqrt(1 + N/S), so SQNR = -10 log10(1 / cos^2 - 1)."""
    if cosine >= 1.0:
        return math.inf
    return -10.0 * math.log10(1.0 / max(cosine, 1e-12) ** 2 - 1.0)


def _budget_sqnr_db(state: QuantizationState) -> float | None:
    if state.fallback is None:
        return None
    budget = state.fallback.budget
    limits = [budget.min_sqnr_db] if budget.min_sqnr_db is not None else []
    if budget.min_cosine is not None:
        limits.append(cosine_as_sqnr_db(budget.min_cosine))
    return max(limits, default=None)


def _graph_values(state: QuantizationState):
    graph = state.float_model.graph
    yield from graph.inputs
    for node in graph:
        yield from node.outputs
