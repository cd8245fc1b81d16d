"""Training data: JSONL conversations -> processed examples -> bucketed, static-shape batches.

One record per line, in the chat-message format users already write for Qwen2-VL:

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                              {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]}

(a bare list of messages is accepted too). Image and video paths are relative to the JSONL
file; a video is a file or a list of frame images, and an item may carry qwen-vl-utils keys
(min_pixels, max_pixels, fps, nframes, resized_height/width). An assistant item
{"type": "box", "label": "the cat", "box": [x1, y1, x2, y2]} gives a box in pixels of the last
image before it (or of image "image": k), written as Qwen2-VL's grounding markup on its
0..1000 grid (`box_item_text`).

Labels (`labels` mode):
  assistant  the content of each assistant turn and its <|im_end|>. A record with no
             assistant turn is an image-text pair and falls back to `caption`.
  caption    the text of every user and assistant turn (not the system prompt, the role
             headers or the vision tokens), and each turn's <|im_end|>.

Every record is parsed, its files checked and processed once before training starts
(`JsonlDataset.scan`), so a bad record is reported with its line number up front and never
crashes an epoch halfway. The processed examples become static-shape batches here
(`collate`, and `collate_packed` for rows that hold several records); which records make a
step, and the input pipeline around it, are in `loader`.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import math
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from PIL import Image

from qwen2vl_jax import grounding
from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.errors import InputError
from qwen2vl_jax.jsonio import parse_json
from qwen2vl_jax.inputs import LABEL_PAD, build_inputs, pack_vision, vision_sizes
from qwen2vl_jax.inputs import bucket  # noqa: F401 - the batch bucket, read as data.bucket by the loader's users

IGNORE = LABEL_PAD
LABEL_MODES = ("assistant", "caption")
ROLES = ("system", "user", "assistant")


# ----------------------------------------------------------------------------- records
@dataclasses.dataclass
class Record:
    line: int  # 1-based line number in the file
    messages: list[dict]


def _media_paths(source: Any) -> list[str]:
    if isinstance(source, (list, tuple)):
        return [s for s in source if isinstance(s, str)]
    return [source] if isinstance(source, str) else []


def _resolve(source: Any, base: Path) -> Any:
    def one(s):
        if not isinstance(s, str) or s.startswith(("http://", "https://", "data:")):
            return s
        if s.startswith("file://"):
            s = s[7:]
        return str(s if os.path.isabs(s) else base / s)

    return [one(s) for s in source] if isinstance(source, (list, tuple)) else one(source)


def check_record(obj: Any, base: Path) -> list[dict]:
    """A parsed JSON value -> its messages with media paths made absolute. Raises InputError
    (without the line number; the caller adds it) on anything malformed or missing."""
    messages = obj.get("messages") if isinstance(obj, dict) else obj
    if not isinstance(messages, list) or not messages:
        raise InputError("expected {\"messages\": [...]} or a non-empty list of messages")
    out, images = [], []  # images: the conversation's images so far, what a box part is measured on
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise InputError(f"message {i}: expected an object with 'role' and 'content'")
        if msg["role"] not in ROLES:
            raise InputError(f"message {i}: role {msg['role']!r} is not one of {', '.join(ROLES)}")
        content = msg["content"]
        if isinstance(content, str):
            out.append({"role": msg["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise InputError(f"message {i}: content must be a string or a list of items")
        items = []
        for j, item in enumerate(content):
            if not isinstance(item, dict):
                raise InputError(f"message {i} item {j}: expected an object")
            item = dict(item)
            kind = item.get("type") or next((k for k in ("image", "video", "text") if k in item), None)
            if kind == "image_url" or "image_url" in item:
                kind = "image"
                item.setdefault("image", item.pop("image_url"))
            if kind == "box":  # grounding in pixels -> the model's markup, as a text item
                if msg["role"] != "assistant":
                    raise InputError(f"message {i} item {j}: a box item belongs in an assistant turn")
                items.append({"type": "text", "text": box_item_text(item, images, f"message {i} item {j}")})
                continue
            if kind not in ("image", "video", "text"):
                raise InputError(f"message {i} item {j}: type must be text, image, video or box")
            if kind == "text" and not isinstance(item.get("text"), str):
                raise InputError(f"message {i} item {j}: text item without a 'text' string")
            if kind in ("image", "video"):
                if kind not in item:
                    raise InputError(f"message {i} item {j}: {kind} item without an '{kind}' path")
                if msg["role"] == "assistant":
                    raise InputError(f"message {i} item {j}: an assistant turn cannot contain an {kind}")
                item[kind] = _resolve(item[kind], base)
                for p in _media_paths(item[kind]):
                    if not p.startswith(("http://", "https://", "data:")) and not os.path.isfile(p):
                        raise InputError(f"{kind} file {p} not found")
                if kind == "image":
                    images.append(item["image"])
            item["type"] = kind
            items.append(item)
        out.append({"role": msg["role"], "content": items})
    return out


def box_item_text(item: dict, images: Sequence[Any], where: str) -> str:
    """An assistant's {"type": "box", "label": ..., "box": [x1, y1, x2, y2] or a list of them,
    "image": k (optional)} in pixels of image k of the conversation (default: the last one
    before it) -> Qwen2-VL's grounding markup on its 0..1000 grid."""
    label, boxes = item.get("label"), item.get("box")
    if label is not None and (not isinstance(label, str) or not label.strip()):
        raise InputError(f"{where}: a box's label must be a non-empty string (or left out)")
    if isinstance(boxes, list) and boxes and not isinstance(boxes[0], list):
        boxes = [boxes]
    if not isinstance(boxes, list) or not boxes or any(
            not isinstance(b, list) or len(b) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                               and math.isfinite(v) for v in b) for b in boxes):
        raise InputError(f"{where}: 'box' must be [x1, y1, x2, y2] in pixels, or a list of them")
    index = item.get("image", len(images) - 1)
    if not images:
        raise InputError(f"{where}: a box needs an image before it in the conversation")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(images):
        raise InputError(f"{where}: 'image' must be the index of one of the {len(images)} images before it")
    source = images[index]
    if not isinstance(source, str) or source.startswith(("http://", "https://")):
        raise InputError(f"{where}: a box is measured on its image, which must be a local file or a data: URI")
    try:
        if source.startswith("data:"):
            source = io.BytesIO(base64.b64decode(source.partition(",")[2]))
        with Image.open(source) as img:
            width, height = img.size
    except Exception:  # noqa: BLE001 - anything PIL cannot open
        raise InputError(f"{where}: cannot read the size of image {index}") from None
    try:
        return grounding.label_markup(label, boxes, width, height)
    except ValueError as e:
        raise InputError(f"{where}: {e}") from None


