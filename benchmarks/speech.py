"""Speech recordings for the voice activity detector: espeak-ng sentences between pauses, over noise.

No PyPI package ships real speech recordings, so the speech is synthesized by espeak-ng
(Debian's package; `apt-get install espeak-ng`), which is deterministic: the same text,
voice, speed and pitch give the same samples. A recording is a few seconds of pauses and
spoken sentences (real English prose) in one of several English voices, mixed with one kind
of background noise (white, pink, brown, or mains hum with hiss) at a signal-to-noise ratio
between 0 and 30 dB, at a random level. Labels say which samples lie inside a spoken
sentence, from its first to its last audible sample.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
import subprocess
import sys
import wave
from collections.abc import Sequence

import numpy as np
from scipy.signal import lfilter, resample_poly

SAMPLE_RATE = 16000
ESPEAK_RATE = 22050
# espeak-ng's own English voices with some of its variants (male, female, klatt); the
# MBROLA voices it lists need data that Debian does not install with it.
VOICES = (
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-029",
    "en-us+f3",
    "en-gb+f2",
    "en-us+m3",
    "en-gb-x-rp+f4",
    "en-029+m5",
    "en-us+klatt",
)
NOISES = ("white", "pink", "brown", "hum")
AUDIBLE = 0.02  # of a sentence's peak: where it starts and ends


@dataclasses.dataclass
class Recording:
    """Mono float32 audio at 16 kHz and, per sample, whether it is inside a spoken sentence."""

    audio: np.ndarray
    speech: np.ndarray
    voice: str
    noise: str
    snr_db: float


def espeak_version() -> str:
    """The first line of `espeak-ng --version`; stops the build if espeak-ng is missing."""
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng is not installed: apt-get install espeak-ng (see benchmarks/README.md)")
    result = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True)
    return result.stdout.strip().splitlines()[0]


def speak(text: str, voice: str, words_per_minute: int, pitch: int) -> np.ndarray:
    """One sentence from espeak-ng, as float32 in [-1, 1] resampled to 16 kHz."""
    result = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(words_per_minute), "-p", str(pitch), "--stdout", text],
        capture_output=True,
        check=True,
    )
    with wave.open(io.BytesIO(result.stdout)) as reader:
        if reader.getframerate() != ESPEAK_RATE or reader.getsampwidth() != 2:
            raise ValueError(
                f"espeak-ng wrote {reader.getframerate()} Hz, {reader.getsampwidth()} bytes"
            )
        samples = np.frombuffer(reader.readframes(reader.getnframes()), dtype="<i2")
    audio = samples.astype(np.float64) / 32768.0
    return resample_poly(audio, SAMPLE_RATE // 50, ESPEAK_RATE // 50).astype(np.float32)


def background(kind: str, length: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS noise of one kind."""
    white = rng.standard_normal(length)
    if kind == "white":
        noise = white
    elif kind == "pink":
        # Paul Kellet's economical pink filter: -3 dB per octave over the speech band.
        noise = lfilter(
            [0.049922035, -0.095993537, 0.050612699, -0.004408786],
            [1, -2.494956002, 2.017265875, -0.522189400],
            white,
        )
    elif kind == "brown":
        noise = lfilter([1.0], [1.0, -0.995], white)
    else:
        mains = 50.0 if rng.random() < 0.5 else 60.0
        time = np.arange(length) / SAMPLE_RATE
        noise = sum(
            np.sin(2 * np.pi * mains * harmonic * time) / harmonic for harmonic in (1, 2, 3)
        )
        noise = noise + 0.3 * white
    noise = noise - noise.mean()
    return noise / np.sqrt(np.mean(noise**2))


def make_recording(sentences: Sequence[str], seconds: float, rng: np.random.Generator) -> Recording:
    """Pauses and spoken sentences, one voice, one noise, at least `seconds` long."""
    voice = VOICES[int(rng.integers(len(VOICES)))]
    words_per_minute = int(rng.integers(130, 200))
    pitch = int(rng.integers(25, 75))
    pieces: list[np.ndarray] = []
    labels: list[np.ndarray] = []

    def pause(low: float, high: float) -> None:
        length = int(rng.uniform(low, high) * SAMPLE_RATE)
        pieces.append(np.zeros(length, np.float32))
        labels.append(np.zeros(length, bool))

    pause(0.3, 1.5)
    while sum(len(piece) for piece in pieces) < seconds * SAMPLE_RATE:
        sentence = sentences[int(rng.integers(len(sentences)))]
        spoken = speak(sentence, voice, words_per_minute, pitch)
        audible = np.flatnonzero(np.abs(spoken) >= AUDIBLE * np.abs(spoken).max())
        label = np.zeros(len(spoken), bool)
        label[audible[0] : audible[-1] + 1] = True
        pieces.append(spoken)
        labels.append(label)
        pause(0.3, 3.0)
    speech = np.concatenate(pieces).astype(np.float64)
    noise_kind = NOISES[int(rng.integers(len(NOISES)))]
    snr_db = float(rng.uniform(0.0, 30.0))
    speech_labels = np.concatenate(labels)
    speech_rms = np.sqrt(np.mean(speech[speech_labels] ** 2))
    mixed = speech + background(noise_kind, len(speech), rng) * speech_rms / 10 ** (snr_db / 20)
    level = rng.uniform(0.1, 0.9) / np.abs(mixed).max()
    return Recording((mixed * level).astype(np.float32), speech_labels, voice, noise_kind, snr_db)
