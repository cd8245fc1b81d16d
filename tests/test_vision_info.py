"""`qwen2vl_jax.process_vision_info` against qwen-vl-utils 0.0.14 itself.

Inputs are generated here (odd sizes, every PIL mode that matters, tiny images, short clips
at several frame rates); both functions get the same messages and every output is compared
exactly: image sizes and uint8 pixels, video frame counts, sampled indices, frame sizes and
uint8 pixels, the video metadata and the returned kwargs. qwen-vl-utils reads videos with
decord here (its FORCE_QWENVL_VIDEO_READER setting), which decodes the same pixels as our PyAV.

The tests that need qwen-vl-utils skip, with the reason, when it (or decord, for videos) is
not installed; the kernel and error tests need only torch or nothing.
"""

from __future__ import annotations

import base64
import importlib.metadata
import io
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from media import write_video
from qwen2vl_jax.errors import InputError
from qwen2vl_jax.processing import (
    ImageProcessor,
    VideoProcessor,
    fetch_image,
    fetch_video,
    process_vision_info,
    resize_frames_float,
)
from qwen2vl_jax.processing.resample import _fma32
from qwen2vl_jax.processing.video import linspace_indices

RNG = np.random.default_rng(20240)
VERSION = "0.0.14"


@pytest.fixture(scope="module")
def qvu():
    """qwen_vl_utils.vision_process, reading videos with decord (skips when not installed)."""
    try:
        version = importlib.metadata.version("qwen-vl-utils")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"qwen-vl-utils is not installed (pip install qwen-vl-utils=={VERSION}, or the test extra)")
    if version != VERSION:
        pytest.skip(f"these tests pin qwen-vl-utils {VERSION}, found {version}")
    try:
        from qwen_vl_utils import vision_process
    except ImportError as e:  # it needs torch and torchvision
        pytest.skip(f"qwen-vl-utils cannot be imported: {e}")
    return vision_process


@pytest.fixture(scope="module")
def qvu_video(qvu):
    """qwen-vl-utils reading video files with decord. It picks its reader once (torchcodec,
    else decord, else torchvision's read_video, which torchvision 0.29 no longer has), from
    FORCE_QWENVL_VIDEO_READER as read at its import: set here on the module, then restored."""
    pytest.importorskip("decord", reason="decord is not installed: qwen-vl-utils needs it to read video files here")
    pytest.importorskip("av", reason="PyAV is not installed: it writes the test clips and decodes ours")
    before = qvu.FORCE_QWENVL_VIDEO_READER
    qvu.FORCE_QWENVL_VIDEO_READER = "decord"
    qvu.get_video_reader_backend.cache_clear()
    assert qvu.get_video_reader_backend() == "decord"
    yield qvu
    qvu.FORCE_QWENVL_VIDEO_READER = before
    qvu.get_video_reader_backend.cache_clear()


def _exact_kernel() -> bool:
    """torch's x86 AVX2/AVX512 kernels are the ones reproduced bit for bit; its plain-C
    build (no FMA) differs by at most one level."""
    import torch

    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


# ----------------------------------------------------------------------------- comparison


def _video_array(theirs) -> np.ndarray:
    """qwen-vl-utils' float [T, 3, H, W] tensor -> uint8 [T, H, W, 3] (checked integral)."""
    a = theirs.permute(0, 2, 3, 1).numpy()
    assert a.dtype == np.float32 and np.array_equal(a, np.round(a)) and a.min() >= 0 and a.max() <= 255
    return a.astype(np.uint8)


