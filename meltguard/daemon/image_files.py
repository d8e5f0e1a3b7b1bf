"""Short-lived storage for `response_format=url` images, served by the daemon itself."""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StoredImage:
    png: bytes
    expires_at: float


class ImageFiles:
    """Bounded by count and age: an image URL is a promise for `ttl` seconds, not forever."""

    def __init__(self, ttl: float, max_images: int = 2048) -> None:
        self._ttl = ttl
        self._max = max_images
        self._images: OrderedDict[str, StoredImage] = OrderedDict()

    def put(self, png: bytes, now: float) -> str:
        self._expire(now)
        name = secrets.token_urlsafe(18)
        self._images[name] = StoredImage(png, now + self._ttl)
        while len(self._images) > self._max:
            self._images.popitem(last=False)
        return name

    def get(self, name: str, now: float) -> bytes | None:
        image = self._images.get(name)
        if image is None or image.expires_at <= now:
            return None
        return image.png

    def _expire(self, now: float) -> None:
        while self._images:
            name, image = next(iter(self._images.items()))
            if image.expires_at > now:
                break
            del self._images[name]
