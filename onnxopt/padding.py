"""Padded positions of a transformer's batch: positions whose attention mask is 0 carry no
token, so no figure should be measured on them.

Sentences padded to a common length are mostly padding (the benchmark's MiniLM samples: 16 of 64
positions hold tokens). A padded position's hidden state is whatever the network computes for
it, and nothing reads it (pooling and attention leave it out), so a least-squares fit or a
channel score taken over all positions spends most of its rows on states nobody uses.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt import runtime
from onnxopt.runtime import Feed


def padding_mask_input(model: ir.Model) -> str | None:
    """The integer or boolean [batch, sequence] input named as an attention mask, if any.

    Transformer exporters name it ``attention_mask`` (or ``*_mask``); its zeros mark padding.
    """
    for spec in runtime.input_specs(model):
        if (
            "attention_mask" in spec.name.lower()
            and spec.dtype.kind in "biu"
            and (spec.shape is None or len(spec.shape) == 2)
        ):
            return spec.name
    return None


def token_rows(array, feed: Feed, mask: str | None):
    """``array``'s positions that hold tokens, as rows (tokens, *rest), when its leading axes
    are the [batch, sequence] of ``feed``'s attention mask ``mask``; else ``array`` unchanged."""
    if mask is None or mask not in feed:
        return array
    return at_tokens(array, np.asarray(feed[mask]) != 0)


def at_tokens(array, keep):
    """``array`` (numpy or torch) at the positions where ``keep`` is true, as rows, when its
    leading axes are keep's shape; else ``array`` unchanged (a pooled output, a None keep)."""
    if (
        keep is None
        or array.ndim <= keep.ndim
        or tuple(array.shape[: keep.ndim]) != tuple(keep.shape)
    ):
        return array
    return array[keep]
