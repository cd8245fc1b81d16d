"""3D (temporal, height, width) position ids for M-RoPE, computed on the host.

For each row, padding removed, the tokens split into runs: a run of text advances all three
axes together; a run of image/video placeholders takes the (t, h/m, w/m) grid indices of its
item, offset by the position after the preceding text; the next text starts at the largest
position used so far + 1 (Qwen2-VL's rule; the temporal index is the plain temporal-patch
index). `rope_deltas` = (largest position + 1) - (real tokens in the row) carries the offset
into decoding: a token generated at cache slot j of a row gets position j - pad + delta.

The work is vectorised inside each run; Python loops only over rows and runs.
"""

from __future__ import annotations

import numpy as np

from qwen2vl_jax.errors import InputError


def get_rope_index(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    image_grid_thw: np.ndarray | None,
    video_grid_thw: np.ndarray | None,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """input_ids int[B, L], attention_mask int[B, L] (1 = real) ->
    (positions int64[3, B, L] with 0 at padding, rope_deltas int64[B, 1])."""
    input_ids = np.asarray(input_ids)
    b, l = input_ids.shape
    mask = np.ones((b, l), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = {
        1: _grids(image_grid_thw),
        2: _grids(video_grid_thw),
    }
    used = {1: 0, 2: 0}
    m = spatial_merge_size
    positions = np.zeros((3, b, l), np.int64)
    deltas = np.zeros((b, 1), np.int64)
    for row in range(b):
        ids = input_ids[row][mask[row]]
        kind = np.where(ids == image_token_id, 1, np.where(ids == video_token_id, 2, 0))
        bounds = np.flatnonzero(np.diff(kind)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(ids)]])
        parts = []
        cur = 0
        for s, e in zip(starts, ends):
            k = kind[s] if e > s else 0
            n = e - s
            if n == 0:
                continue
            if k == 0:
                parts.append(np.broadcast_to(np.arange(n) + cur, (3, n)))
                cur += n
                continue
            name = "image" if k == 1 else "video"
            if used[k] >= len(grids[k]):
                raise InputError(
                    f"more {name} placeholder runs than {name} grids given ({len(grids[k])} {name}_grid_thw rows)"
                )
            t, h, w = (int(x) for x in grids[k][used[k]])
            used[k] += 1
            gh, gw = h // m, w // m
            if t * gh * gw != n:
                raise InputError(
                    f"{name} {used[k]} has {n} placeholder tokens but its grid {[t, h, w]} needs {t * gh * gw}"
                )
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            parts.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + cur)
            cur += max(t, gh, gw)
        row_pos = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), np.int64)
        positions[:, row, mask[row]] = row_pos
        deltas[row, 0] = (row_pos.max() + 1 if row_pos.size else 0) - len(ids)
    for k, name in ((1, "image"), (2, "video")):
        if used[k] != len(grids[k]):
            raise InputError(
                f"{len(grids[k])} {name} grids given but the text has {used[k]} {name} placeholder runs"
            )
    return positions, deltas


def _grids(grid_thw) -> np.ndarray:
    if grid_thw is None:
        return np.zeros((0, 3), np.int64)
    return np.asarray(grid_thw, np.int64).reshape(-1, 3)

