"""Resolution-free rendering (`asap infer --scale K`): the parameter grid at the label map's own
resolution, the pixelwise MLP on a K-times denser pixel grid.

The rule (issue 7), for output pixel (x', y') of an image K times larger (K > 0, any real):
  * source position (x, y) = (x'/K, y'/K), real-valued;
  * its tile: (floor(y/S), floor(x/S)) of the grid predicted from the label map at its own size;
  * positional encoding: the ASAPNET.md formula at the real-valued x, y
    (cos 2pi (x mod f)/f, sin .., cos 2pi (y mod f)/f, sin .., f = S .. 2);
  * label id: the source pixel whose area [x, x+1) x [y, y+1) holds (x, y), i.e. labels[floor(y),
    floor(x)] (the pixel plain nearest-neighbour resizing picks, in the same tile), or the id of
    the same output pixel in a label map given at the output resolution (`--hires-labels`).
Output size: ceil(H*K) x ceil(W*K) for an H x W input (the pixels whose source position lies
inside the input). At K = 1 this is the normal forward (infer routes K = 1 to it: identical bytes).

Layout shared by both backends (host side, numpy, `ScaleLayout`): output rows are grouped by
tile row and padded to Ly slots per tile row (Lx per tile column); a slot holds its output pixel's
label channel and its TILE-LOCAL source coordinate u = y - S*floor(y/S) in [0, S), computed in
float64 and passed as float32 (small values: the encoding keeps ~1e-6 accuracy at any image size;
x mod f = u mod f because f divides S). The per-tile MLP then runs on (Ly x Lx) slots per tile
inside the engine (`Engine.scaled_mlp`; torch: batched matmuls over tiles, onnxruntime: the
`pixelwise_scaled` graph; engines/scaled.py). Which backends have that stage: engines/registry.py.
Work runs in chunks of tile rows (about `CHUNK_PIXELS` output pixels) to bound memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import InputError, UsageError

CHUNK_PIXELS = 2**19


def scaled_size(n: int, k: float) -> int:
    """Output pixels along an axis of n input pixels at scale k: the x' with x'/k < n."""
    return max(1, int(math.ceil(n * k - 1e-9)))


MAX_SCALE = 1024.0


def check_scale(k: float, max_pixels: int | None = None) -> float:
    """--scale K: a real number in 1..MAX_SCALE whose output of a 1x1 map fits `max_pixels` (the
    size of each input's output is checked from its header: `check_scaled_output`)."""
    from ..limits import check_range

    try:
        k = float(k)
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"--scale must be a number in 1..{MAX_SCALE:g} (got {k!r})") from None
    if math.isfinite(k) and 0 < k < 1:
        raise UsageError(f"--scale {k:g}: K must be >= 1 (rendering below the label map's resolution is not supported)")
    check_range("--scale", k, 1.0, MAX_SCALE)
    if max_pixels is not None and scaled_size(1, k) ** 2 > max_pixels:
        raise UsageError(f"--scale {k:g}: even a 1x1 label map would give {scaled_size(1, k) ** 2:,} pixels, more "
                         f"than --max-pixels {max_pixels:,}")
    return k


def check_scaled_output(path, height: int, width: int, k: float, max_pixels: int, side_by_side: bool = False) -> None:
    """InputError naming the label map if its output at scale K (ceil(H*K) x ceil(W*K), twice as wide
    with --side-by-side) would hold more than `max_pixels` pixels: checked from the header, before
    anything is decoded or allocated."""
    oh, ow = scaled_size(height, k), scaled_size(width, k) * (2 if side_by_side else 1)
    if oh * ow > max_pixels:
        raise InputError(f"{path}: at --scale {k:g} its output would be {ow}x{oh} ({oh * ow:,} pixels), more than "
                         f"--max-pixels {max_pixels:,}")


@dataclass
class AxisLayout:
    """One axis: output coordinate of each (tile, slot), its tile-local source coordinate, validity."""

    out_index: np.ndarray  # (tiles, L) int64 output pixel, clamped to a valid one on padded slots
    src_index: np.ndarray  # (tiles, L) int64 nearest source pixel
    local: np.ndarray  # (tiles, L) float32 tile-local source coordinate in [0, S)
    valid: np.ndarray  # (tiles, L) bool
    n_out: int

    @property
    def slots(self) -> int:
        return self.out_index.shape[1]