def assert_same(ours, theirs, where: str = "output") -> None:
    """Our process_vision_info / fetch_* output equals qwen-vl-utils' exactly."""
    import torch

    if theirs is None or isinstance(theirs, (bool, int, float, str)):
        assert ours == theirs, f"{where}: {ours!r} != {theirs!r}"
    elif isinstance(theirs, Image.Image):
        assert isinstance(ours, Image.Image), where
        assert (ours.size, ours.mode) == (theirs.size, theirs.mode), f"{where}: {ours.size} {ours.mode} != {theirs.size} {theirs.mode}"
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs), err_msg=where)
    elif isinstance(theirs, torch.Tensor):
        ref = _video_array(theirs)
        assert isinstance(ours, np.ndarray) and ours.dtype == np.uint8, where
        assert ours.shape == ref.shape, f"{where}: frames {ours.shape} != {ref.shape}"
        np.testing.assert_array_equal(ours, ref, err_msg=where)
    elif isinstance(theirs, dict):
        keys = set(theirs) - {"video_backend"}  # "decord" there, "pyav" here
        assert keys <= set(ours), f"{where}: keys {sorted(ours)} lack {sorted(keys - set(ours))}"
        for k in keys:
            assert_same(ours[k], theirs[k], f"{where}[{k!r}]")
    elif isinstance(theirs, (list, tuple)):
        assert isinstance(ours, type(theirs)) and len(ours) == len(theirs), f"{where}: {type(ours)} of {len(ours)} != {len(theirs)}"
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        raise TypeError(f"{where}: unexpected {type(theirs)}")


def _user(*content) -> list[dict]:
    return [{"role": "user", "content": [*content, {"type": "text", "text": "Describe."}]}]


# ----------------------------------------------------------------------------- inputs


def _noise(h: int, w: int, c: int = 3) -> np.ndarray:
    """Sharp content (noise with hard bars): the case where resize kernels disagree most."""
    x = RNG.integers(0, 256, (h, w, c), dtype=np.uint8)
    x[:, ::5] = 255
    x[::7] = 0
    return x if c > 1 else x[..., 0]


def _images() -> dict[str, Image.Image]:
    rgb = Image.fromarray(_noise(61, 83))
    palette = rgb.quantize(16)
    palette_t = rgb.quantize(16)
    palette_t.info["transparency"] = 3
    return {
        "rgb_61x83": rgb,
        "rgba": Image.fromarray(_noise(57, 90, 4), "RGBA"),
        "la": Image.fromarray(_noise(40, 50, 2), "LA"),
        "palette": palette,
        "palette_transparency": palette_t,
        "l": Image.fromarray(_noise(45, 70, 1), "L"),
        "1bit": Image.fromarray(_noise(45, 70, 1), "L").convert("1"),
        "cmyk": rgb.convert("CMYK"),
        "i16": Image.fromarray(RNG.integers(0, 65536, (33, 44), dtype=np.uint16)),
        "tiny_1x1": Image.new("RGB", (1, 1), (200, 30, 90)),
        "tiny_10x27": Image.fromarray(_noise(27, 10)),
        "thin_27x300": Image.fromarray(_noise(27, 300)),
        "large_700x500": Image.fromarray(_noise(500, 700)),
    }


IMAGE_OPTIONS = {
    "default": {},
    "min_pixels": {"min_pixels": 28 * 28 * 30},
    "max_pixels": {"max_pixels": 28 * 28 * 20},
    "float_budget": {"min_pixels": 5000.5, "max_pixels": 1e5},
    "resized": {"resized_height": 130, "resized_width": 290},
    "resized_float": {"resized_height": 130.7, "resized_width": 40.2},
}


@pytest.mark.parametrize("option", list(IMAGE_OPTIONS))
def test_images_match(option, qvu):
    """Every mode and size, one option set at a time, through both process_vision_info."""
    images = _images()
    messages = _user(*({"type": "image", "image": img, **IMAGE_OPTIONS[option]} for img in images.values()))
    ours = process_vision_info(messages)
    assert_same(ours, qvu.process_vision_info(messages), f"images with {option}")
    if option == "default":  # tiny images are scaled up to the 4-block floor, not refused
        sizes = dict(zip(images, (im.size for im in ours[0])))
        assert sizes["tiny_1x1"] == (56, 56) and sizes["tiny_10x27"] == (56, 112)


