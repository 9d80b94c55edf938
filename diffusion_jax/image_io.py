"""Files people open: uint8 conversion, sample grids, PNG / npz / JSON, written atomically.

Every writer goes through a temporary file in the target folder and `os.replace`, so a process
killed mid-write leaves either the old file or the new one, never half of one. gs:// (any URL)
paths go through `etils.epath` as one object upload, which is atomic on cloud object stores.
"""

import io
import json
import math
import os
import tempfile
from typing import Any

import numpy as np
from etils import epath
from PIL import Image


def to_uint8(images: Any) -> np.ndarray:
    """[-1, 1] floats -> uint8 via round((x + 1) * 127.5), clipped to 0..255 (same shape)."""
    x = np.asarray(images, dtype=np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(
    images: np.ndarray, *, ncol: int | None = None, padding: int = 2, pad_value: int = 255
) -> np.ndarray:
    """Tiles uint8 images [N, H, W, C] into one image [rows*(H+p)+p, ncol*(W+p)+p, C].

    Rows are filled left to right; empty cells of the last row keep `pad_value`.
    """
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f'expected uint8 images [N, H, W, C], got {images.dtype} {images.shape}')
    n, h, w, c = images.shape
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    nrow = math.ceil(n / ncol)
    grid = np.full(
        (nrow * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, np.uint8
    )
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = images[i]
    return grid


def is_url(path: str) -> bool:
    """Whether `path` names a remote file system location such as gs://bucket/dir."""
    return '://' in str(path)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file in the same folder and a rename.

    A URL (gs://...) is written in one object upload through `etils.epath`: cloud object stores
    publish an object only once its upload is complete, so readers see the old or the new one.
    """
    if is_url(path):
        target = epath.Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_png(path: str, image: np.ndarray, *, scale: int = 1) -> None:
    """Saves uint8 [H, W, C] (C = 1 or 3) as a PNG, upscaled `scale` times (nearest)."""
    if scale > 1:
        image = image.repeat(scale, axis=0).repeat(scale, axis=1)
    if image.shape[-1] == 1:
        image = image[..., 0]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format='PNG')
    atomic_write_bytes(path, buf.getvalue())


def save_grid(
    path: str, images: np.ndarray, *, ncol: int | None = None, size: int = 512
) -> np.ndarray:
    """Saves uint8 images [N, H, W, C] as one PNG grid, upscaled (nearest) to about `size` px.

    Small images (8x8 digits) would be a thumbnail otherwise. Returns the grid before upscaling.
    """
    grid = make_grid(images, ncol=ncol)
    save_png(path, grid, scale=max(1, size // max(grid.shape[:2])))
    return grid


def save_npz(path: str, **arrays: np.ndarray) -> None:
    """Saves arrays to an .npz atomically."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def save_json(path: str, obj: Any) -> None:
    """Saves a JSON-able object atomically, indented for people."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + '\n').encode())
