"""Remove Identity nodes."""

from __future__ import annotations

import onnx_ir as ir

from onnxopt.cleanup.identity import eliminate_identities
from onnxopt.passes.base import OnnxoptPass, PassResult


class EliminateIdentityPass(OnnxoptPass):
    """Remove Identity nodes from the main graph, subgraphs and functions, keeping output names.

    Safe because an Identity computes nothing: its consumers read its input instead. An Identity
    that makes a graph output is removed only when its input can take the output's name (it is
    computed in the same graph and is not an output itself); otherwise it stays.
    """

    name = "eliminate-identity"

    def call(self, model: ir.Model) -> PassResult:
        result = eliminate_identities(model)
        return PassResult(model, modified=bool(result.removed), changes=result.removed)
