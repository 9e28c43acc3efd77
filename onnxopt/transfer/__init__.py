"""Weight transfer between ONNX graphs: canonical layers, matching by name or structure,
shape policies, and the copy into float, pruned and int8 targets."""

from onnxopt.transfer.finetune import TransferTuning, TuningResult, finetune_transferred
from onnxopt.transfer.transfer import (
    OnMismatch,
    OutputChange,
    SlotTransfer,
    TransferReport,
    TransferSettings,
    WeightScales,
    transfer_weights,
)

__all__ = [
    "OnMismatch",
    "OutputChange",
    "SlotTransfer",
    "TransferReport",
    "TransferSettings",
    "TransferTuning",
    "TuningResult",
    "WeightScales",
    "finetune_transferred",
    "transfer_weights",
]
