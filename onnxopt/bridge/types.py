"""ONNX element types as torch dtypes, and tensors between numpy, onnx_ir and torch."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

_DTYPES = {
    ir.DataType.FLOAT: torch.float32,
    ir.DataType.DOUBLE: torch.float64,
    ir.DataType.FLOAT16: torch.float16,
    ir.DataType.BFLOAT16: torch.bfloat16,
    ir.DataType.INT8: torch.int8,
    ir.DataType.INT16: torch.int16,
    ir.DataType.INT32: torch.int32,
    ir.DataType.INT64: torch.int64,
    ir.DataType.UINT8: torch.uint8,
    ir.DataType.UINT16: torch.uint16,
    ir.DataType.UINT32: torch.uint32,
    ir.DataType.UINT64: torch.uint64,
    ir.DataType.BOOL: torch.bool,
}


def to_torch_dtype(onnx_type: int | ir.DataType) -> torch.dtype:
    """The torch dtype of an ONNX element type; ValueError for types torch has no dtype for."""
    data_type = ir.DataType(onnx_type)
    if data_type not in _DTYPES:
        raise ValueError(f"element type {data_type.name} has no torch dtype")
    return _DTYPES[data_type]


def supported_type(data_type: ir.DataType | None) -> bool:
    return data_type is None or data_type in _DTYPES


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """A torch tensor holding a copy of ``array`` (numpy's read-only and non-native arrays too)."""
    array = np.asarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("="))
    return torch.from_numpy(np.array(array, copy=True))


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        return tensor.detach().cpu().float().numpy()
    return tensor.detach().cpu().numpy()