def test_processor_on_fetched_images_matches_hf(qvu):
    """What process_vision_info returns, through our image processor, equals qwen-vl-utils'
    output through HF's: every mode, including a palette whose transparent index PIL keeps
    as an RGB colour key (on the 28 grid, so no resize blends the keyed pixels away; HF's
    processor makes them white)."""
    pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    images = _images()
    on_grid = Image.fromarray(_noise(56, 84)).quantize(16)
    on_grid.info["transparency"] = int(np.asarray(on_grid.getpalette()[:48]).reshape(16, 3).sum(1).argmin())
    images["palette_transparency_on_grid"] = on_grid
    ours_ip, hf_ip = ImageProcessor(), Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    for option in ("default", "max_pixels"):
        messages = _user(*({"type": "image", "image": img, **IMAGE_OPTIONS[option]} for img in images.values()))
        ours, _ = process_vision_info(messages)
        theirs, _ = qvu.process_vision_info(messages)
        for name, a, b in zip(images, ours, theirs):
            got, ref = ours_ip(a), hf_ip(b, return_tensors="np")
            np.testing.assert_array_equal(got["image_grid_thw"], ref["image_grid_thw"], err_msg=f"{name} {option}")
            diff = float(np.abs(got["pixel_values"] - ref["pixel_values"]).max())
            assert diff <= 1e-5, f"{name} with {option}: max abs diff {diff}"


def test_image_sources_match(tmp_path, qvu):
    """Paths, file:// URIs, data URIs and the image_url key give what qwen-vl-utils gives."""
    img = Image.fromarray(_noise(67, 101, 4), "RGBA")
    png, jpg = tmp_path / "odd.png", tmp_path / "odd.jpg"
    img.save(png)
    img.convert("RGB").save(jpg, quality=90)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = _user(
        {"type": "image", "image": str(png)},
        {"type": "image", "image": f"file://{jpg}", "max_pixels": 28 * 28 * 6},
        {"type": "image_url", "image_url": uri},
        {"type": "image", "image": uri, "resized_height": 60, "resized_width": 90},
    )
    assert_same(process_vision_info(messages), qvu.process_vision_info(messages))


def test_strip_where_qwen_vl_utils_fails(qvu):
    """A 5600x28 strip (aspect ratio 200) with max_pixels=3136: qwen-vl-utils scales its
    height to 0 and PIL refuses; we keep HF's floor of one 28-pixel block per side."""
    ele = {"type": "image", "image": Image.fromarray(_noise(28, 5600)), "max_pixels": 3136}
    with pytest.raises(ValueError):  # PIL: height and width must be > 0
        qvu.process_vision_info(_user(ele))
    images, _ = process_vision_info(_user(ele))
    assert images[0].size == (784, 28)  # 28 x 784: the width's share of the budget, floored


