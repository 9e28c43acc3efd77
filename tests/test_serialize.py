from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from onnxopt.serialize import json_data


@dataclasses.dataclass
class Inner:
    values: np.ndarray
    ratio: float


@dataclasses.dataclass
class Outer:
    name: str
    inner: Inner
    items: tuple[int, ...]
    path: Path
    count: np.int64


def test_json_data_is_plain_json_and_non_finite_numbers_read_back():
    outer = Outer("a", Inner(np.array([1.5, 2.0]), math.inf), (1, 2), Path("m.onnx"), np.int64(3))
    data = json.loads(json.dumps(json_data(outer), allow_nan=False))
    assert data == {
        "name": "a",
        "inner": {"values": [1.5, 2.0], "ratio": "inf"},
        "items": [1, 2],
        "path": "m.onnx",
        "count": 3,
    }
    assert float(data["inner"]["ratio"]) == math.inf
    assert json_data({"nan": float("nan")}) == {"nan": "nan"}