def axis_layout(n_src: int, k: float, S: int) -> AxisLayout:  # noqa: N803
    n_out = scaled_size(n_src, k)
    xo = np.arange(n_out, dtype=np.float64)
    src = xo / k
    tile = np.minimum(np.floor(src / S).astype(np.int64), (n_src - 1) // S)
    n_tiles = int(tile.max()) + 1
    counts = np.bincount(tile, minlength=n_tiles)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    L = int(counts.max())  # noqa: N806
    slot = np.arange(L)
    valid = slot[None, :] < counts[:, None]
    out_index = np.where(valid, starts[:, None] + slot[None, :], np.maximum(starts[:, None], 0))
    out_index = np.minimum(out_index, n_out - 1)
    s = src[out_index]
    local = (s - S * np.arange(n_tiles)[:, None]).astype(np.float32)
    local = np.where(valid, local, 0.0).astype(np.float32)
    src_index = np.minimum(np.floor(s).astype(np.int64), n_src - 1)
    return AxisLayout(out_index, src_index, local, valid, n_out)


@dataclass
class ScaleLayout:
    y: AxisLayout
    x: AxisLayout

    @classmethod
    def make(cls, height: int, width: int, k: float, S: int) -> "ScaleLayout":  # noqa: N803
        return cls(axis_layout(height, k, S), axis_layout(width, k, S))

    @property
    def out_shape(self) -> tuple[int, int]:
        return self.y.n_out, self.x.n_out

    @property
    def grid(self) -> tuple[int, int]:
        """Tile rows and columns the output needs (the top-left part of the grid)."""
        return self.y.out_index.shape[0], self.x.out_index.shape[0]

    def gather_ids(self, channel_idx: np.ndarray, hires: bool) -> np.ndarray:
        """(N, H, W) channel indices (at the source resolution, or at the output one when `hires`)
        -> (N, h, Ly, w, Lx) int32 slots."""
        ay, ax = (self.y.out_index, self.x.out_index) if hires else (self.y.src_index, self.x.src_index)
        rows = channel_idx[:, ay.reshape(-1)]  # (N, h*Ly, W)
        return np.ascontiguousarray(rows[:, :, ax.reshape(-1)].reshape(
            channel_idx.shape[0], ay.shape[0], ay.shape[1], ax.shape[0], ax.shape[1]), dtype=np.int32)

    def scatter(self, rgb_slots: np.ndarray) -> np.ndarray:
        """(N, h, Ly, w, Lx, C) -> (N, H', W', C): the valid slots in output order."""
        n, h, ly, w, lx, c = rgb_slots.shape
        flat = rgb_slots.reshape(n, h * ly, w * lx, c)
        return flat[:, self.y.valid.reshape(-1)][:, :, self.x.valid.reshape(-1)]

    def row_chunks(self, pixels: int = CHUNK_PIXELS) -> list[tuple[int, int]]:
        h = self.grid[0]
        per_row = self.y.slots * self.x.slots * self.grid[1]
        step = max(1, pixels // max(1, per_row))
        return [(r, min(h, r + step)) for r in range(0, h, step)]


# ---- running it on an engine ------------------------------------------------------------------------
class ScaledRenderer:
    """The scaled pixelwise stage for one Engine (torch or onnxruntime)."""

    def __init__(self, engine):
        from ..engines.registry import check_scale_capable

        check_scale_capable(engine.name)  # UsageError for a backend without the scaled stage
        self.engine = engine
        self.cfg = engine.config

    def mlp(self, ids: np.ndarray, params: np.ndarray, u_y: np.ndarray, u_x: np.ndarray) -> np.ndarray:
        """One chunk of slots through the engine's scaled pixelwise stage (Engine.scaled_mlp)."""
        return self.engine.scaled_mlp(ids, params, u_y, u_x)

    def render(self, params: np.ndarray, labels: np.ndarray, k: float, height: int, width: int,
               hires: np.ndarray | None = None, what: str = "input", *, ids_checked: bool = False) -> np.ndarray:
        """params (N,P,h,w) of the (padded) label map, labels (N,Hp,Wp) ids (padded), the original
        height x width -> float32 RGB (N, ceil(height*K), ceil(width*K), 3) in [-1, 1].
        `ids_checked`: the ids were checked on the way in (`ModelConfig.check_label_ids`)."""
        cfg = self.cfg
        lay = ScaleLayout.make(height, width, k, cfg.S)
        if hires is not None:
            if tuple(hires.shape[1:]) != lay.out_shape:
                raise InputError(f"{what}: the high-resolution label map is {hires.shape[2]}x{hires.shape[1]}, "
                                 f"--scale {k:g} of {width}x{height} needs {lay.out_shape[1]}x{lay.out_shape[0]}")
            ch = cfg.channel_index(hires, what, check=not ids_checked)
        else:
            ch = cfg.channel_index(labels[:, :height, :width], what, check=not ids_checked)
        gh, gw = lay.grid
        ids = lay.gather_ids(ch, hires is not None)
        out = np.empty(ids.shape + (cfg.output_nc,), np.float32)
        for r0, r1 in lay.row_chunks():
            out[:, r0:r1] = self.mlp(ids[:, r0:r1], params[:, :, r0:r1, :gw], lay.y.local[r0:r1], lay.x.local)
        return lay.scatter(out)