# ----------------------------------------------------------------------------- videos


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Short clips: frame rates 10, 25, 29.97 and 7, odd lengths, sizes off the 28 grid."""
    av = pytest.importorskip("av")
    d = tmp_path_factory.mktemp("vision_info")
    try:  # B-frames: decode order differs from presentation order
        h264 = write_video(d / "b.mp4", n=23, fps=25, h=48, w=80, codec="libx264")
    except (av.error.FFmpegError, ValueError):  # a PyAV build without libx264
        h264 = write_video(d / "b.mp4", n=23, fps=25, h=48, w=80)
    return {
        "10fps_30": write_video(d / "a.mp4", n=30, fps=10, h=64, w=96),
        "25fps_23_h264": h264,
        "29.97fps_40": write_video(d / "c.mp4", n=40, fps=Fraction(30000, 1001), h=64, w=96),
        "7fps_17": write_video(d / "d.mp4", n=17, fps=7, h=50, w=62),
    }


VIDEO_OPTIONS = {
    "default": {},
    "fps_4": {"fps": 4},
    "fps_0.5": {"fps": 0.5},
    "fps_3.3": {"fps": 3.3, "min_pixels": 1000.5},
    "nframes_8": {"nframes": 8},
    "nframes_5": {"nframes": 5},
    "min_max_frames": {"fps": 1, "min_frames": 6, "max_frames": 10},
    "max_frames_4": {"max_frames": 4},
    "start_end": {"video_start": 0.3, "video_end": 1.77},
    "end": {"video_end": 0.9},
    "start_before_end_after": {"video_start": -1.0, "video_end": 99},  # clamped to the video
    "max_pixels_over_budget": {"max_pixels": 28 * 28 * 2000},  # capped by the budget
    "max_pixels_under_budget": {"min_pixels": 3136, "max_pixels": 28 * 28 * 6},
    "fractional_budget": {"min_pixels": 3136, "total_pixels": 12544, "nframes": 6},
    "total_pixels": {"min_pixels": 3136, "total_pixels": 28 * 28 * 64, "max_pixels": 1e6},
    "resized": {"resized_height": 100, "resized_width": 150},
}


@pytest.mark.parametrize("clip", ["10fps_30", "25fps_23_h264", "29.97fps_40", "7fps_17"])
def test_video_files_match(clip, clips, qvu_video):
    """Every option on every clip: frames, sampled indices, metadata and sample fps (the
    return forms of process_vision_info are compared in test_mixed_messages_and_batches)."""
    for name, option in VIDEO_OPTIONS.items():
        ele = {"type": "video", "video": str(clips[clip]), **option}
        theirs = qvu_video.fetch_video(dict(ele), return_video_sample_fps=True, return_video_metadata=True)
        ours = fetch_video(dict(ele), return_video_sample_fps=True, return_video_metadata=True)
        assert_same(ours, theirs, f"{clip} {name}")
    # a given max_pixels never raises the budget; fractional budgets stay floats
    over = process_vision_info(_user({"video": str(clips["10fps_30"]), "max_pixels": 28 * 28 * 2000}))[1][0]
    assert over.shape[1:3] == (280, 392)
    frac = process_vision_info(_user({"video": str(clips["7fps_17"]), **VIDEO_OPTIONS["fractional_budget"]}))[1][0]
    assert frac.shape == (6, 56, 56, 3)


def test_file_uri_and_errors_agree(clips, qvu_video):
    """file:// paths read the same file; a range past the end is refused by both."""
    ele = {"type": "video", "video": f"file://{clips['10fps_30']}", "nframes": 4}
    assert_same(process_vision_info(_user(ele)), qvu_video.process_vision_info(_user(ele)))
    bad = {"type": "video", "video": str(clips["25fps_23_h264"]), "video_start": 1.0}
    with pytest.raises(Exception):
        qvu_video.process_vision_info(_user(bad))
    with pytest.raises(InputError, match=r"b\.mp4: video_start/video_end select no frames"):
        process_vision_info(_user(bad))


def _frames(n: int, h: int, w: int) -> list[Image.Image]:
    return [Image.fromarray(_noise(h, w)) for _ in range(n)]


FRAME_LIST_OPTIONS = {
    "default": {},
    "min_pixels": {"min_pixels": 3136},
    "max_pixels": {"min_pixels": 3136, "max_pixels": 28 * 28 * 12},
    "resized": {"resized_height": 100, "resized_width": 150},
    "sample_fps": {"sample_fps": 4, "raw_fps": 24},
}


def test_frame_list_videos_match(tmp_path, qvu):
    """A video given as frames: each fetched as an image with factor 56, then the video
    budget and resize (280x392 for 70x100 frames, not 112x168)."""
    frames = _frames(3, 70, 100)
    paths = []
    for i, f in enumerate(_frames(4, 45, 61)):
        paths.append(str(tmp_path / f"f{i}.png"))
        f.save(paths[-1])
    for name, option in FRAME_LIST_OPTIONS.items():
        for src in (frames, paths):
            ele = {"type": "video", "video": src, **option}
            for meta in (False, True):
                theirs = qvu.process_vision_info(_user(dict(ele)), return_video_kwargs=True, return_video_metadata=meta)
                ours = process_vision_info(_user(dict(ele)), return_video_kwargs=True, return_video_metadata=meta)
                assert_same(ours, theirs, f"frame list {name} metadata={meta}")
    video = process_vision_info(_user({"video": frames}))[1][0]
    assert video.shape == (4, 280, 392, 3)  # padded to an even count by repeating the last frame
    np.testing.assert_array_equal(video[3], video[2])


