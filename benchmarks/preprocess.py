"""Image preprocessing time: our Processor against HF's Qwen2VLProcessor on the same images.

    python benchmarks/preprocess.py [--model DIR] [--repeat N]

Cases: a 4K photo (scikit-image's coffee, upscaled to 3840x2160), a 448x448 photo, and a
batch of 16 photos (scikit-image's data module, native sizes). Each column is the best of
N runs of `processor(images=...)` (resize, normalise, patchify; no text), in milliseconds:
ours, HF with its PIL image processor (the reference backend), and HF's default torchvision
image processor. Needs transformers, torch, torchvision and scikit-image (the `test` extra).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

DEFAULT_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "qwen2-vl-7b-instruct"


def _photos():
    from PIL import Image
    from skimage import data

    coffee = Image.fromarray(data.coffee())
    names = [
        "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
        "colorwheel", "cat", "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
        "immunohistochemistry", "colorwheel", "cat",
    ]  # fmt: skip
    return {
        "4K photo (3840x2160)": [coffee.resize((3840, 2160), Image.BICUBIC)],
        "448x448 photo": [Image.fromarray(data.astronaut()).resize((448, 448), Image.BICUBIC)],
        "batch of 16 photos": [Image.fromarray(getattr(data, n)()) for n in names],
    }


def _best_ms(fn, repeat: int) -> float:
    fn()  # warm-up (imports, caches)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="folder with preprocessor_config.json and tokenizer files")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    from transformers import AutoImageProcessor, AutoProcessor

    from qwen2vl_jax.processing import Processor

    if not Path(args.model).is_dir():
        print(f"model folder {args.model} not found (pass --model DIR)", file=sys.stderr)
        return 2
    ours = Processor.from_pretrained(args.model)
    hf_tv = AutoProcessor.from_pretrained(args.model)
    hf_pil = AutoProcessor.from_pretrained(args.model)
    hf_pil.image_processor = AutoImageProcessor.from_pretrained(args.model, backend="pil")

    rows = []
    for name, images in _photos().items():
        a = ours(images=images)
        b = hf_pil(images=images, return_tensors="np")
        assert np.array_equal(a["image_grid_thw"], b["image_grid_thw"])
        diff = float(np.abs(a["pixel_values"] - b["pixel_values"]).max())
        t_ours = _best_ms(lambda: ours(images=images), args.repeat)
        t_pil = _best_ms(lambda: hf_pil(images=images, return_tensors="np"), args.repeat)
        t_tv = _best_ms(lambda: hf_tv(images=images, return_tensors="np"), args.repeat)
        rows.append((name, int(a["pixel_values"].shape[0]), t_ours, t_pil, t_tv, diff))

    print(f"image preprocessing, best of {args.repeat} (ms), {os.cpu_count()} CPUs")
    head = f"| {'case':<22} | {'patches':>7} | {'ours':>8} | {'HF PIL':>8} | {'HF torchvision':>14} | {'HF PIL / ours':>13} | {'max abs diff vs PIL':>17} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for name, n, t_o, t_p, t_t, d in rows:
        print(f"| {name:<22} | {n:>7} | {t_o:>8.1f} | {t_p:>8.1f} | {t_t:>14.1f} | {t_p / t_o:>12.2f}x | {d:>19.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
