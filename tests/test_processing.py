"""Preprocessing parity with HF: images against transformers' PIL image processor, videos
against its video processor (torchvision), prompts and full processor outputs against
Qwen2VLProcessor built from the real Qwen2-VL tokenizer files, and clean errors."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from hf_utils import reference_folder
from media import assert_close, photo, quiet_transformers, white_composite, write_video
from qwen2vl_jax.errors import InputError
from qwen2vl_jax.processing import (
    ImageProcessor,
    Processor,
    VideoProcessor,
    fetch_image,
    fetch_video,
    process_vision_info,
    resize_frames,
    resize_frames_float,
    smart_resize,
)
from qwen2vl_jax.processing.video import linspace_indices

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("transformers")
quiet_transformers()

import torchvision.transforms.functional as tvF1  # noqa: E402 - v1: qwen-vl-utils' resize (float path)
import torchvision.transforms.v2.functional as tvF  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (  # noqa: E402
    Qwen2VLImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize  # noqa: E402
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor  # noqa: E402

MIN_PX, MAX_PX = 3136, 12845056  # the published preprocessor_config.json
# qwen-vl-utils' published video budgets, written here so the tests do not take them from the code
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 128 * 28 * 28, 768 * 28 * 28
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"
RNG = np.random.default_rng(1234)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def hf_image():
    return Qwen2VLImageProcessorPil(min_pixels=MIN_PX, max_pixels=MAX_PX)


@pytest.fixture(scope="module")
def our_image():
    return ImageProcessor(min_pixels=MIN_PX, max_pixels=MAX_PX)


@pytest.fixture(scope="module")
def hf_video():
    return Qwen2VLVideoProcessor(min_pixels=MIN_PX, max_pixels=MAX_PX, cap_pixels_per_frame=False)


@pytest.fixture(scope="module")
def our_video():
    return VideoProcessor(min_pixels=MIN_PX, max_pixels=MAX_PX)


@pytest.fixture(scope="module")
def hf_proc(reference_tokenizer):
    from transformers import AutoProcessor

    p = AutoProcessor.from_pretrained(reference_tokenizer)
    p.image_processor = Qwen2VLImageProcessorPil.from_pretrained(reference_tokenizer)  # the reference backend
    p.video_processor.cap_pixels_per_frame = False
    return p


@pytest.fixture(scope="module")
def proc(reference_tokenizer):
    return Processor.from_pretrained(reference_tokenizer)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    pytest.importorskip("av")
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4")  # 3 s at 10 fps, 96x64


def hf_images(hf, images, **kw):
    return hf(images, return_tensors="np", **kw)


# ----------------------------------------------------------------------------- smart_resize


def test_smart_resize_matches_hf_and_keeps_its_promises():
    for h, w in [(28, 28), (30, 5000), (224, 224), (1080, 1920), (2160, 3840), (479, 641), (100, 4000), (5000, 30)]:
        for lo, hi in [(MIN_PX, MAX_PX), (56 * 56, 28 * 28 * 1280), (28 * 28 * 256, 28 * 28 * 256), (3136, 50000)]:
            got = smart_resize(h, w, 28, lo, hi)
            assert got == hf_smart_resize(h, w, 28, lo, hi)
            rh, rw = got
            assert rh % 28 == 0 and rw % 28 == 0
            if lo < hi / 4 and max(h, w) / min(h, w) < 20:  # room for both bounds
                assert lo <= rh * rw <= hi
            if min(rh, rw) >= 112:  # aspect ratio kept up to rounding each side to 28
                assert abs(np.log((rh / rw) / (h / w))) < 0.3
    assert smart_resize(1080, 1920, 28, MIN_PX, MAX_PX) == (1092, 1932)
    assert smart_resize(2160, 3840, 28, MIN_PX, 28 * 28 * 1280) == (728, 1316)


# ----------------------------------------------------------------------------- images


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "camera", "coins"])
def test_photos_match_hf_pil(name, hf_image, our_image):
    img = Image.fromarray(photo(name))  # colour and grayscale photographs from scikit-image
    assert_close(our_image(img), hf_images(hf_image, img))


def _edge_cases():
    gray = Image.fromarray(RNG.integers(0, 256, (45, 70), dtype=np.uint8), "L")
    rgb = Image.fromarray(RNG.integers(0, 256, (61, 83, 3), dtype=np.uint8))
    rgba = Image.fromarray(RNG.integers(0, 256, (57, 90, 4), dtype=np.uint8), "RGBA")
    palette = rgb.quantize(16)
    palette_t = rgb.quantize(16)
    palette_t.info["transparency"] = 3
    la = Image.fromarray(RNG.integers(0, 256, (40, 50, 2), dtype=np.uint8), "LA")
    return {
        "grayscale": (gray, gray),
        "rgba": (rgba, white_composite(rgba)),
        "logo_rgba_photo": (Image.fromarray(photo("logo")), white_composite(Image.fromarray(photo("logo")))),
        "palette": (palette, palette.convert("RGB")),
        "palette_transparency": (palette_t, white_composite(palette_t)),
        "la": (la, white_composite(la)),
        "28x28": (Image.fromarray(RNG.integers(0, 256, (28, 28, 3), dtype=np.uint8)), None),
        "strip_30x5000": (Image.fromarray(RNG.integers(0, 256, (30, 5000, 3), dtype=np.uint8)), None),
        "strip_5000x30": (Image.fromarray(RNG.integers(0, 256, (5000, 30, 3), dtype=np.uint8)), None),
        "numpy_hwc": (np.asarray(rgb), rgb),
        "numpy_chw": (np.asarray(rgb).transpose(2, 0, 1).copy(), rgb),
        "numpy_gray": (np.asarray(gray), gray),
    }


@pytest.mark.parametrize("case", list(_edge_cases()))
def test_edge_cases_match_hf_pil(case, hf_image, our_image):
    ours_in, ref_in = _edge_cases()[case]
    ref_in = ours_in if ref_in is None else ref_in
    assert_close(our_image(ours_in), hf_images(hf_image, ref_in))


def test_transparency_is_composited_on_white(our_image):
    img = Image.new("RGBA", (56, 56), (255, 0, 0, 0))  # fully transparent red
    img.paste((0, 0, 255, 255), (0, 0, 28, 56))  # opaque blue left half
    ours = our_image(img)["pixel_values"]
    white = our_image(Image.new("RGB", (56, 56), "white"))["pixel_values"]
    blue = our_image(Image.new("RGB", (56, 56), (0, 0, 255)))["pixel_values"]
    # rows are 2x2 groups in merge order: the right half (columns 28..55) is white, not red
    right = np.arange(16).reshape(2, 2, 2, 2).transpose(0, 2, 1, 3).reshape(4, 4)[:, 2:].ravel()
    left = np.arange(16).reshape(2, 2, 2, 2).transpose(0, 2, 1, 3).reshape(4, 4)[:, :2].ravel()
    np.testing.assert_array_equal(ours[np.sort(right)], white[np.sort(right)])
    np.testing.assert_array_equal(ours[np.sort(left)], blue[np.sort(left)])


def test_just_over_max_pixels():
    cap = 448 * 448
    hf = Qwen2VLImageProcessorPil(min_pixels=MIN_PX, max_pixels=cap)
    ours = ImageProcessor(min_pixels=MIN_PX, max_pixels=cap)
    for size in [(448, 448), (449, 448), (448, 449), (470, 460)]:  # at, and just over, the cap
        img = Image.fromarray(RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        out = ours(img)
        assert_close(out, hf_images(hf, img))
        t, gh, gw = out["image_grid_thw"][0]
        assert gh * gw * 14 * 14 <= cap
    # 449x448 rounds back to 448x448 (at the cap); 470x460 rounds to 476x448, over it, so
    # it is scaled by sqrt(470*460/cap) and floored: 448x420
    assert ours(Image.new("RGB", (449, 448)))["image_grid_thw"].tolist() == [[1, 32, 32]]
    assert ours(Image.new("RGB", (460, 470)))["image_grid_thw"].tolist() == [[1, 32, 30]]


def test_per_image_and_per_call_pixel_overrides(hf_image, our_image):
    img = Image.fromarray(photo("coffee"))  # 600x400
    lo, hi = 28 * 28 * 300, 28 * 28 * 60
    # per-image (qwen-vl-utils element keys) and per-call (HF's min_pixels/max_pixels)
    up = our_image([{"image": img, "min_pixels": lo}])
    assert_close(up, hf_images(hf_image, img, size={"shortest_edge": lo, "longest_edge": MAX_PX}))
    down = our_image([{"image": img, "max_pixels": hi}])
    assert_close(down, hf_images(hf_image, img, size={"shortest_edge": MIN_PX, "longest_edge": hi}))
    assert_close(our_image(img, max_pixels=hi), down)
    assert int(np.prod(up["image_grid_thw"])) * 196 >= lo
    assert int(np.prod(down["image_grid_thw"])) * 196 <= hi
    # processor-level settings
    hf2 = Qwen2VLImageProcessorPil(min_pixels=lo, max_pixels=28 * 28 * 400)
    assert_close(ImageProcessor(min_pixels=lo, max_pixels=28 * 28 * 400)(img), hf_images(hf2, img))
    # several images with different overrides in one call keep their order
    both = our_image([{"image": img, "min_pixels": lo}, img, {"image": img, "max_pixels": hi}])
    np.testing.assert_array_equal(
        both["image_grid_thw"], np.concatenate([up["image_grid_thw"], our_image(img)["image_grid_thw"], down["image_grid_thw"]])
    )


def test_resized_height_width(hf_image, our_image):
    img = Image.fromarray(photo("chelsea"))
    h, w = hf_smart_resize(130, 290, 28, MIN_PX, MAX_PX)  # qwen-vl-utils rounds the request
    ref = img.resize((w, h), Image.BICUBIC)
    out = our_image([{"image": img, "resized_height": 130, "resized_width": 290}])
    assert out["image_grid_thw"].tolist() == [[1, h // 14, w // 14]]
    assert_close(out, hf_images(hf_image, ref))
    assert fetch_image({"image": img, "resized_height": 130, "resized_width": 290}).size == (w, h)


def test_image_sources_are_equivalent(tmp_path, our_image):
    img = Image.fromarray(photo("rocket")).resize((160, 107))
    path = tmp_path / "rocket.png"
    img.save(path)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    ref = our_image(img)
    for src in [str(path), path, f"file://{path}", uri, {"image": str(path)}, {"image_url": uri}, buf.getvalue()]:
        assert_close(our_image([src]), ref)


# ----------------------------------------------------------------------------- videos


def test_resize_frames_bit_identical_to_torchvision():
    for (t, h, w), (oh, ow) in [((2, 61, 97), (112, 196)), ((3, 300, 451), (84, 140)), ((1, 45, 400), (300, 56)), ((2, 90, 90), (90, 90))]:
        x = RNG.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
        ref = tvF.resize(torch.from_numpy(x).permute(0, 3, 1, 2), [oh, ow], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
        np.testing.assert_array_equal(resize_frames(x, oh, ow), ref.permute(0, 2, 3, 1).numpy())


def test_frame_indices_match_torch_linspace():
    for total in [2, 7, 29, 30, 301, 1801]:
        for n in {2, 4, 6, 30, 128, 768}:
            if n <= total:
                ref = torch.linspace(0, total - 1, n).round().long().numpy()
                np.testing.assert_array_equal(linspace_indices(0, total - 1, n), ref)


def _frames(t, h, w, seed=0):
    base = photo("chelsea")  # natural content, shifted per frame
    return np.stack([np.roll(base, 7 * i + seed, axis=1)[:h, :w] for i in range(t)])


@pytest.mark.parametrize(
    "make",
    [
        lambda: _frames(5, 150, 230),  # odd count: HF repeats the last frame
        lambda: _frames(4, 60, 90),
        lambda: [Image.fromarray(f) for f in _frames(3, 100, 131)],
        lambda: _frames(2, 56, 84),  # already a multiple of 28: no resize
    ],
    ids=["array_odd", "array_small", "pil_frames", "no_resize"],
)
def test_video_frames_match_hf(make, hf_video, our_video):
    frames = make()
    assert_close(our_video([frames]), hf_video(videos=[frames], return_tensors="np"))


def test_video_downscale_matches_hf():
    hf = Qwen2VLVideoProcessor(min_pixels=MIN_PX, max_pixels=28 * 28 * 30, cap_pixels_per_frame=False)
    ours = VideoProcessor(min_pixels=MIN_PX, max_pixels=28 * 28 * 30)
    frames = [_frames(4, 300, 451), _frames(2, 200, 300, seed=3)]
    out = ours(frames)
    assert_close(out, hf(videos=frames, return_tensors="np"))
    assert out["video_grid_thw"].tolist()[1][0] == 1


def test_video_file_sampled_at_2_fps(clip):
    import av

    video = fetch_video({"video": str(clip)})
    assert video.shape[0] == 6  # 3 s at 2 fps
    assert video.dtype == np.uint8 and video.shape[1] % 28 == 0 and video.shape[2] % 28 == 0
    assert fetch_video({"video": f"file://{clip}", "fps": 4}).shape[0] == 12
    assert fetch_video({"video": str(clip), "nframes": 8}).shape[0] == 8
    assert fetch_video({"video": str(clip), "fps": 0.5}).shape[0] == 4  # min_frames
    assert fetch_video({"video": str(clip), "video_start": 1.0, "video_end": 2.0}).shape[0] == 4

    # reference: every frame decoded, sampled with torch.linspace, resized as qwen-vl-utils
    # resizes (torchvision.transforms.functional.resize on uint8: torch's float32 kernel)
    with av.open(str(clip)) as c:
        all_frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert len(all_frames) == 30
    idx = torch.linspace(0, 29, 6).round().long().numpy()
    max_px = max(min(VIDEO_MAX_PIXELS, VIDEO_TOTAL_PIXELS / 6 * 2), int(VIDEO_MIN_PIXELS * 1.05))
    h, w = hf_smart_resize(64, 96, 28, VIDEO_MIN_PIXELS, max_px)
    assert (h, w) == (280, 392)  # a 64x96 clip is scaled up to the 128*28*28 floor
    ref = tvF1.resize(torch.from_numpy(all_frames[idx]).permute(0, 3, 1, 2), [h, w], interpolation=tvF1.InterpolationMode.BICUBIC, antialias=True)
    np.testing.assert_array_equal(video, ref.permute(0, 2, 3, 1).numpy())


def test_video_pixel_budget_is_shared_across_frames(tmp_path):
    pytest.importorskip("av")
    clip = write_video(tmp_path / "large.mp4", n=20, h=224, w=336)
    budget = {"min_pixels": MIN_PX, "total_pixels": 28 * 28 * 64}
    few = fetch_video({"video": str(clip), "nframes": 4, **budget})
    many = fetch_video({"video": str(clip), "nframes": 16, **budget})
    # per frame: max(min(768*784, total / n * 2), 1.05 * min_pixels)
    assert few.shape[1:3] == hf_smart_resize(224, 336, 28, MIN_PX, 28 * 28 * 64 / 4 * 2)
    assert many.shape[1:3] == hf_smart_resize(224, 336, 28, MIN_PX, max(28 * 28 * 64 / 16 * 2, int(MIN_PX * 1.05)))
    default = hf_smart_resize(224, 336, 28, VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS)  # budget not binding
    assert fetch_video({"video": str(clip), "nframes": 4}).shape[1:3] == default
    assert few.shape[1] * few.shape[2] > many.shape[1] * many.shape[2]


def test_video_frame_list_pads_odd_count():
    frames = [Image.fromarray(f) for f in _frames(3, 100, 131)]
    video = fetch_video({"video": frames})
    assert video.shape[0] == 4
    np.testing.assert_array_equal(video[3], video[2])
    # qwen-vl-utils fetches each frame as an image with factor 56, then resizes to the video budget
    first = np.asarray(fetch_image({"image": frames[0]}, 56))
    np.testing.assert_array_equal(video[0], resize_frames_float(first[None], *video.shape[1:3])[0])


def test_fetched_video_through_both_processors(clip, hf_video, our_video):
    video = fetch_video({"video": str(clip)})
    assert_close(our_video([video]), hf_video(videos=[video], return_tensors="np"))
    # giving the path runs the same fetch first
    assert_close(our_video([str(clip)]), our_video([video]))


# ----------------------------------------------------------------------------- chat template + processor

MESSAGES = {
    "single_image": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
    "several_images": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare "},
                {"type": "image", "image": "a.png"},
                {"type": "text", "text": " and "},
                {"type": "image_url", "image_url": "b.png"},
                {"type": "text", "text": "."},
            ],
        }
    ],
    "video": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}],
    "multi_turn": [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat.\nIt sleeps."},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "And here? 你好"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A rocket."}]},
        {"role": "user", "content": "Thanks!"},
    ],
    "text_only": [{"role": "user", "content": "Hello  world\n\n  "}],
}


@pytest.mark.parametrize("name", list(MESSAGES))
@pytest.mark.parametrize("kw", [{"add_generation_prompt": True}, {}, {"add_generation_prompt": True, "add_vision_id": True}])
def test_chat_template_matches_hf(name, kw, proc, hf_proc):
    assert proc.apply_chat_template(MESSAGES[name], **kw) == hf_proc.apply_chat_template(MESSAGES[name], **kw)


def test_continue_final_message_matches_hf(proc, hf_proc):
    for conv in [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure, "}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [{"type": "text", "text": "The answer is"}]}],
        MESSAGES["single_image"],
    ]:
        ours = proc.apply_chat_template(conv, continue_final_message=True)
        assert ours == hf_proc.apply_chat_template(conv, continue_final_message=True)
        assert not ours.endswith("<|im_end|>\n")


def test_chat_template_batch_and_base_model():
    base = reference_folder("qwen2-vl-2b")  # the base model's chat template
    p = Processor.from_pretrained(base)
    from transformers import AutoProcessor

    hf = AutoProcessor.from_pretrained(base)
    items = [{"type": "image"}, {"type": "text", "text": "A photo of"}, {"type": "video"}]
    assert p.template_name == "base"
    assert p.apply_chat_template(items) == hf.apply_chat_template(items)
    assert p.apply_chat_template("plain text") == "plain text"
    img = Image.fromarray(photo("astronaut")).resize((84, 56))
    text = p.apply_chat_template(items[:2])
    assert_close(p(text=[text], images=[img]), hf(text=[text], images=[img], return_tensors="np"), keys=["input_ids", "attention_mask"])


def test_chat_template_batched_conversations(proc, hf_proc):
    convs = [MESSAGES["single_image"], MESSAGES["text_only"]]
    assert proc.apply_chat_template(convs, add_generation_prompt=True) == hf_proc.apply_chat_template(convs, add_generation_prompt=True)


def _imgs(*sizes):
    names = ["astronaut", "chelsea", "coffee", "rocket"]
    return [Image.fromarray(photo(names[i % 4])).resize(s) for i, s in enumerate(sizes)]


@pytest.mark.parametrize("case", ["single_image", "several_images", "video", "multi_turn", "batch_padding", "batch_right_padding"])
def test_processor_matches_hf(case, proc, hf_proc):
    video = _frames(4, 90, 120)
    kw_ours, kw_hf = {}, {"padding": True}
    if case in ("single_image", "several_images", "video", "multi_turn"):
        texts = [proc.apply_chat_template(MESSAGES[case], add_generation_prompt=True)]
        images = {"single_image": _imgs((200, 150)), "several_images": _imgs((120, 90), (64, 300)), "video": None, "multi_turn": _imgs((100, 100))}[case]
        videos = [video] if case in ("video", "multi_turn") else None
    else:
        texts = [
            proc.apply_chat_template(MESSAGES["several_images"], add_generation_prompt=True),
            proc.apply_chat_template(MESSAGES["text_only"], add_generation_prompt=True),
            proc.apply_chat_template(MESSAGES["video"], add_generation_prompt=True),
        ]
        images, videos = _imgs((120, 90), (300, 64)), [video]
        if case == "batch_right_padding":
            kw_ours = kw_hf = {"padding": True, "padding_side": "right"}
    ours = proc(text=texts, images=images, videos=videos, **kw_ours)
    ref = hf_proc(text=texts, images=images, videos=videos, return_tensors="np", **kw_hf)
    assert set(ours) == set(ref)
    assert_close(ours, ref)
    # every placeholder became t*h*w/4 tokens
    n_img = int((ours["input_ids"] == proc.image_token_id).sum())
    grid = ours.get("image_grid_thw", np.zeros((0, 3), np.int64))
    assert n_img == int(np.prod(grid, axis=1).sum()) // 4
    if case == "batch_padding":
        assert (ours["attention_mask"][:, -1] == 1).all() and (ours["attention_mask"][1, 0] == 0)


def test_messages_end_to_end(tmp_path, clip, proc, hf_proc):
    """Messages with file paths -> process_vision_info -> processor, against HF fed the same
    fetched inputs; apply_chat_template(tokenize=True) gives the same."""
    path = tmp_path / "coffee.jpg"
    Image.fromarray(photo("coffee")).save(path, quality=95)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": f"file://{path}", "max_pixels": 28 * 28 * 100},
                {"type": "video", "video": str(clip)},
                {"type": "text", "text": "Describe both."},
            ],
        }
    ]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    images, videos = process_vision_info(messages)
    assert images[0].size[0] * images[0].size[1] <= 28 * 28 * 100 and videos[0].shape[0] == 6
    ours = proc(text=[text], images=images, videos=videos)
    assert_close(ours, hf_proc(text=[text], images=images, videos=videos, return_tensors="np"))
    direct = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert_close(direct, ours)


def _chat_images():
    """Images on which the chat path once read differently from qwen-vl-utils: LA with alpha
    (qwen-vl-utils drops it), a side under 28 pixels (qwen-vl-utils scales it up), and a
    palette with a transparent index, already on the 28 grid so that its colour key (what
    PIL's P -> RGB keeps of the index) survives qwen-vl-utils' resize for HF to composite."""
    rng = np.random.default_rng(77)
    palette = Image.fromarray(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)).quantize(16)
    palette.info["transparency"] = int(np.asarray(palette.getpalette()[:48]).reshape(16, 3).sum(1).argmin())
    palette_off_grid = Image.fromarray(rng.integers(0, 256, (61, 83, 3), dtype=np.uint8)).quantize(16)
    palette_off_grid.info["transparency"] = 3
    return {
        "la_alpha": Image.fromarray(rng.integers(0, 256, (40, 50, 2), dtype=np.uint8), "LA"),
        "small_20x50": Image.fromarray(rng.integers(0, 256, (50, 20, 3), dtype=np.uint8)),
        "palette_transparency": palette,
        "palette_transparency_resized": palette_off_grid,
        "rgba": Image.fromarray(rng.integers(0, 256, (57, 90, 4), dtype=np.uint8), "RGBA"),
        "tiny_1x1": Image.new("RGB", (1, 1), (200, 30, 90)),
    }


def _with_images(*images, **options):
    return [{"role": "user", "content": [*({"type": "image", "image": im, **options} for im in images), {"type": "text", "text": "Describe."}]}]


@pytest.mark.parametrize("case", [*_chat_images(), "all_at_once"])
def test_chat_path_reads_images_as_process_vision_info(case, proc, hf_proc):
    """apply_chat_template(tokenize=True) equals HF's processor fed qwen-vl-utils' own
    process_vision_info, image for image."""
    qwen_vl_utils = pytest.importorskip("qwen_vl_utils")
    images = list(_chat_images().values()) if case == "all_at_once" else [_chat_images()[case]]
    for options in ({}, {"max_pixels": 28 * 28 * 6}):
        messages = _with_images(*images, **options)
        text = hf_proc.apply_chat_template(messages, add_generation_prompt=True)
        ref = hf_proc(text=[text], images=qwen_vl_utils.process_vision_info(messages)[0], return_tensors="np")
        ours = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert_close(ours, ref)
        # ... and our process_vision_info followed by our processor, the documented recipe
        assert_close(proc(text=[text], images=process_vision_info(messages)[0]), ours)


def test_expand_placeholders_is_what_the_processor_does(proc):
    img = _imgs((120, 90), (64, 300))
    texts = [IMG + "one", "two " + IMG + VID]
    video = _frames(4, 90, 120)
    full = proc(text=texts, images=img, videos=[video], padding_side="right")
    counts = [np.prod(full[k], axis=1) // 4 for k in ("image_grid_thw", "video_grid_thw")]
    expanded = proc.expand_placeholders(proc.tokenizer.encode_batch(texts), *counts)
    for row, ids in enumerate(expanded):
        assert ids.dtype == np.int64
        np.testing.assert_array_equal(ids, full["input_ids"][row, : len(ids)])
        assert int(full["attention_mask"][row].sum()) == len(ids)
    assert [len(a) for a in proc.expand_placeholders([[1, 2]])] == [2]  # no media, nothing to expand
    with pytest.raises(InputError, match="text has 1 <|image_pad|> placeholder but 2 images were given"):
        proc.expand_placeholders(proc.tokenizer.encode_batch([IMG]), [4, 4])


def test_return_jax_arrays(proc):
    import jax.numpy as jnp

    out = proc(text=IMG + "hi", images=_imgs((56, 56)), return_tensors="jax")
    assert isinstance(out["input_ids"], jnp.ndarray) and out.input_ids.shape == (1, 7)  # 4 image tokens
    np.testing.assert_array_equal(np.asarray(out["pixel_values"]), proc(text=IMG + "hi", images=_imgs((56, 56)))["pixel_values"])


# ----------------------------------------------------------------------------- errors


def _bad_files(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    buf = io.BytesIO()
    Image.new("RGB", (100, 100), "red").save(buf, "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buf.getvalue()[:70])
    notvideo = tmp_path / "notes.mp4"
    notvideo.write_text("this is not a video")
    return corrupt, truncated, notvideo


def test_bad_input_gives_one_clear_error(tmp_path, proc):
    corrupt, truncated, notvideo = _bad_files(tmp_path)
    ok = Image.new("RGB", (56, 56))
    cases = [
        (lambda: proc(text=IMG, images=[str(notvideo)]), "notes.mp4: cannot be read (not an image file)"),
        (lambda: proc(text=IMG, images=[str(corrupt)]), "corrupt.png: cannot be read (corrupt or truncated)"),
        (lambda: proc(text=IMG, images=[str(truncated)]), "truncated.png: cannot be read"),
        (lambda: proc(text=IMG, images=[str(tmp_path / "missing.png")]), "missing.png: file not found"),
        (lambda: proc(text=IMG, images=[Image.new("RGB", (20, 20))]), "image 20x20 is too small: each side must be at least 28 pixels"),
        (lambda: proc(text=IMG, images=[np.zeros((27, 300, 3), np.uint8)]), "too small"),
        (lambda: proc(text=IMG, images=[Image.new("RGB", (28 * 250, 28))]), "aspect ratio 250.0 is over 200"),
        (lambda: proc(text=IMG + IMG, images=[ok]), "text has 2 <|image_pad|> placeholders but 1 image was given"),
        (lambda: proc(text=IMG, images=[ok, ok]), "text has 1 <|image_pad|> placeholder but 2 images were given"),
        (lambda: proc(text=IMG), "but 0 images were given"),
        (lambda: proc(text=VID, videos=[str(notvideo)]), "notes.mp4: cannot be decoded (not a supported video file)"),
        (lambda: proc(text=VID, videos=[str(tmp_path / "none.mp4")]), "none.mp4: file not found"),
        (lambda: proc(text=VID + VID, videos=[_frames(2, 56, 56)]), "2 <|video_pad|> placeholders but 1 video was given"),
        (lambda: proc(text=IMG, images=[np.random.default_rng(0).random((40, 40, 3))]), "pixel values must be integers in 0..255"),
        (lambda: proc(text=IMG, images=[object()]), "unsupported input type object"),
        (lambda: proc(text=IMG, images=["data:image/png;base64,AAAA"]), "cannot be read"),
        (lambda: proc(text=[IMG, "x"], images=[ok], padding=False), "different token lengths"),
        (lambda: proc.apply_chat_template([{"role": "user"}]), "message 0: expected a dict with 'role' and 'content'"),
        (lambda: Processor(proc.tokenizer, chat_template="{{ messages }}").apply_chat_template(MESSAGES["text_only"]), "not one of Qwen2-VL's official templates"),
    ]
    for fn, expected in cases:
        with pytest.raises(InputError) as err:
            fn()
        msg = str(err.value)
        assert expected in msg, msg
        assert "\n" not in msg
    # nothing else broke: the same processor still gives the same answer as before
    before = proc(text=IMG + "ok", images=[ok])
    with pytest.raises(InputError):
        proc(text=IMG, images=[str(corrupt)])
    assert_close(proc(text=IMG + "ok", images=[ok]), before)


def test_video_sampling_errors(clip):
    with pytest.raises(InputError, match="either 'fps' or 'nframes'"):
        fetch_video({"video": str(clip), "fps": 1, "nframes": 4})
    with pytest.raises(InputError, match="cannot sample 40 frames from 30"):
        fetch_video({"video": str(clip), "nframes": 40})


def test_image_over_the_pixel_limit_is_one_line(tmp_path, monkeypatch):
    """PIL refuses images over twice MAX_IMAGE_PIXELS (a decompression bomb guard) and warns
    between once and twice; the limit is lowered here so a small file stands in for a huge one."""
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    big, middle = tmp_path / "big.png", tmp_path / "middle.png"
    Image.new("RGB", (64, 64), "red").save(big)  # 4096 > 2 * 1000
    Image.new("RGB", (40, 40), "red").save(middle)  # 1600: between the warning and the error
    with pytest.raises(InputError, match=r"big.png: too many pixels to decode safely \(PIL's limit is 2000 pixels\)"):
        fetch_image({"image": str(big)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fetch_image({"image": str(middle)}).size == (56, 56)


def test_one_frame_video_is_refused_plainly(tmp_path):
    pytest.importorskip("av")
    one = write_video(tmp_path / "one.mp4", n=1)
    with pytest.raises(InputError, match="one.mp4: has 1 frame\\(s\\); a video needs at least 2"):
        fetch_video({"video": str(one)})