def read_jsonl(path: str | Path) -> tuple[list[Record], list[str]]:
    """-> (good records, one problem line per bad record)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path} not found")
    records, problems = [], []
    base = path.resolve().parent
    try:
        f = path.open("rb")
    except OSError as e:
        raise InputError(f"data file {path}: cannot read it ({e.strerror or e})") from None
    with f:
        for n, line in enumerate(f, start=1):
            try:
                raw = line.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                problems.append(f"{path.name} line {n}: not UTF-8 text (byte {line[e.start]:#04x} at offset "
                                f"{e.start}); save the file as UTF-8")
                continue
            if not raw.strip():
                continue
            try:
                obj = parse_json(raw, f"{path.name} line {n}", expect=None)
            except InputError as e:
                problems.append(str(e))
                continue
            try:
                records.append(Record(n, check_record(obj, base)))
            except InputError as e:
                problems.append(f"{path.name} line {n}: {e}")
    return records, problems


# ----------------------------------------------------------------------------- labels
def make_labels(input_ids: np.ndarray, tokenizer, mode: str) -> np.ndarray:
    """input_ids int[L] (one unpadded row, placeholders expanded) -> labels int32[L].

    Turns are found on the token ids: <|im_start|> ROLE \\n ... <|im_end|>. Text that is not in
    a turn (the base template) counts as caption text.
    """
    if mode not in LABEL_MODES:
        raise InputError(f"labels must be one of {LABEL_MODES}, got {mode!r}")
    ids = np.asarray(input_ids)
    n = len(ids)
    vision = np.isin(ids, [tokenizer.image_token_id, tokenizer.video_token_id,
                           tokenizer.vision_start_token_id, tokenizer.vision_end_token_id])
    starts = np.flatnonzero(ids == tokenizer.im_start_token_id)
    ends = np.flatnonzero(ids == tokenizer.im_end_token_id)
    keep = np.zeros(n, bool)
    if len(starts) == 0:
        keep[:] = True
    else:
        turns = []  # (role, first content token, im_end index)
        for s in starts:
            j, head = s + 1, ""
            while j < n and "\n" not in head and j - s <= 8:
                head += tokenizer.decode([int(ids[j])])
                j += 1
            after = ends[ends >= j]
            e = int(after[0]) if len(after) else n - 1
            turns.append((head.split("\n")[0].strip(), j, e))
        roles = {r for r, _, _ in turns}
        if mode == "assistant" and "assistant" in roles:
            wanted = {"assistant"}
        else:
            wanted = {"user", "assistant"}
        for role, j, e in turns:
            if role in wanted:
                keep[j:e + 1] = True
    keep &= ~vision
    keep[:1] = False  # no token before it predicts a record's first token, whatever shares its row
    return np.where(keep, ids, IGNORE).astype(np.int32)


# ----------------------------------------------------------------------------- examples
@dataclasses.dataclass
class Example:
    """One processed record (unpadded)."""

    input_ids: np.ndarray  # int32[L]
    labels: np.ndarray  # int32[L]
    pixel_values: np.ndarray | None = None  # f32[Ni, 1176]
    image_grid_thw: np.ndarray | None = None  # int[n_img, 3]
    pixel_values_videos: np.ndarray | None = None
    video_grid_thw: np.ndarray | None = None
    line: int = 0

    @property
    def num_patches(self) -> int:
        return sum(int(np.prod(g, axis=1).sum()) for g in (self.image_grid_thw, self.video_grid_thw) if g is not None)

    @property
    def num_segments(self) -> int:
        return sum(int(g[:, 0].sum()) for g in (self.image_grid_thw, self.video_grid_thw) if g is not None)

    @property
    def segment_len(self) -> int:
        lens = [int((g[:, 1] * g[:, 2]).max()) for g in (self.image_grid_thw, self.video_grid_thw)
                if g is not None and len(g)]
        return max(lens, default=0)


def process_record(messages: list[dict], processor, labels: str = "assistant") -> Example:
    """Runs the processor on one conversation and masks its labels."""
    text = processor.apply_chat_template(messages, add_generation_prompt=False)
    images, videos = [], []
    for msg in messages:
        if isinstance(msg["content"], str):
            continue
        for item in msg["content"]:
            if item["type"] == "image":
                images.append({k: v for k, v in item.items() if k != "type"})
            elif item["type"] == "video":
                videos.append({k: v for k, v in item.items() if k != "type"})
    out = processor(text=[text], images=images or None, videos=videos or None, padding=False)
    ids = np.asarray(out["input_ids"])[0]
    return Example(
        input_ids=ids.astype(np.int32),
        labels=make_labels(ids, processor.tokenizer, labels),
        pixel_values=out.get("pixel_values"),
        image_grid_thw=None if out.get("image_grid_thw") is None else np.asarray(out["image_grid_thw"]),
        pixel_values_videos=out.get("pixel_values_videos"),
        video_grid_thw=None if out.get("video_grid_thw") is None else np.asarray(out["video_grid_thw"]),
    )


def split_batch(inputs: dict, image_token_id: int, video_token_id: int, labels=None) -> list[Example]:
    """HF-processor batch outputs (padded rows, vision arrays concatenated over the batch) ->
    one unpadded Example per row, each with its own images and videos."""
    ids = np.asarray(inputs["input_ids"])
    mask = np.asarray(inputs.get("attention_mask", np.ones_like(ids))).astype(bool)
    grids = {k: None if inputs.get(k) is None else np.asarray(inputs[k]).reshape(-1, 3)
             for k in ("image_grid_thw", "video_grid_thw")}
    used = {"image_grid_thw": 0, "video_grid_thw": 0}
    offsets = {"pixel_values": 0, "pixel_values_videos": 0}
    out = []
    for b in range(ids.shape[0]):
        row = ids[b][mask[b]]
        ex = Example(row.astype(np.int32),
                     (np.asarray(labels)[b][mask[b]] if labels is not None else np.full(len(row), IGNORE)).astype(np.int32))
        for token, gkey, pkey in ((image_token_id, "image_grid_thw", "pixel_values"),
                                  (video_token_id, "video_grid_thw", "pixel_values_videos")):
            is_tok = (row == token).astype(np.int8)
            runs = int(((np.diff(np.concatenate([[0], is_tok])) == 1)).sum())
            if not runs:
                continue
            g = grids[gkey][used[gkey]:used[gkey] + runs]
            used[gkey] += runs
            npatch = int(np.prod(g, axis=1).sum())
            pix = np.asarray(inputs[pkey])[offsets[pkey]:offsets[pkey] + npatch]
            offsets[pkey] += npatch
            setattr(ex, gkey, g)
            setattr(ex, pkey, pix)
        out.append(ex)
    return out


# ----------------------------------------------------------------------------- batches
def collate(examples: Sequence[Example | None], config: Qwen2VLConfig, length: int | None = None,
            vision_sizes: tuple[int, int, int] | None = None) -> dict:
    """Examples (None = an empty filler row) -> one micro-batch, built by the same
    `inputs.build_inputs` as inference (rows packed to the right of the length bucket):

      input_ids int32[B, L], attention_mask bool[B, L], labels int32[B, L] (IGNORE at padding),
      positions int32[3, B, L] (M-RoPE ids),
      vision (when `vision_sizes` is given or some row has images/videos): the batch's images,
        then its videos, in one flat layout, as `inputs.pack_vision` makes it.

    `length` and `vision_sizes` fix the shapes (equal across a step's micro-batches); by
    default they come from the bucket ladder."""
    real = [e for e in examples if e is not None]
    width = max((len(e.input_ids) for e in real), default=1)
    ids = np.zeros((len(examples), width), np.int32)
    mask = np.zeros((len(examples), width), bool)
    labels = np.full((len(examples), width), IGNORE, np.int32)
    for i, e in enumerate(examples):
        if e is not None:
            n = len(e.input_ids)
            ids[i, :n], mask[i, :n], labels[i, :n] = e.input_ids, True, e.labels
    if length is not None and width > length:
        line = next(e.line for e in real if len(e.input_ids) == width)
        raise InputError(f"record on line {line} has {width} tokens, more than the batch length {length}")
    cat = lambda key: (np.concatenate([getattr(e, key) for e in real if getattr(e, key) is not None])  # noqa: E731
                       if any(getattr(e, key) is not None for e in real) else None)
    built = build_inputs(config, ids, mask, cat("pixel_values"), cat("image_grid_thw"), cat("pixel_values_videos"),
                         cat("video_grid_thw"), labels=labels, length=length, vision_sizes=vision_sizes,
                         empty_rows=True)
    batch = {"input_ids": built.input_ids, "attention_mask": built.attention_mask, "labels": built.labels,
             "positions": built.positions}
    if built.vision is not None:
        batch["vision"] = built.vision
    return batch


# ----------------------------------------------------------------------------- packing
def pack_records(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Record lengths -> rows of record indices whose lengths add up to at most `capacity`,
    first-fit decreasing (longest record first, each into the first row it fits; ties by
    index, so the same lengths always give the same rows)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > capacity:
            raise ValueError(f"a record of {lengths[i]} tokens does not fit a row of {capacity}")
        for r, left in enumerate(room):
            if lengths[i] <= left:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def collate_packed(rows: Sequence[Sequence[Example]], config: Qwen2VLConfig, length: int,
                   vision_sizes: tuple[int, int, int] | None = None, num_rows: int | None = None) -> dict:
    """Rows of examples (several records per row) -> one micro-batch of packed rows, the same
    keys as `collate`, where attention_mask holds segment ids:

      input_ids int32[R, L], labels int32[R, L]: each row's records one after another from slot 0,
        padding after them; a record's first label is IGNORE (in a row of its own nothing
        predicts its first token; here the previous record's last token would);
      attention_mask int32[R, L]: k for the k-th record of the row (from 1), 0 at padding, so
        attention stays inside each record (modules/text.py);
      positions int32[3, R, L]: each record's M-RoPE ids as if it were alone (they restart at 0);
      vision: the images, then the videos, of all records in row-major order (the order their
        placeholders appear, which is how the features are placed).

    R = num_rows (default len(rows); extra rows are padding)."""
    n = len(rows) if num_rows is None else num_rows
    ids = np.zeros((n, length), np.int32)
    segments = np.zeros((n, length), np.int32)
    labels = np.full((n, length), IGNORE, np.int32)
    positions = np.zeros((3, n, length), np.int32)
    order = []
    for r, row in enumerate(rows):
        at = 0
        for k, e in enumerate(row, start=1):
            m = len(e.input_ids)
            if at + m > length:
                raise InputError(f"records on lines {', '.join(str(x.line) for x in row)} have "
                                 f"{sum(len(x.input_ids) for x in row)} tokens, more than the row length {length}")
            alone = build_inputs(config, e.input_ids, None, None, e.image_grid_thw, None, e.video_grid_thw,
                                 length=m, pixels=False)
            ids[r, at:at + m], segments[r, at:at + m] = e.input_ids, k
            labels[r, at:at + m] = e.labels
            labels[r, at] = IGNORE
            positions[:, r, at:at + m] = alone.positions[:, 0]
            at += m
            order.append(e)
    cat = lambda key: (np.concatenate([getattr(e, key) for e in order if getattr(e, key) is not None])  # noqa: E731
                       if any(getattr(e, key) is not None for e in order) else None)
    batch = {"input_ids": ids, "attention_mask": segments, "labels": labels, "positions": positions}
    vision = pack_vision(config, cat("pixel_values"), cat("image_grid_thw"), cat("pixel_values_videos"),
                         cat("video_grid_thw"), sizes=vision_sizes)
    if vision is not None:
        batch["vision"] = vision
    return batch


def vision_bucket(examples: Sequence[Example | None], unit: int = 4) -> tuple[int, int, int] | None:
    """Bucketed (patches, segments, segment length) that fit all the examples' images and
    videos in one layout, or None without any."""
    grids = [g for e in examples if e is not None for g in (e.image_grid_thw, e.video_grid_thw) if g is not None]
    return vision_sizes(np.concatenate(grids) if grids else None, unit)


def stack_micro(batches: Sequence[dict]) -> dict:
    """Micro-batches with equal shapes -> one step's arrays with a leading [A] axis."""
    return jax.tree.map(lambda *xs: np.stack(xs), *batches)


# ----------------------------------------------------------------------------- dataset
class JsonlDataset:
    """Records of one JSONL file, processed on demand, with their lengths known up front."""

    def __init__(self, path: str | Path, processor, labels: str = "assistant", max_length: int | None = None,
                 skip_bad: bool = False, progress: bool = False):
        if labels not in LABEL_MODES:
            raise InputError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
        self.path = Path(path)
        self.processor = processor
        self.labels = labels
        self.max_length = max_length
        records, problems = read_jsonl(self.path)
        self.records = records
        self.skipped: list[str] = []
        self.lengths: list[int] = []
        self.vision: list[tuple[int, int, int]] = []
        self._scan(problems, skip_bad, progress)

    def _scan(self, problems: list[str], skip_bad: bool, progress: bool) -> None:
        good = []
        it = self.records
        if progress:
            from tqdm import tqdm  # noqa: PLC0415

            it = tqdm(it, desc=f"checking {self.path.name}", unit="rec", leave=False)
        for rec in it:
            try:
                ex = self._process(rec)
            except InputError as e:
                problems.append(f"{self.path.name} line {rec.line}: {e}")
                continue
            good.append(rec)
            self.lengths.append(len(ex.input_ids))
            self.vision.append((ex.num_patches, ex.num_segments, ex.segment_len))
        if problems and not skip_bad:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise InputError(f"{len(problems)} bad record(s) in {self.path}: {shown}")
        self.skipped = problems
        self.records = good
        if not self.records:
            raise InputError(f"{self.path}: no usable records")

    def _process(self, rec: Record) -> Example:
        ex = process_record(rec.messages, self.processor, self.labels)
        ex.line = rec.line
        if self.max_length is not None and len(ex.input_ids) > self.max_length:
            raise InputError(f"{len(ex.input_ids)} tokens, more than max_length {self.max_length}")
        if not (ex.labels != IGNORE).any():
            raise InputError(f"no tokens to learn from under labels={self.labels!r}")
        return ex

    def __len__(self) -> int:
        return len(self.records)

    def example(self, i: int) -> Example:
        return self._process(self.records[i])
