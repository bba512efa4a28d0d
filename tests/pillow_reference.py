"""numpy references of the image operations the folder source asks Pillow for, integer for integer: the 2x box filter,
the antialiased bicubic resize (separable, horizontal pass first, 22-bit fixed-point coefficients, each pass rounded
to uint8), RGB -> grey (ITU-R 601-2 in 16-bit fixed point) and the centre crop."""

from __future__ import annotations

import numpy as np

PRECISION_BITS = 32 - 8 - 2


def box_halve(x: np.ndarray) -> np.ndarray:
    """uint8 [H, W, ...] with even H, W -> [H/2, W/2, ...]: pair means rounded half up, horizontal then vertical."""
    x = x.astype(np.int64)
    h = (x[:, 0::2] + x[:, 1::2] + 1) // 2
    return ((h[0::2] + h[1::2] + 1) // 2).astype(np.uint8)


def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1, np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _fixed_point_weights(in_size: int, out_size: int) -> list[tuple[int, np.ndarray]]:
    """Per output pixel: (first input pixel, integer weights), with an antialiasing support on downscales."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    rows = []
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        w = _bicubic((np.arange(xmin, xmax) - center + 0.5) / filterscale)
        w = w / w.sum()
        k = np.where(w < 0, np.trunc(w * (1 << PRECISION_BITS) - 0.5), np.trunc(w * (1 << PRECISION_BITS) + 0.5))
        rows.append((xmin, k.astype(np.int64)))
    return rows


def _resize_axis(x: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    x = np.moveaxis(x.astype(np.int64), axis, 0)
    out = []
    for start, k in _fixed_point_weights(x.shape[0], out_size):
        acc = np.tensordot(k, x[start:start + len(k)], axes=(0, 0)) + (1 << (PRECISION_BITS - 1))
        out.append(np.clip(acc >> PRECISION_BITS, 0, 255))
    return np.moveaxis(np.stack(out), 0, axis).astype(np.uint8)


def bicubic_resize(x: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 [H, W, ...] -> [height, width, ...] (Pillow's Image.BICUBIC)."""
    if x.shape[1] != width:
        x = _resize_axis(x, width, 1)
    if x.shape[0] != height:
        x = _resize_axis(x, height, 0)
    return x


def grey(rgb: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> [...] (Pillow's convert('L'))."""
    x = rgb.astype(np.int64)
    return ((x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16).astype(np.uint8)


def centre_crop(x: np.ndarray, size: int) -> np.ndarray:
    top, left = (x.shape[0] - size) // 2, (x.shape[1] - size) // 2
    return x[top:top + size, left:left + size]
