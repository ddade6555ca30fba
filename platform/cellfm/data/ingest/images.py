"""Source images: where one channel plane of a field comes from (`Plane`) and how it is read (TIFF, or
PNG/JPEG through Pillow; a CHAMMI strip's channel cut out). A new image format is read here."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellfm.storage import filesystem


@dataclass(frozen=True)
class Plane:
    """Where one channel plane of a field comes from."""

    uri: str
    channel: str
    strip_index: int | None = None   # CHAMMI strips: channel k in columns k*W .. (k+1)*W
    strip_width: int | None = None


def _read_bytes(uri: str, storage_options) -> bytes:
    fs, path = filesystem(uri, storage_options)
    with fs.open(path, "rb") as src:
        return src.read()


def load_plane(plane: Plane, storage_options=None) -> np.ndarray:
    """One (H, W) plane from a TIFF/PNG (or a CHAMMI strip's channel)."""
    suffix = Path(plane.uri.split("?")[0]).suffix.lower()
    try:
        data = _read_bytes(plane.uri, storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"missing file {plane.uri}") from None
    if suffix in (".tif", ".tiff"):
        import tifffile

        image = tifffile.imread(io.BytesIO(data))
    else:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            image = np.asarray(img)
    image = np.squeeze(image)
    if image.ndim != 2:
        raise ValueError(f"file {plane.uri}: expected a single-plane image, got shape {image.shape}")
    if plane.strip_index is not None:
        width = plane.strip_width
        if image.shape[1] % width:
            raise ValueError(f"file {plane.uri}: strip width {image.shape[1]} is not a multiple of "
                             f"channel_width {width}")
        n = image.shape[1] // width
        if plane.strip_index >= n:
            raise ValueError(f"file {plane.uri}: strip holds {n} channel(s) of width {width}, "
                             f"channel {plane.channel!r} is number {plane.strip_index + 1}")
        image = image[:, plane.strip_index * width:(plane.strip_index + 1) * width]
    return image

