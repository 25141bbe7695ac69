from __future__ import annotations

import io

import numpy as np
from PIL import Image

from tumorflow.bench.ood import OOD_SETS, brain_mri_images, ood_sets, texture_images


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.float64)


def test_every_set_has_the_asked_number_of_decodable_images_of_the_asked_size():
    sets = ood_sets(3, 48)
    assert list(sets) == list(OOD_SETS)
    for images in sets.values():
        assert len(images) == 3
        assert all(_pixels(image).shape[:2] == (48, 48) for image in images)
    assert len({image for images in sets.values() for image in images}) == 12


def test_textures_have_the_falling_spectrum_of_photographs():
    image = _pixels(next(texture_images(1, 64))).mean(axis=-1)
    power = np.abs(np.fft.fft2(image - image.mean())) ** 2
    frequency = np.hypot(*np.meshgrid(np.fft.fftfreq(64), np.fft.fftfreq(64)))
    low = power[(frequency > 0) & (frequency < 0.1)].mean()
    high = power[frequency > 0.3].mean()
    assert low > 50 * high


def test_the_brain_phantom_is_a_head_with_scalp_skull_and_brain():
    image = _pixels(next(brain_mri_images(1, 128)))
    assert image.ndim == 2
    row = image[64]
    assert row[:5].mean() < 20  # background
    brain = row[84:92].mean()  # beside the ventricles
    ventricles = row[58:70].min()
    edge = row[np.argmax(row > 150)]  # the first bright pixel from the left: scalp
    assert edge > 150 and brain > 100 and ventricles < 80
    skull = row[np.argmax(row > 150) + 4 : np.argmax(row > 150) + 10].min()
    assert skull < 80
