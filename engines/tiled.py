"""Engines that run the bundle's graphs (ONNX Runtime, OpenVINO): end to end in one run of the
end-to-end graph up to a pixel budget, else the predictor once and the pixelwise graph in blocks
of whole S x S tiles, which is exact (a tile needs only its own labels, parameters and the
per-tile positional encoding) and keeps a runtime from holding every MLP layer of a whole large
map (64 channels fp32: 0.9 GiB at 1024x1024, 3.5 GiB at 2048x2048).
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np

from .base import IMAGE, IMAGE_FLOAT, Engine


class TiledGraphEngine(Engine):
    """The stages over one hook, `_run(graph, outputs, **arrays)` -> list of arrays; subclasses set
    `pixels_per_run` (batch x H x W of one run)."""

    pixels_per_run: int

    @abstractmethod
    def _run(self, graph: str, outputs: list[str], **arrays) -> list[np.ndarray]: ...

    def _generate(self, labels, instances):
        n, h, w = labels.shape
        if n * h * w <= self.pixels_per_run:  # one run of the end-to-end graph
            img, f = self._run("asap", [IMAGE, IMAGE_FLOAT], labels=labels, instances=instances)
            return {IMAGE: img, IMAGE_FLOAT: f}
        return self._pixelwise(labels, self._predict_params(labels, instances))

    def _predict_params(self, labels, instances):
        return self._run("predictor", ["params"], labels=labels, instances=instances)[0]

    def _pixelwise(self, labels, params):
        out: dict[str, np.ndarray] = {}
        for (i, rows, cols), block in pixelwise_blocks(labels, params, self.config.S, self.pixels_per_run):
            img, f = self._run("pixelwise", [IMAGE, IMAGE_FLOAT], **block)
            for key, part in ((IMAGE, img), (IMAGE_FLOAT, f)):
                if key not in out:
                    out[key] = np.empty(labels.shape + part.shape[3:], part.dtype)
                out[key][i, rows, cols] = part
        return out


def tile_blocks(shape: tuple[int, int, int], S: int, max_pixels: int) -> list[tuple[slice, slice, slice]]:  # noqa: N803
    """Split an (N, H, W) batch into (images, rows, columns) slices of whole S x S tiles, each at
    most `max_pixels` (or one tile, if that is larger): several whole images per block when they
    fit, else bands of tile rows, else runs of tiles within one tile row."""
    n, h, w = shape
    if h * w <= max_pixels:
        k = max(1, max_pixels // (h * w))
        return [(slice(i, i + k), slice(0, h), slice(0, w)) for i in range(0, n, k)]
    if w * S <= max_pixels:
        step = (max_pixels // (w * S)) * S
        return [(slice(i, i + 1), slice(y, min(y + step, h)), slice(0, w)) for i in range(n) for y in range(0, h, step)]
    step = max(1, max_pixels // (S * S)) * S
    return [(slice(i, i + 1), slice(y, y + S), slice(x, min(x + step, w)))
            for i in range(n) for y in range(0, h, S) for x in range(0, w, step)]


def pixelwise_blocks(labels: np.ndarray, params: np.ndarray, S: int, max_pixels: int):  # noqa: N803
    """The pixelwise graph's inputs block by block (tile_blocks): ((images, rows, columns), {"labels":
    the block's ids, "params": its part of the grid}), each contiguous."""
    for i, rows, cols in tile_blocks(labels.shape, S, max_pixels):
        yield (i, rows, cols), {"labels": np.ascontiguousarray(labels[i, rows, cols]),
                                "params": np.ascontiguousarray(params[i, :, rows.start // S:rows.stop // S,
                                                                      cols.start // S:cols.stop // S])}
