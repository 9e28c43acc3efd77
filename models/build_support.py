"""What the model build scripts share: finding installed packages and writing reproducible npz files.

Used by models/build_mnist.py and benchmarks/build_models.py, which run in their own virtual
environment (they need torch), so this stays free of onnxopt.
"""

from __future__ import annotations

import importlib.util
import io
import sys
import zipfile
from pathlib import Path

import numpy as np


def package_directory(package: str, setup_guide: str) -> Path:
    """Locate an installed package's folder without importing it (its imports may need extras)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"package {package!r} is not installed; see {setup_guide} for the setup")
    return Path(next(iter(spec.submodule_search_locations)))


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write a compressed npz with fixed zip timestamps so rebuilds are byte-identical."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            entry = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(entry, buffer.getvalue())
