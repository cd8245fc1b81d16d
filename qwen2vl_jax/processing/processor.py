"""`Processor`: chat messages, images and videos to model inputs, as HF's Qwen2VLProcessor.

    proc = Processor.from_pretrained(DIR)
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    images, videos = process_vision_info(messages)          # as qwen-vl-utils
    inputs = proc(text=[text], images=images, videos=videos)

returns numpy arrays with HF's keys, dtypes and shapes: input_ids / attention_mask /
mm_token_type_ids int64 [B, L] (left-padded by default), pixel_values float32 [N, 1176],
image_grid_thw int64 [n, 3], pixel_values_videos, video_grid_thw. Each <|image_pad|>
(<|video_pad|>) becomes t*h*w/4 copies of itself; the expansion is done on token ids
(the placeholder is an atomic special token, so this equals tokenizing the expanded text).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from ..errors import InputError
from ..jsonio import read_json
from . import chat_template as ct
from .image import ImageProcessor, fetch_image, parallel_map
from .tokenizer import Qwen2Tokenizer
from .video import VideoProcessor, fetch_video


class BatchFeature(dict):
    """A dict whose keys are also attributes (HF's BatchFeature, minus the tensor types)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


# ----------------------------------------------------------------------------- messages


def _is_vision(ele: Any) -> bool:
    return isinstance(ele, dict) and (
        "image" in ele or "image_url" in ele or "video" in ele or ele.get("type") in ("image", "image_url", "video")
    )


def extract_vision_info(conversations: Sequence[Any]) -> list[dict]:
    """The image/video content items of one conversation or a batch of them, in order."""
    if not conversations:
        return []
    if isinstance(conversations[0], dict):
        conversations = [conversations]
    out = []
    for conv in conversations:
        for msg in conv:
            content = msg.get("content") if isinstance(msg, dict) else None
            if isinstance(content, list):
                out.extend(ele for ele in content if _is_vision(ele))
    return out


def process_vision_info(
    conversations: Sequence[Any],
    return_video_kwargs: bool = False,
    return_video_metadata: bool = False,
    image_patch_size: int = 14,
) -> tuple:
    """qwen-vl-utils 0.0.14's process_vision_info, for one conversation or a batch of them:
    (images, videos), or (images, videos, video_kwargs) with return_video_kwargs.

    images: resized RGB PIL images; videos: uint8 [T, H, W, 3] arrays (qwen-vl-utils returns
    float [T, 3, H, W] torch tensors holding the same integers), each list None when empty.
    With return_video_metadata each video is (frames, {"fps", "frames_indices",
    "total_num_frames", "video_backend"}). video_kwargs is {"do_sample_frames": False,
    "fps": [sampled fps per video]}, without "fps" when metadata is returned, as there.
    Sizes, pixels, frame counts and sampled frames are those qwen-vl-utils gives (see
    fetch_image / fetch_video for its rules); errors name the file, else 'image N' /
    'video N' counted over the conversations."""
    factor = int(image_patch_size) * 2  # the 2x2 spatial merge
    image_elements, video_elements = [], []
    for ele in extract_vision_info(conversations):
        if "image" in ele or "image_url" in ele:
            image_elements.append(ele)
        elif "video" in ele:
            video_elements.append(ele)
        else:
            raise InputError(f"content item of type {ele.get('type')!r} has no 'image', 'image_url' or 'video'")
    # Images are read and resized on the shared pool (PIL releases the GIL), in order.
    images = parallel_map(lambda i: fetch_image(image_elements[i], factor, f"image {i + 1}"), range(len(image_elements)))
    videos, sample_fps = [], []
    for i, ele in enumerate(video_elements):
        video, fps = fetch_video(
            ele, factor, return_video_sample_fps=True, return_video_metadata=return_video_metadata, name=f"video {i + 1}"
        )
        videos.append(video)
        sample_fps.append(fps)
    video_kwargs: dict[str, Any] = {"do_sample_frames": False}
    if not return_video_metadata:
        video_kwargs["fps"] = sample_fps
    if return_video_kwargs:
        return images or None, videos or None, video_kwargs
    return images or None, videos or None


# ----------------------------------------------------------------------------- inputs


def _as_image_list(images: Any) -> list[Any]:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        out = []
        for item in images:  # a per-sample nested list is flattened, in order
            out.extend(item if isinstance(item, (list, tuple)) else [item])
        return out
    return [images]


def _is_frame(x: Any) -> bool:
    return isinstance(x, Image.Image) or (isinstance(x, np.ndarray) and x.ndim in (2, 3))


def _as_video_list(videos: Any) -> list[Any]:
    if videos is None:
        return []
    if isinstance(videos, (list, tuple)):
        if videos and all(_is_frame(v) for v in videos):
            return [list(videos)]  # one video given as its frames
        return list(videos)
    return [videos]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


class Processor:
    """Tokenizer + image processor + video processor + chat template of a Qwen2-VL folder."""

    def __init__(
        self,
        tokenizer: Qwen2Tokenizer,
        image_processor: ImageProcessor | None = None,
        video_processor: VideoProcessor | None = None,
        chat_template: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor or ImageProcessor()
        self.video_processor = video_processor or VideoProcessor()
        self.chat_template = chat_template if chat_template is not None else ct.INSTRUCT_TEMPLATE
        self.template_name = ct.identify(self.chat_template)
        self.image_token = tokenizer.image_token
        self.video_token = tokenizer.video_token
        self.image_token_id = tokenizer.image_token_id
        self.video_token_id = tokenizer.video_token_id

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> "Processor":
        """Reads tokenizer.json (or vocab.json + merges.txt), tokenizer_config.json,
        preprocessor_config.json (video_preprocessor_config.json for videos when present)
        and the chat template (chat_template.jinja / .json / tokenizer_config.json).
        `min_pixels` / `max_pixels` overrides apply to images, as in HF."""
        d = Path(path)
        if not d.is_dir():
            raise InputError(f"{d}: not a folder")
        tokenizer = Qwen2Tokenizer.from_pretrained(d)

        def read(name: str) -> dict:
            return read_json(d / name, missing_ok=True) or {}

        pre = read("preprocessor_config.json")
        vid = read("video_preprocessor_config.json") or pre
        img_cfg = dict(pre)
        for k in ("min_pixels", "max_pixels"):
            if overrides.get(k) is not None:
                img_cfg[k] = overrides[k]
        template = None
        if (d / "chat_template.jinja").exists():
            template = (d / "chat_template.jinja").read_text()
        elif (d / "chat_template.json").exists():
            template = read("chat_template.json").get("chat_template")
        else:
            template = tokenizer.config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default", next(iter(named.values()), None))
        return cls(tokenizer, ImageProcessor.from_config(img_cfg), VideoProcessor.from_config(vid), template)

    # ------------------------------------------------------------------ chat template

    def apply_chat_template(
        self,
        conversation: Sequence[Any],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        add_vision_id: bool = False,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Render messages with the folder's (official) template, as HF does.

        A batch (a list of conversations) gives a list of strings. With tokenize=True the
        images and videos named in the messages are loaded by `process_vision_info` (so with
        qwen-vl-utils' rules) and the processed inputs are returned (return_dict=True) or just
        the input_ids: the same as `self(text=..., images=..., videos=...)` on its output."""
        given = kwargs.get("chat_template")
        name = ct.identify(given) if given is not None else self.template_name
        if name is None:
            where = "the chat_template given" if given is not None else "the folder's chat template"
            raise InputError(
                f"{where} is not one of Qwen2-VL's official templates; "
                "render the prompt yourself and pass it as text="
            )
        batched = (
            isinstance(conversation, (list, tuple))
            and bool(conversation)
            and isinstance(conversation[0], (list, tuple))
        )
        convs = list(conversation) if batched else [conversation]
        texts = []
        for conv in convs:
            if continue_final_message:  # render up to the end of the final message's text (HF)
                text = ct.render(name, _tag_final(conv), False, add_vision_id)
                text = text[: text.rindex(_CONTINUE_TAG)]
            else:
                text = ct.render(name, conv, add_generation_prompt, add_vision_id)
            texts.append(text)
        if not tokenize:
            return texts if batched else texts[0]
        # The media are read by process_vision_info itself, so these inputs are what HF's
        # processor gives for its output (the documented two-step recipe), tiny images and
        # alpha modes included.
        images, videos = process_vision_info(convs if name == "instruct" else [[{"content": c}] for c in convs])
        call_kw = {k: v for k, v in kwargs.items() if k in ("padding", "padding_side", "max_length", "return_tensors")}
        out = self(text=texts, images=images, videos=videos, **call_kw)
        if return_dict:
            return out
        ids = out["input_ids"]
        return ids if batched else ids[0]

    # ------------------------------------------------------------------ processing

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        videos: Any = None,
        padding: bool | str = True,
        padding_side: str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = "np",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """HF's Qwen2VLProcessor.__call__.

        images: PIL images, uint8 arrays, paths / file:// / data: URIs, or qwen-vl-utils
        element dicts ({"image": ..., "min_pixels", "max_pixels", "resized_height",
        "resized_width"}); a flat list in placeholder order, or one list per text.
        videos: paths, element dicts, [T, H, W, C] arrays or lists of frames.
        padding: True / "longest" (default) or "max_length" (with max_length) pads on
        `padding_side` (the tokenizer's, left for Qwen2-VL); False requires equal lengths.
        """
        if kwargs.get("truncation"):
            raise InputError("truncation is not supported: it would cut image/video tokens")
        out = BatchFeature()
        image_list = _as_image_list(images)
        video_list = _as_video_list(videos)
        merge = self.image_processor.merge_size**2
        if image_list:
            out.update(self.image_processor(image_list, min_pixels=min_pixels, max_pixels=max_pixels))
        if video_list:
            out.update(self.video_processor(video_list))
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not all(isinstance(t, str) for t in texts):
                raise InputError("text must be a string or a list of strings")
            image_counts = (
                np.prod(out["image_grid_thw"], axis=1) // merge if image_list else np.zeros(0, np.int64)
            )
            video_counts = (
                np.prod(out["video_grid_thw"], axis=1) // self.video_processor.merge_size**2
                if video_list
                else np.zeros(0, np.int64)
            )
            ids = self.expand_placeholders(self.tokenizer.encode_batch(texts), image_counts, video_counts)
            out.update(self._pad(ids, padding, padding_side, max_length))
        return _convert(out, return_tensors)

    def expand_placeholders(
        self,
        batch_ids: Sequence[Sequence[int]],
        image_token_counts: Sequence[int] = (),
        video_token_counts: Sequence[int] = (),
    ) -> list[np.ndarray]:
        """Already-tokenized texts with each <|image_pad|> (<|video_pad|>) repeated as many
        times as its image (video) has tokens: int64 [L_i] per text.

        image_token_counts / video_token_counts: tokens per image / video, in placeholder
        order over the whole batch (t*h*w / merge_size**2 of its grid_thw). Raises InputError
        when the placeholders and the counts differ in number."""
        image_counts = np.asarray(image_token_counts, dtype=np.int64).reshape(-1)
        video_counts = np.asarray(video_token_counts, dtype=np.int64).reshape(-1)
        arrays = [np.asarray(ids, dtype=np.int64) for ids in batch_ids]
        n_img = sum(int(np.count_nonzero(a == self.image_token_id)) for a in arrays)
        n_vid = sum(int(np.count_nonzero(a == self.video_token_id)) for a in arrays)
        if n_img != len(image_counts):
            raise InputError(
                f"text has {_plural(n_img, self.image_token + ' placeholder')} "
                f"but {_plural(len(image_counts), 'image')} {'was' if len(image_counts) == 1 else 'were'} given"
            )
        if n_vid != len(video_counts):
            raise InputError(
                f"text has {_plural(n_vid, self.video_token + ' placeholder')} "
                f"but {_plural(len(video_counts), 'video')} {'was' if len(video_counts) == 1 else 'were'} given"
            )
        out, i_img, i_vid = [], 0, 0
        for a in arrays:
            reps = np.ones(len(a), dtype=np.int64)
            is_img, is_vid = a == self.image_token_id, a == self.video_token_id
            k, m = int(is_img.sum()), int(is_vid.sum())
            reps[is_img] = image_counts[i_img : i_img + k]
            reps[is_vid] = video_counts[i_vid : i_vid + m]
            i_img, i_vid = i_img + k, i_vid + m
            out.append(np.repeat(a, reps))
        return out


    def _pad(
        self, ids: list[np.ndarray], padding: bool | str, padding_side: str | None, max_length: int | None
    ) -> dict[str, np.ndarray]:
        side = padding_side or self.tokenizer.padding_side
        if side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {side!r}")
        longest = max((len(a) for a in ids), default=0)
        if padding in (True, "longest"):
            length = longest
        elif padding == "max_length":
            if max_length is None:
                raise InputError("padding='max_length' needs max_length")
            if longest > max_length:
                raise InputError(f"a prompt of {longest} tokens is longer than max_length {max_length}")
            length = max_length
        elif padding in (False, None, "do_not_pad"):
            if len({len(a) for a in ids}) > 1:
                raise InputError("texts have different token lengths; pass padding=True")
            length = longest
        else:
            raise InputError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")
        b = len(ids)
        input_ids = np.full((b, length), self.tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros((b, length), dtype=np.int64)
        for i, a in enumerate(ids):
            sl = slice(length - len(a), length) if side == "left" else slice(0, len(a))
            input_ids[i, sl] = a
            mask[i, sl] = 1
        types = np.zeros((b, length), dtype=np.int64)
        types[(input_ids == self.image_token_id) & (mask == 1)] = 1
        types[(input_ids == self.video_token_id) & (mask == 1)] = 2
        return {"input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": types}

    # ------------------------------------------------------------------ decoding

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(np.asarray(ids).reshape(-1).tolist(), skip_special_tokens)

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in sequences]

    def post_process_image_text_to_text(self, generated: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        return self.batch_decode(generated, skip_special_tokens)


_CONTINUE_TAG = "\x00CONTINUE_FINAL_MESSAGE\x00"


def _tag_final(conv: Any) -> Any:
    """A copy of the conversation whose final text carries a sentinel at its end."""
    if not isinstance(conv, (list, tuple)) or not conv or not isinstance(conv[-1], dict):
        raise InputError("continue_final_message needs a final message to continue")
    final = dict(conv[-1])
    content = final.get("content")
    if isinstance(content, str):
        final["content"] = content + _CONTINUE_TAG
    elif isinstance(content, (list, tuple)):
        blocks = list(content)
        for i in range(len(blocks) - 1, -1, -1):
            if isinstance(blocks[i], dict) and "text" in blocks[i]:
                blocks[i] = {**blocks[i], "text": str(blocks[i]["text"]) + _CONTINUE_TAG}
                break
        else:
            raise InputError("continue_final_message: the final message has no text to continue")
        final["content"] = blocks
    else:
        raise InputError("continue_final_message: the final message has no text to continue")
    return list(conv[:-1]) + [final]


def _convert(out: BatchFeature, return_tensors: str | None) -> BatchFeature:
    if return_tensors in ("np", "numpy", None):
        return out
    if return_tensors == "jax":
        import jax.numpy as jnp  # noqa: PLC0415 - only when asked for

        return BatchFeature({k: jnp.asarray(v) for k, v in out.items()})
    raise InputError(f"return_tensors must be 'np' or 'jax', got {return_tensors!r}")
