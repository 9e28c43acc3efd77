"""The files a transfer reads beside the models: a map of tensor pairs and a pruning report."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from onnxopt.errors import InputError


def read_map(path: str | os.PathLike) -> dict[str, str]:
    """Tensor pairs, target name to source name: a JSON object, or a text file with one
    pair a line (``TARGET SOURCE``; blank lines and ``#`` comments skipped)."""
    text = _read(path, "map")
    if text.lstrip().startswith("{"):
        try:
            pairs = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"map '{path}' is not valid JSON: {error}", fix=MAP_FIX) from None
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in pairs.items()):
            raise InputError(f"map '{path}' must map names to names", fix=MAP_FIX)
        return pairs
    pairs = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        if len(words) != 2:
            raise InputError(f"map '{path}', line {number}: '{line}' is not two names", fix=MAP_FIX)
        if words[0] in pairs:
            raise InputError(
                f"map '{path}', line {number}: target '{words[0]}' is paired twice", fix=MAP_FIX
            )
        pairs[words[0]] = words[1]
    return pairs


MAP_FIX = "write one 'TARGET_TENSOR SOURCE_TENSOR' pair a line, or a JSON object {target: source}"


def read_pruning_report(path: str | os.PathLike) -> dict[str, Any]:
    """The ``pruning`` section of an ``onnxopt optimize --report`` JSON file."""
    text = _read(path, "pruning report")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(
            f"pruning report '{path}' is not valid JSON: {error}", fix=PRUNING_FIX
        ) from None
    section = pruning_section(document)
    if section is None:
        raise InputError(f"'{path}' holds no pruning report", fix=PRUNING_FIX)
    return section


def pruning_section(document: Any) -> dict[str, Any] | None:
    """The pruning report in a whole ``--report`` document, or the document itself when it
    is that section; None when it holds none."""
    section = document.get("pruning", document) if isinstance(document, dict) else None
    if not isinstance(section, dict) or not isinstance(section.get("groups"), list):
        return None
    return section


PRUNING_FIX = "give the --report JSON that 'onnxopt optimize --recipe prune' wrote for the target"


def _read(path: str | os.PathLike, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(
            f"cannot read the {what} '{path}': {error.strerror or error}",
            fix="give the path of a readable text file",
        ) from None
