"""The one way model inputs are built: the HF processor's keys -> checked, bucketed host arrays.

`build_inputs` serves every caller (`Qwen2VL.logits`, generation, training), so they share the
same checks and the same shapes:
  - each row's real tokens are packed to the right of a prompt bucket Lb (either padding side
    in), so a generated token always follows the prompt directly;
  - 3D M-RoPE positions for the packed rows (`positions.get_rope_index`), and the offset that
    carries them into decoding;
  - all images, then all videos, of the batch in one flat vision layout padded to bucketed
    (patches, segments, segment length), the layout the vision tower runs on.
Shapes come from one ladder (`bucket`), so a new prompt length or image size reuses a compiled
shape. Everything here is numpy: it runs on the host, before anything reaches a device.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.errors import InputError
from qwen2vl_jax.positions import get_rope_index

PROMPT_BUCKET_MIN = 64  # the smallest prompt bucket
PATCH_BUCKET_MIN = 64  # the smallest patch / segment-length bucket
LABEL_PAD = -100  # label of padding and of positions without a target (HF's ignore index)


# ---------------------------------------------------------------------------- the ladder
def bucket(n: int, minimum: int = PROMPT_BUCKET_MIN) -> int:
    """The smallest rung of the ladder minimum * {1, 1.25, 1.5, 1.75} * 2^k that holds n (64,
    80, 96, 112, 128, 160, ...): four rungs per octave, so at most 25% padding and a few dozen
    shapes up to a 32k context; each compiles once."""
    rung = minimum
    while True:
        for size in (rung, rung * 5 // 4, rung * 3 // 2, rung * 7 // 4):
            if size >= n:
                return size
        rung *= 2


def pow2_bucket(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ---------------------------------------------------------------------------- vision layout
def _grids(grid_thw) -> np.ndarray:
    return np.zeros((0, 3), np.int64) if grid_thw is None else np.asarray(grid_thw, np.int64).reshape(-1, 3)


def vision_layout(
    grid_thw: np.ndarray,
    merge_size: int,
    *,
    num_patches: int | None = None,
    num_segments: int | None = None,
    segment_len: int | None = None,
) -> dict[str, np.ndarray]:
    """Host-side index arrays for a batch of images/videos (vectorised numpy).

    grid_thw: int[n, 3] patch grids, in the order their patches are concatenated. Attention
    runs inside each segment (one image, or one temporal slice of a video) on a padded
    [S, Lmax] grid, so its cost is S * Lmax^2, not N^2. The optional sizes pad the layout to
    fixed shapes (buckets); padding patches belong to no segment and padding segments attend
    to nothing real.

    Returns:
      pos_hw:  int32[N, 2]       row/column of each patch (for the 2D rotary embedding)
      gather:  int32[S, Lmax]    patch index at each slot of each segment
      valid:   bool[S, Lmax]     which slots hold a real patch
      scatter: int32[N]          flat slot (s * Lmax + l) of each patch
    """
    grid_thw = _grids(grid_thw)
    m = merge_size
    if ((grid_thw[:, 1:] % m) != 0).any():
        bad = grid_thw[((grid_thw[:, 1:] % m) != 0).any(axis=1)][0]
        raise InputError(f"grid_thw {bad.tolist()}: height and width must be multiples of the merge size {m}")
    seg_lens = np.repeat(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])  # one per temporal slice
    n_real = int(seg_lens.sum())
    N = n_real if num_patches is None else num_patches
    S = len(seg_lens) if num_segments is None else num_segments
    L = int(seg_lens.max(initial=1)) if segment_len is None else segment_len
    if N < n_real or S < len(seg_lens) or L < seg_lens.max(initial=0):
        raise ValueError(f"vision layout ({N} patches, {S} segments of {L}) is too small for grids {grid_thw.tolist()}")

    # Row/column of every patch, in merge order: within each image, 2x2 blocks are contiguous.
    pos_parts = []
    for t, h, w in grid_thw:  # one iteration per image/video, vectorised inside
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blk = (h // m, m, w // m, m)
        hh = hh.reshape(blk).transpose(0, 2, 1, 3).reshape(-1)
        ww = ww.reshape(blk).transpose(0, 2, 1, 3).reshape(-1)
        pos_parts.append(np.tile(np.stack([hh, ww], axis=-1), (t, 1)))
    pos_hw = np.zeros((N, 2), np.int32)
    if pos_parts:
        pos_hw[:n_real] = np.concatenate(pos_parts)

    starts = np.concatenate([[0], np.cumsum(seg_lens)[:-1]]).astype(np.int64)
    slot = np.arange(L)
    gather = np.zeros((S, L), np.int32)
    valid = np.zeros((S, L), bool)
    gather[: len(seg_lens)] = np.where(slot < seg_lens[:, None], starts[:, None] + slot, 0)
    valid[: len(seg_lens)] = slot < seg_lens[:, None]
    seg_of_patch = np.repeat(np.arange(len(seg_lens)), seg_lens)
    scatter = np.zeros((N,), np.int32)
    scatter[:n_real] = seg_of_patch * L + (np.arange(n_real) - starts[seg_of_patch])
    return {"pos_hw": pos_hw, "gather": gather, "valid": valid, "scatter": scatter}


def vision_sizes(grid_thw, merge_unit: int, minimum: int = PATCH_BUCKET_MIN) -> tuple[int, int, int] | None:
    """Bucketed (patches, segments, segment length) for these grids, or None without any."""
    grid = _grids(grid_thw)
    if not len(grid):
        return None
    seg_lens = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    return (round_up(bucket(int(seg_lens.sum()), minimum), merge_unit), pow2_bucket(len(seg_lens)),
            bucket(int(seg_lens.max()), minimum))


def pack_vision(config: Qwen2VLConfig, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                video_grid_thw=None, *, sizes: tuple[int, int, int] | None = None, bucketed: bool = True) -> dict | None:
    """Image patches then video patches, with their layout: {'patches': f32[N, patch_dim],
    'pos_hw', 'gather', 'valid', 'scatter'} or None without any.

    Checks that each pixel array has the rows its grids promise. `sizes` (patches, segments,
    segment length) fixes the padded shapes (then a dict comes back even without grids: all
    padding); otherwise they are bucketed (`bucketed`) or exact."""
    patches, grids = [], []
    for name, pixels, grid in (
        ("pixel_values", pixel_values, image_grid_thw),
        ("pixel_values_videos", pixel_values_videos, video_grid_thw),
    ):
        if pixels is None and grid is None:
            continue
        if pixels is None or grid is None:
            raise InputError(f"{name} and its grid_thw must be given together")
        pixels = np.asarray(pixels, np.float32)
        grid = _grids(grid)
        want = int(np.prod(grid, axis=1).sum())
        if pixels.ndim != 2 or pixels.shape[0] != want or pixels.shape[1] != config.vision.patch_dim:
            raise InputError(
                f"{name} has shape {tuple(pixels.shape)} but its grids {grid.tolist()} need "
                f"({want}, {config.vision.patch_dim})"
            )
        patches.append(pixels)
        grids.append(grid)
    grid_all = np.concatenate(grids) if grids else np.zeros((0, 3), np.int64)
    if sizes is None:
        if not grids:
            return None
        sizes = vision_sizes(grid_all, config.vision.merge_unit) if bucketed else (None, None, None)
    n, s, seg = sizes
    layout = vision_layout(grid_all, config.vision.spatial_merge_size, num_patches=n, num_segments=s, segment_len=seg)
    flat = np.zeros((layout["scatter"].shape[0], config.vision.patch_dim), np.float32)
    if patches:
        real = np.concatenate(patches)
        flat[: real.shape[0]] = real
    return {"patches": flat, **layout}


def check_placeholders(config: Qwen2VLConfig, input_ids, image_grid_thw, video_grid_thw) -> None:
    """The number of placeholder tokens must equal the features the grids produce."""
    unit = config.vision.merge_unit
    for name, token, grid in (
        ("image", config.image_token_id, image_grid_thw),
        ("video", config.video_token_id, video_grid_thw),
    ):
        have = int((np.asarray(input_ids) == token).sum())
        want = int(np.prod(_grids(grid), axis=1).sum()) // unit
        if have != want:
            raise InputError(
                f"the text has {have} {name} placeholder tokens but the {name} grids give {want} features"
            )


# ---------------------------------------------------------------------------- model inputs
@dataclasses.dataclass
class ModelInputs:
    """Host arrays for one batch, padded to their buckets (B rows, Lb = the prompt bucket)."""

    input_ids: np.ndarray  # int32[B, Lb]: each row's real tokens right-aligned, 0 before them
    attention_mask: np.ndarray  # bool[B, Lb]: which slots hold a real token
    positions: np.ndarray  # int32[3, B, Lb]: M-RoPE ids (0 at padding)
    pos_offset: np.ndarray  # int32[B]: a token in slot j after the prompt has position j + pos_offset
    lengths: np.ndarray  # int[B]: real tokens per row
    vision: dict | None  # pack_vision's arrays, padded to their buckets
    labels: np.ndarray | None  # int32[B, Lb] packed like input_ids (LABEL_PAD elsewhere), when given
    source_mask: np.ndarray  # bool[B, L]: where the real tokens were in the caller's layout

    @property
    def shape(self) -> tuple[int, int]:
        return self.input_ids.shape

    def unpack(self, values: np.ndarray) -> np.ndarray:
        """values [B, Lb, ...] in the packed layout -> [B, L, ...] in the caller's layout
        (zeros where the caller had padding)."""
        b, lb = self.input_ids.shape
        out = np.zeros(self.source_mask.shape + values.shape[2:], values.dtype)
        for r in range(b):
            out[r, self.source_mask[r]] = values[r, lb - self.lengths[r]:]
        return out


def build_inputs(
    config: Qwen2VLConfig,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    image_grid_thw=None,
    pixel_values_videos=None,
    video_grid_thw=None,
    *,
    labels=None,
    max_new_tokens: int = 0,
    length: int | None = None,
    vision_sizes: tuple[int, int, int] | None = None,
    bucket_min: int = PROMPT_BUCKET_MIN,
    empty_rows: bool = False,
    pixels: bool = True,
) -> ModelInputs:
    """Checks the HF processor's arrays and packs them into a `ModelInputs`.

    input_ids int[B, L] or int[L]; attention_mask (1 = real token; either padding side);
    labels int[B, L] (training targets, in the caller's layout). `max_new_tokens`: tokens that will be
    generated after the prompt (checked against the context). `length` and `vision_sizes` fix
    the padded shapes (training keeps them equal across a step's micro-batches); otherwise they
    come from the ladder. `empty_rows` lets a row have no tokens (a training filler row).
    `pixels=False`: the grids alone, without pixel values (their features come another way,
    e.g. a server's vision cache): the positions and checks are the same, `vision` is None.
    """
    cfg = config
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.size == 0:
        raise InputError(f"input_ids must be [batch, length] with at least one token (got shape {ids.shape})")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"input_ids must be integer token ids (got {ids.dtype})")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask shape {mask.shape} differs from input_ids {ids.shape}")
    lengths = mask.sum(axis=1)
    if (lengths == 0).any() and not empty_rows:
        raise InputError(f"row {int(np.flatnonzero(lengths == 0)[0])} of the batch has no tokens")
    if ((ids < 0) | (ids >= cfg.text.vocab_size))[mask].any():
        raise InputError(f"input_ids hold token ids outside the vocabulary (0..{cfg.text.vocab_size - 1})")
    check_placeholders(cfg, ids[mask], image_grid_thw, video_grid_thw)
    longest = int(lengths.max())
    context = cfg.text.max_position_embeddings
    if longest + max_new_tokens > context:
        extra = f" plus {max_new_tokens} new tokens" if max_new_tokens else ""
        raise InputError(f"the prompt ({longest} tokens){extra} is longer than the model's context of {context} tokens")

    b = ids.shape[0]
    lb = bucket(max(longest, 1), bucket_min) if length is None else length
    if lb < longest:
        raise InputError(f"a row has {longest} tokens, more than the batch length {lb}")
    packed = np.zeros((b, lb), np.int32)
    packed_mask = np.zeros((b, lb), bool)
    packed_labels = None if labels is None else np.full((b, lb), LABEL_PAD, np.int32)
    if labels is not None:
        labels = np.asarray(labels).reshape(ids.shape)
    for r in range(b):  # right-align each row's real tokens
        n = lengths[r]
        if not n:
            continue
        packed[r, lb - n:] = ids[r][mask[r]]
        packed_mask[r, lb - n:] = True
        if labels is not None:
            packed_labels[r, lb - n:] = labels[r][mask[r]]
    positions, deltas = get_rope_index(
        packed, packed_mask, image_grid_thw, video_grid_thw, image_token_id=cfg.image_token_id,
        video_token_id=cfg.video_token_id, spatial_merge_size=cfg.vision.spatial_merge_size)
    pos_offset = (deltas[:, 0] - (lb - lengths)).astype(np.int32)
    vision = None
    if pixels:
        vision = pack_vision(cfg, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                             sizes=vision_sizes)
    return ModelInputs(packed, packed_mask, positions.astype(np.int32), pos_offset, lengths, vision,
                       packed_labels, mask)
