"""The canny and blur preprocessors against OpenCV (what Stability's model card used), on a
generated photo-like image: canny edges identical, blur within one 8-bit level (OpenCV
rounds in fixed point)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from sd35_mlx.control.preprocess import BLUR_SIGMA, CANNY_HIGH, CANNY_LOW, canny, canny_rgb, gaussian_blur, to_gray
from sd35_mlx.errors import InputError

cv2 = pytest.importorskip("cv2", reason="opencv-python-headless is the test reference (pip install -e .[test])")


def photo(w=160, h=120, seed=0) -> np.ndarray:
    """Smooth colour fields, overlapping discs, a slight blur and sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([120 + 60 * np.sin(x / 17), 100 + 50 * np.cos(y / 11), 90 + 40 * np.sin((x + y) / 23)], -1)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(5, 30)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    noisy = np.asarray(img).astype(np.int16) + rng.integers(-6, 7, (h, w, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_canny_equals_opencv(seed):
    assert (CANNY_LOW, CANNY_HIGH) == (100, 200)
    gray = to_gray(photo(seed=seed))
    ours, ref = canny(gray), cv2.Canny(gray, 100, 200)
    assert (ref > 0).sum() > 200  # a real edge map, not an empty one
    assert np.array_equal(ours, ref)
    # other thresholds too
    assert np.array_equal(canny(gray, 30, 90), cv2.Canny(gray, 30, 90))


def test_canny_rgb_is_white_edges_on_black():
    rgb = photo(seed=4)
    edges = canny_rgb(rgb)
    assert edges.shape == rgb.shape and set(np.unique(edges)) <= {0, 255}
    assert np.array_equal(edges[..., 0], cv2.Canny(to_gray(rgb), 100, 200))


def test_gaussian_blur_matches_opencv():
    assert BLUR_SIGMA == pytest.approx(8.0)
    rgb = photo(seed=5)
    ours = gaussian_blur(rgb)
    ref = cv2.GaussianBlur(rgb, (51, 51), 8.0, borderType=cv2.BORDER_REFLECT_101)
    assert np.abs(ours.astype(int) - ref).max() <= 1


def test_bad_parameters_are_refused():
    with pytest.raises(InputError, match="odd"):
        gaussian_blur(photo(), kernel=50)
    with pytest.raises(InputError, match="too small"):
        gaussian_blur(photo(w=40, h=20))
    with pytest.raises(InputError, match="low ≤ high"):
        canny(to_gray(photo()), 200, 100)
