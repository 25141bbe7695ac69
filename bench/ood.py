"""`tumorflow bench ood`: how well the served model's OOD flag separates images it was never
trained on from phantom scans of its own kind.

The out-of-distribution sets: natural-image-like textures (1/f noise in colour, as photographs
have), white noise, text renderings, and the phantom of another modality (a brain-MRI-like axial
slice: skull, grey and white matter, ventricles). The in-distribution set: phantom patients of a
seed the model never saw. Reports the share of each OOD set flagged and the share of
in-distribution images wrongly rejected, beside the false-rejection rate the threshold was
chosen for.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tumorflow.components.data.phantom import phantom_slices

OOD_SETS = ("texture", "noise", "text", "brain_mri")
_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "radiology",
    "reports",
    "list",
    "findings",
]


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def texture_images(count: int, size: int, seed: int = 0) -> Iterator[bytes]:
    """Colour 1/f ("pink") noise: the power spectrum of natural photographs, no anatomy."""
    rng = np.random.default_rng([seed, 1])
    frequency = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size)))
    falloff = 1.0 / np.maximum(frequency, 1.0 / size) ** rng.uniform(0.8, 1.4)
    for _ in range(count):
        channels = []
        for _channel in range(3):
            spectrum = np.fft.fft2(rng.normal(size=(size, size))) * falloff
            field = np.real(np.fft.ifft2(spectrum))
            channels.append((field - field.min()) / (np.ptp(field) + 1e-9))
        yield _png(np.stack(channels, axis=-1) * 255)


def noise_images(count: int, size: int, seed: int = 0) -> Iterator[bytes]:
    """Uniform white noise, alternately grey and colour."""
    rng = np.random.default_rng([seed, 2])
    for index in range(count):
        shape = (size, size) if index % 2 else (size, size, 3)
        yield _png(rng.integers(0, 256, size=shape))


def text_images(count: int, size: int, seed: int = 0) -> Iterator[bytes]:
    """Lines of text drawn with PIL's default font, dark on light or light on dark."""
    rng = np.random.default_rng([seed, 3])
    for index in range(count):
        dark = index % 2 == 0
        image = Image.new("L", (size * 2, size * 2), 245 if dark else 10)
        draw = ImageDraw.Draw(image)
        for line in range(0, size * 2, 12):
            words = " ".join(rng.choice(_WORDS, size=6))
            draw.text((2, line), words, fill=10 if dark else 245)
        yield _png(np.asarray(image.resize((size, size), Image.Resampling.BILINEAR)))


def brain_mri_images(count: int, size: int, seed: int = 0) -> Iterator[bytes]:
    """A brain-MRI-like axial slice (T1-like): dark background, bright scalp and dark skull rings,
    grey cortex over a white-matter core with a folded edge, two dark ventricles."""
    rng = np.random.default_rng([seed, 4])
    y, x = np.mgrid[0:size, 0:size] / size - 0.5
    for _ in range(count):
        a, b = rng.uniform(0.36, 0.44), rng.uniform(0.42, 0.48)
        cx, cy = rng.uniform(-0.03, 0.03, size=2)
        radius = np.hypot((x - cx) / a, (y - cy) / b)
        angle = np.arctan2(y - cy, x - cx)
        folds = 0.06 * np.sin(angle * rng.integers(14, 22) + rng.uniform(0, 6))
        image = np.zeros((size, size))
        image[radius < 1.0] = 200  # scalp fat
        image[radius < 0.93] = 30  # skull
        image[radius < 0.86] = 110  # grey matter
        image[radius < 0.7 + folds] = 165  # white matter
        for side in (-1, 1):
            ventricle = np.hypot((x - cx - side * 0.06) / 0.04, (y - cy + 0.02) / 0.14)
            image[ventricle < 1] = 40
        image += rng.normal(0, 6, size=image.shape)
        blurred = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(size / 128)
        )
        yield _png(np.asarray(blurred))


def ood_sets(count: int, size: int, seed: int = 0) -> dict[str, list[bytes]]:
    """Each OOD set of `count` encoded images."""
    makers = {
        "texture": texture_images,
        "noise": noise_images,
        "text": text_images,
        "brain_mri": brain_mri_images,
    }
    return {name: list(makers[name](count, size, seed)) for name in OOD_SETS}


def in_distribution_images(per_class: int, size: int, seed: int = 7) -> list[bytes]:
    """Phantom slices of patients no training split drew (seed 7)."""
    return [_png(piece.pixels) for piece in phantom_slices(per_class, size, seed=seed)]


def flagged_shares(saved_model: Path, sets: dict[str, list[bytes]]) -> dict[str, float]:
    """The share of each set's images the served model flags as out of distribution."""
    import tensorflow as tf

    from tumorflow.components.training.export import IN_DISTRIBUTION, INPUT, SIGNATURE

    served = tf.saved_model.load(str(saved_model)).signatures[SIGNATURE]
    shares = {}
    for name, images in sets.items():
        flags = [
            ~served(**{INPUT: tf.constant(images[start : start + 32])})[IN_DISTRIBUTION].numpy()
            for start in range(0, len(images), 32)
        ]
        shares[name] = float(np.concatenate(flags).mean())
    return shares


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model", default="", help="a serving SavedModel to score (default: train a small one)")
    add("--per-class", type=int, default=100, help="phantom training slices per class")
    add("--test-per-class", type=int, default=50, help="unseen phantom slices per class")
    add("--ood-count", type=int, default=100, help="images per out-of-distribution set")
    add("--size", type=int, default=128, help="image side in pixels")
    add("--epochs", type=int, default=15, help="training epochs of the small model")


def run(args: argparse.Namespace) -> int:
    """Print the share flagged per OOD set and the in-distribution false rejections."""
    from tumorflow.bench.pointing_game import train_phantom_classifier
    from tumorflow.core import serving_layout
    from tumorflow.core.artifacts import MODEL_INFO_FILE

    with tempfile.TemporaryDirectory() as workdir:
        model = Path(args.model) if args.model else None
        if model is None:
            model = train_phantom_classifier(Path(workdir), args.per_class, args.size, args.epochs)
        meta_path = model / serving_layout.ASSETS_EXTRA / serving_layout.MODEL_INFO
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        # the train step's model folder, when the SavedModel is its export, names the rate
        info_path = model.parent / MODEL_INFO_FILE
        fitted = json.loads(info_path.read_text()).get("ood", {}) if info_path.is_file() else {}
        sets = ood_sets(args.ood_count, args.size)
        sets["in_distribution"] = in_distribution_images(args.test_per_class, args.size)
        shares = flagged_shares(model, sets)
    print(f"OOD threshold {meta.get('ood_threshold')} (Mahalanobis, squared)")
    for name in OOD_SETS:
        print(f"  {name:<10} flagged {shares[name]:7.1%} of {args.ood_count}")
    flagged = np.mean([shares[name] for name in OOD_SETS])
    print(f"  all OOD    flagged {flagged:7.1%} (target >= 95%)")
    print(
        f"  in-distribution test images rejected {shares['in_distribution']:.1%} of "
        f"{len(sets['in_distribution'])} unseen phantom scans (the threshold rejects "
        f"{fitted.get('false_rejection_rate', '?')} of the validation split)"
    )
    return 0
