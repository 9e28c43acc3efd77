"""Keep nodes out of reach of an onnxscript folder or rewriter for a while, with public API only."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import onnx_ir as ir

# Where nodes wait: a domain the model does not import. onnxscript's constant folder skips a
# node whose domain the model does not import, and a rewrite rule matches its own domain only.
HOLDING_DOMAIN = "onnxopt.held"


@contextlib.contextmanager
def held_back(model: ir.Model, nodes: Iterable[ir.Node]) -> Iterator[str]:
    """Move ``nodes`` into a domain the model does not import while the body runs.

    Every node gets its own domain back, whatever the body raises. Yields the holding domain.
    """
    domain = HOLDING_DOMAIN
    while domain in model.opset_imports:
        domain += "_"
    held = [(node, node.domain) for node in nodes]
    try:
        for node, _ in held:
            node.domain = domain
        yield domain
    finally:
        for node, original in held:
            node.domain = original
