"""Independent oracles: the math of ASAPNET.md written the slow, obvious way (numpy, float64)."""

from __future__ import annotations

import math

import numpy as np


def pe_oracle(x: int, y: int, S: int) -> np.ndarray:  # noqa: N803
    """Positional encoding of the pixel at global column x, row y (direct formula)."""
    vals, f = [], S
    while f > 1:
        ax, ay = 2 * math.pi * (x % f) / f, 2 * math.pi * (y % f) / f
        vals += [math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay)]
        f //= 2
    return np.array(vals)


def pixelwise_oracle(channel_idx: np.ndarray, params: np.ndarray, mlp_channels: list[int], S: int) -> np.ndarray:  # noqa: N803
    """Per-pixel loop. channel_idx (N,H,W) one-hot channel ids, params (N,P,H/S,W/S) in the
    public layout [bias_l | weight_l (element i*c_out+o)] per layer -> RGB (N,H,W,3) float64."""
    n_b, H, W = channel_idx.shape  # noqa: N806
    n_lab = mlp_channels[0] - 4 * int(round(math.log2(S)))
    n_layers = len(mlp_channels) - 1
    out = np.zeros((n_b, H, W, mlp_channels[-1]))
    p64 = params.astype(np.float64)
    tiles: dict[tuple[int, int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    for n in range(n_b):
        for y in range(H):
            for x in range(W):
                key = (n, y // S, x // S)
                if key not in tiles:  # read this tile's layers from the flat public layout
                    p, off, layers = p64[n, :, y // S, x // S], 0, []
                    for cin, cout in zip(mlp_channels[:-1], mlp_channels[1:]):
                        b = p[off:off + cout]
                        off += cout
                        w = np.empty((cin, cout))
                        for i in range(cin):
                            for o in range(cout):
                                w[i, o] = p[off + i * cout + o]
                        off += cin * cout
                        layers.append((w, b))
                    tiles[key] = layers
                v = np.concatenate([np.eye(n_lab)[channel_idx[n, y, x]], pe_oracle(x, y, S)])
                for li, (w, b) in enumerate(tiles[key]):
                    v = v @ w + b
                    v = np.tanh(v) if li == n_layers - 1 else np.where(v > 0, v, 0.01 * v)
                out[n, y, x] = v
    return out


def tent_kernel_oracle(s: int) -> np.ndarray:
    """[1, 3, ..., 2s-1, 2s-1, ..., 3, 1] / sum, written out."""
    k = [2 * i + 1 for i in range(s)]
    k = k + k[::-1]
    return np.array(k, dtype=np.float64) / sum(k)


def num_params_oracle(c0: int, width: int = 64, depth: int = 5, out: int = 3) -> int:
    ch = [c0] + [width] * (depth - 1) + [out]
    return sum((a + 1) * b for a, b in zip(ch[:-1], ch[1:]))