def test_mixed_messages_and_batches(clips, qvu_video):
    """Images and videos interleaved over several turns, a batch of conversations, text-only
    conversations, every return form, and another patch size."""
    img = Image.fromarray(_noise(90, 130, 4), "RGBA")
    conv1 = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": [
            {"type": "image", "image": img, "max_pixels": 28 * 28 * 16},
            {"type": "video", "video": str(clips["10fps_30"]), "fps": 1},
            {"type": "text", "text": "Compare."},
        ]},
        {"role": "assistant", "content": [{"type": "text", "text": "Sure."}]},
        {"role": "user", "content": [
            {"type": "video", "video": _frames(2, 40, 60), "min_pixels": 3136},
            {"type": "image_url", "image_url": Image.fromarray(_noise(30, 29))},
        ]},
    ]
    conv2 = _user({"type": "video", "video": str(clips["29.97fps_40"]), "nframes": 4})
    text_only = [{"role": "user", "content": "Hello"}]
    for messages in (conv1, [conv1, conv2], [conv2, text_only], text_only):
        for kw in ({}, {"return_video_kwargs": True}, {"return_video_kwargs": True, "return_video_metadata": True},
                   {"return_video_kwargs": True, "image_patch_size": 16}):
            assert_same(process_vision_info(messages, **kw), qvu_video.process_vision_info(messages, **kw), f"{kw}")
    images, videos, kwargs = process_vision_info([conv1, conv2], return_video_kwargs=True)
    assert len(images) == 2 and len(videos) == 3 and len(kwargs["fps"]) == 3
    assert process_vision_info(text_only) == (None, None)


# ----------------------------------------------------------------------------- kernels


