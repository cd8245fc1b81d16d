"""Media helpers for the preprocessing tests (test_processing.py, test_tokenizer.py): quiet
transformers, reference compositing, sample photos, a synthetic video clip, and output
comparison. The reference Qwen2-VL files come from hf_utils.reference_folder(kind)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image


def quiet_transformers():
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        from transformers.utils import logging

        logging.set_verbosity_error()
    except ImportError:
        pass


def white_composite(img: Image.Image) -> Image.Image:
    """The reference for transparent images: qwen-vl-utils' to_rgb (paste on white with the
    alpha channel as mask), applied before HF's processor sees the image."""
    rgba = img.convert("RGBA")
    bg = Image.new("RGB", rgba.size, (255, 255, 255))
    bg.paste(rgba, mask=rgba.split()[3])
    return bg


def photo(name: str) -> np.ndarray:
    from skimage import data

    return getattr(data, name)()


def write_video(path: Path, n: int = 30, fps: int = 10, h: int = 64, w: int = 96, codec: str = "mpeg4") -> Path:
    """A short synthetic clip written with PyAV: frame i has red level 8*i and a green bar
    that moves, so sampled frames are distinguishable."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        yy, xx = np.mgrid[0:h, 0:w]
        for i in range(n):
            f = np.zeros((h, w, 3), np.uint8)
            f[..., 0] = (8 * i) % 256
            f[..., 1] = np.where(xx < (3 * i) % w, 200, 30)
            f[..., 2] = (yy * 255 // max(h - 1, 1)).astype(np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def assert_close(ours: dict, ref: dict, keys=None, atol: float = 1e-5):
    """Same keys' shapes and dtypes; integer arrays equal, float arrays within atol."""
    for k in keys or ref.keys():
        a, b = np.asarray(ours[k]), np.asarray(ref[k])
        assert a.shape == b.shape, f"{k}: shape {a.shape} != {b.shape}"
        assert a.dtype == b.dtype, f"{k}: dtype {a.dtype} != {b.dtype}"
        if np.issubdtype(b.dtype, np.floating):
            assert a.size == 0 or float(np.abs(a - b).max()) <= atol, f"{k}: max abs diff {np.abs(a - b).max()}"
        else:
            np.testing.assert_array_equal(a, b, err_msg=k)
