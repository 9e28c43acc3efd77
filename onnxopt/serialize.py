"""Plain JSON data from onnxopt's typed results, in one place."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np


def json_data(value: Any) -> Any:
    """``value`` as data ``json.dumps`` takes: dataclasses become dicts, numpy values Python ones.

    JSON has no inf or nan: they become the strings "inf", "-inf" and "nan", which ``float()``
    reads back; None keeps meaning "not applicable".
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            field.name: json_data(getattr(value, field.name)) for field in dataclasses.fields(value)
        }
    if isinstance(value, Mapping):
        return {str(key): json_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_data(item) for item in value]
    if isinstance(value, np.ndarray):
        return json_data(value.tolist())
    if isinstance(value, np.generic):
        return json_data(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value