def test_float_resize_bit_identical_to_torchvision():
    """resize_frames_float is torchvision.transforms.functional.resize(uint8, BICUBIC,
    antialias=True): up and down, odd sizes, one axis only, sharp content."""
    torch = pytest.importorskip("torch")
    tvF = pytest.importorskip("torchvision.transforms.functional")
    worst = 0
    for (t, h, w), (oh, ow) in [
        ((2, 61, 97), (112, 196)), ((3, 300, 451), (84, 140)), ((1, 45, 400), (300, 56)), ((2, 64, 96), (280, 392)),
        ((1, 28, 1400), (28, 112)), ((1, 90, 91), (90, 84)), ((1, 1000, 30), (28, 28)), ((2, 33, 35), (56, 35)),
    ]:
        x = _noise(t * h, w).reshape(t, h, w, 3)
        ref = tvF.resize(torch.from_numpy(x).permute(0, 3, 1, 2), [oh, ow], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
        diff = np.abs(resize_frames_float(x, oh, ow).astype(int) - ref.permute(0, 2, 3, 1).numpy())
        worst = max(worst, int(diff.max()))
    assert worst <= (0 if _exact_kernel() else 1), f"max difference {worst} levels"


def test_fma_emulation_rounds_once():
    """The float32 FMA emulated through float64: a sum that float64 rounds onto a float32
    midpoint (2**30 + 128 + 64 - 2**-40 becomes 2**30 + 192) is still rounded as the exact
    value (down, to 2**30 + 128), where rounding the float64 sum again would go up."""
    a = np.array([8 * (1 + 2**-23)], np.float32)
    b = np.array([8 * (1 - 2**-23)], np.float64)  # a * b = 64 - 2**-40 exactly
    c = np.array([2**30 + 128], np.float32)
    assert np.float32(a[0] * b[0] + c[0]) == 2**30 + 256  # double rounding
    assert _fma32(a, b, c)[0] == 2**30 + 128


def test_linspace_indices_with_offsets():
    """Sampled indices equal torch.linspace(first, last, n).round() for ranges that do not
    start at frame 0 (video_start), including torch's vectorised stretches (n >= 16)."""
    torch = pytest.importorskip("torch")
    for first, last in [(3, 29), (10, 2000), (7, 8), (1, 767), (250, 1800)]:
        for n in {2, 4, 6, 16, 30, 34, 128, 768}:
            if n <= last - first + 1:
                ref = torch.linspace(first, last, n).round().long().numpy()
                np.testing.assert_array_equal(linspace_indices(first, last, n), ref, err_msg=f"{first}..{last} n={n}")


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_input(tmp_path):
    """Every image/video error names the file, else 'image N' / 'video N' for in-memory inputs."""
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1)).save(tiny)
    ok = Image.new("RGB", (56, 56))
    cases = [
        # HF's processor path refuses tiny images, naming the file or the position
        (lambda: ImageProcessor()([str(tiny)]), "image 1x1 is too small: each side must be at least 28 pixels (image "),
        (lambda: ImageProcessor()([str(tiny)]), "tiny.png)"),
        (lambda: ImageProcessor()([ok, Image.new("RGB", (20, 20))]), "image 20x20 is too small: each side must be at least 28 pixels (image 2)"),
        (lambda: ImageProcessor()([ok, np.zeros((5, 5, 2), np.uint8)]), "image 2: expected 1, 3 or 4 channels"),
        (lambda: VideoProcessor()([np.zeros((2, 56, 56, 3), np.uint8), np.zeros((2, 20, 56, 3), np.uint8)]), "video 56x20 is too small: each side must be at least 28 pixels (video 2)"),
        # process_vision_info counts images and videos over the conversation
        (lambda: process_vision_info(_user({"image": ok}, {"image": str(tmp_path / "missing.png")})), "missing.png: file not found"),
        (lambda: process_vision_info(_user({"image": ok}, {"image": Image.new("RGB", (5700, 28))})), "aspect ratio 203.6 is over 200 (image 2)"),
        (lambda: process_vision_info(_user({"image": "data:image/png;base64,AAAA"})), "image 1 (data URI): cannot be read"),
        (lambda: process_vision_info(_user({"image": ok, "max_pixels": "big"})), "max_pixels must be a number, got 'big' (image 1)"),
        (lambda: process_vision_info(_user({"video": [ok, Image.new("RGB", (200, 90))]})), "video 1: frames must all have the same size"),
        (lambda: process_vision_info(_user({"video": [ok, object()]})), "video 1 frame 2: unsupported input type object"),
        (lambda: process_vision_info(_user({"video": str(tmp_path / "none.mp4")})), f"video {tmp_path / 'none.mp4'}: file not found"),
        (lambda: process_vision_info(_user({"video": "/" + "x" * 100 + "/clip.mp4"})), "video ..." + ("x" * 100 + "/clip.mp4")[-70:] + ": file not found"),  # long paths keep their end
    ]
    for fn, expected in cases:
        with pytest.raises(InputError) as err:
            fn()
        msg = str(err.value)
        assert expected in msg, msg
        assert "\n" not in msg


def test_fetch_image_modes_follow_qwen_vl_utils_and_processor_follows_hf():
    """The two paths differ only where qwen-vl-utils and HF's processor differ: a transparent
    palette index and an LA alpha are dropped by the first, composited on white by the second;
    tiny images are scaled up by the first, refused by our processor."""
    la = Image.fromarray(np.stack([np.full((56, 56), 30, np.uint8), np.zeros((56, 56), np.uint8)], -1), "LA")
    assert np.asarray(fetch_image({"image": la})).max() == 30  # alpha dropped: dark grey stays
    assert np.asarray(fetch_image({"image": la}, strict=True)).min() == 255  # transparent -> white
    assert fetch_image({"image": Image.new("RGB", (1, 1))}).size == (56, 56)
    with pytest.raises(InputError, match="too small"):
        fetch_image({"image": Image.new("RGB", (1, 1))}, strict=True)
