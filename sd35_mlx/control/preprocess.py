"""Control-image preprocessors that need no neural network: canny edges and Gaussian blur.

Own numpy code (no OpenCV at run time: its wheels bundle LGPL FFmpeg; see docs/control.md),
written to give what the tools Stability's model card used give, and tested against them:
- canny: OpenCV's `cv2.Canny(gray, 100, 200)` (3x3 Sobel, L1 gradient magnitude, no pre-blur,
  non-maximum suppression in four directions, 8-connected hysteresis) on the 8-bit grayscale
  image (ITU-R 601 luma, as Pillow's "L"). Output: white edges on black, RGB.
- blur: a separable Gaussian, kernel 51, σ = 8 (torchvision's `gaussian_blur` default σ for
  that kernel: 0.3·((k − 1)/2 − 1) + 0.8), borders mirrored without repeating the edge pixel
  (OpenCV BORDER_REFLECT_101, torch "reflect"). Which σ Stability trained with is not
  published; both are parameters.
Depth and pose maps need their own networks: pass them as control images (docs/control.md).
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

CANNY_LOW, CANNY_HIGH = 100, 200  # Stability's SD3.5 Large canny ControlNet (model card)
BLUR_KERNEL = 51
BLUR_SIGMA = 0.3 * ((BLUR_KERNEL - 1) * 0.5 - 1) + 0.8  # 8.0
_TAN_22_5 = np.float64(0.4142135623730950488)
_SHIFT = 15
_TG22 = int(_TAN_22_5 * (1 << _SHIFT) + 0.5)  # OpenCV's fixed-point tan(22.5°)


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) uint8, ITU-R 601-2 luma rounded as Pillow's convert("L")."""
    from PIL import Image

    return np.asarray(Image.fromarray(rgb, "RGB").convert("L"))


def _sobel(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.pad(gray.astype(np.int32), 1, mode="edge")  # OpenCV's Canny: BORDER_REPLICATE
    dx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    dy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return dx, dy


def canny(gray: np.ndarray, low: float = CANNY_LOW, high: float = CANNY_HIGH) -> np.ndarray:
    """Canny edges of an 8-bit grayscale image: (H, W) uint8 in {0, 255}."""
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise InputError("canny needs an 8-bit grayscale image (H, W)")
    if not (0 <= low <= high):
        raise InputError(f"canny thresholds need 0 ≤ low ≤ high (got {low}, {high})")
    lo, hi = int(np.floor(low)), int(np.floor(high))
    dx, dy = _sobel(gray)
    mag = np.abs(dx) + np.abs(dy)
    h, w = mag.shape
    m = np.pad(mag, 1)  # zero border: outside pixels never win the suppression
    c = m[1:-1, 1:-1]
    ax, ay = np.abs(dx), np.abs(dy) << _SHIFT
    tg22 = ax * _TG22
    tg67 = tg22 + (ax << (_SHIFT + 1))
    horizontal = ay < tg22
    vertical = ay > tg67
    diagonal = ~horizontal & ~vertical
    s = np.where((dx ^ dy) < 0, -1, 1)  # which diagonal
    left, right = m[1:-1, :-2], m[1:-1, 2:]
    up, down = m[:-2, 1:-1], m[2:, 1:-1]
    up_left, up_right = m[:-2, :-2], m[:-2, 2:]
    down_left, down_right = m[2:, :-2], m[2:, 2:]
    # OpenCV compares with ">" on one side and ">=" on the other (ties go to the later pixel)
    keep_h = (c > left) & (c >= right)
    keep_v = (c > up) & (c >= down)
    diag_prev = np.where(s < 0, up_right, up_left)  # row above at column j − s
    diag_next = np.where(s < 0, down_left, down_right)  # row below at column j + s
    keep_d = (c > diag_prev) & (c > diag_next)
    maximum = (c > lo) & ((horizontal & keep_h) | (vertical & keep_v) | (diagonal & keep_d))
    strong = maximum & (c > hi)
    edges = _hysteresis(strong, maximum)
    assert edges.shape == (h, w)
    return np.where(edges, 255, 0).astype(np.uint8)


def _hysteresis(strong: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Candidates 8-connected (through candidates) to a strong pixel."""
    edges = strong.copy()
    stack = list(zip(*np.nonzero(strong)))
    h, w = strong.shape
    while stack:
        i, j = stack.pop()
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                y, x = i + di, j + dj
                if 0 <= y < h and 0 <= x < w and candidates[y, x] and not edges[y, x]:
                    edges[y, x] = True
                    stack.append((y, x))
    return edges


def canny_rgb(rgb: np.ndarray, low: float = CANNY_LOW, high: float = CANNY_HIGH) -> np.ndarray:
    """(H, W, 3) uint8 photo -> (H, W, 3) uint8 edge map (white on black)."""
    edges = canny(to_gray(rgb), low, high)
    return np.repeat(edges[..., None], 3, axis=-1)


def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """torchvision's 1-D Gaussian: exp(−x²/2σ²) on x = −(k−1)/2 … (k−1)/2, normalised."""
    x = np.linspace(-(size - 1) * 0.5, (size - 1) * 0.5, size)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(rgb: np.ndarray, kernel: int = BLUR_KERNEL, sigma: float = BLUR_SIGMA) -> np.ndarray:
    """(H, W, C) uint8 -> blurred uint8 (rounded), separable, reflect-101 borders."""
    if kernel < 1 or kernel % 2 == 0:
        raise InputError(f"blur kernel size must be odd and ≥ 1 (got {kernel})")
    if not sigma > 0:
        raise InputError(f"blur sigma must be > 0 (got {sigma})")
    r = kernel // 2
    if min(rgb.shape[:2]) <= r:
        raise InputError(f"the image ({rgb.shape[1]}x{rgb.shape[0]}) is too small for a {kernel}-pixel blur kernel")
    k = gaussian_kernel(kernel, sigma)
    x = np.pad(rgb.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="reflect")
    rows = sum(k[i] * x[:, i : i + rgb.shape[1]] for i in range(kernel))
    out = sum(k[i] * rows[i : i + rgb.shape[0]] for i in range(kernel))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


PREPROCESSORS = {"canny": canny_rgb, "blur": gaussian_blur}
