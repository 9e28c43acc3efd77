"""benchmarks/RESULTS.md is shared: quantization.py writes the file, and the other benchmarks
(calibration cost, torch bridge) each keep one section in it, which a later run of any of them
leaves in place. A section runs from its heading to the next heading of its level."""

from __future__ import annotations

import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def cpu_model() -> str:
    """The processor's name: timings and int8 choices differ between machines."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# The headings of the sections other benchmarks own.
OWNED_HEADINGS = (
    "## Calibration cost",
    "## Torch bridge fidelity",
    "## Sparsity",
    "## Structured pruning",
    "## Pruning presets on more models",
    "## Pruning presets on more models, some rerun",
    "## Weight transfer",
    "## Sharded calibration",
    "## Large model",
    "## Runtime targets",
)


def _split(text: str) -> tuple[str, dict[str, str]]:
    """The text without the owned sections, and those sections by heading."""
    rest: list[str] = []
    kept: dict[str, list[str]] = {}
    heading = None
    for line in text.splitlines():
        if line.startswith("## "):
            heading = line if line in OWNED_HEADINGS else None
        if heading is None:
            rest.append(line)
        else:
            kept.setdefault(heading, []).append(line)
    return "\n".join(rest).rstrip() + "\n", {key: "\n".join(value) for key, value in kept.items()}


def owned_sections() -> str:
    """The owned sections now in RESULTS.md, for quantization.py to keep when it rewrites it."""
    if not RESULTS.exists():
        return ""
    _, kept = _split(RESULTS.read_text())
    return "".join("\n" + section.rstrip() + "\n" for section in kept.values())


def write_section(heading: str, body: str) -> None:
    """Put ``body`` under ``heading`` (one of OWNED_HEADINGS) in RESULTS.md, replacing that
    section and keeping everything else."""
    if heading not in OWNED_HEADINGS:
        raise ValueError(f"{heading!r} is not in OWNED_HEADINGS: quantization.py would drop it")
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    rest, kept = _split(text)
    kept[heading] = heading + "\n\n" + body.strip()
    RESULTS.write_text(rest + "".join("\n" + section.rstrip() + "\n" for section in kept.values()))
