"""Reading engine output back as pictures."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(decode(png).convert("RGB"), dtype=np.int16)
