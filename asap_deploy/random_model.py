"""A random model and inputs for it: random generators and realistic random label maps (blobs
of classes), for `asap validate --random`, the benchmark, the tests and benchmarks/.

Not the training data set of `asap make-data` (that is synthetic_dataset.py). Core: it reads only
config and model, so every layer may use it. numpy + OpenCV only, except `random_generator` (torch).
"""

from __future__ import annotations

import numpy as np

from asap_deploy.config import DONTCARE_ID, ModelConfig


def random_label_maps(cfg: ModelConfig, n: int, height: int, width: int, seed: int = 0,
                      blobs: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """n label maps of `height` x `width` made of irregular blobs of classes (not uniform noise).

    Each map: random seed points with random classes; a pixel takes the class of the nearest seed
    under a smoothly warped distance, so regions have wavy borders. Instance ids number the blobs
    (when the config uses instance edges). For configs with don't care, one blob becomes id 255.
    Returns labels (n,H,W) in the config's label dtype and instances (n,H,W) int32 or None.
    """
    import cv2

    rng = np.random.default_rng(seed)
    k = blobs or int(rng.integers(6, 16))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    labels = np.empty((n, height, width), dtype=np.dtype(cfg.label_dtype))
    inst = np.empty((n, height, width), dtype=np.int32)
    scale = float(max(height, width))
    for i in range(n):
        py, px = rng.uniform(0, height, k), rng.uniform(0, width, k)
        best = np.full((height, width), np.inf, np.float32)
        owner = np.zeros((height, width), np.int32)
        for j in range(k):
            warp = cv2.resize(rng.normal(0, 0.15 * scale, (4, 4)).astype(np.float32), (width, height),
                              interpolation=cv2.INTER_CUBIC)
            d = np.hypot(ys - py[j], xs - px[j]) + warp
            closer = d < best
            best[closer], owner[closer] = d[closer], j
        classes = rng.integers(0, cfg.n_label_channels, k)
        if cfg.accepts_dontcare_id and k > 2:
            classes[int(rng.integers(0, k))] = DONTCARE_ID
        labels[i] = classes[owner].astype(labels.dtype)
        inst[i] = owner + 1 + 1000 * classes[owner]
    return labels, (inst if cfg.instance_edges else None)


def random_generator(cfg: ModelConfig, seed: int = 0, param_scale: float = 0.25):
    """An ASAPNetGenerator with random weights whose outputs are varied and unsaturated: default
    init, random InstanceNorm affine values, and the parameter-prediction conv scaled down."""
    import torch

    from asap_deploy.model import ASAPNetGenerator

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ASAPNetGenerator(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".1.weight"):  # InstanceNorm scale
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".1.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        model.lowres_stream.model[-1].weight.mul_(param_scale)
    return model
