"""Multiscale PatchGAN discriminator of the SPADE/pix2pixHD recipe (ASAPNET.md, "Training").

Each scale is an N-layer PatchGAN: conv k4 s2 + LeakyReLU(0.2), then (n_layers - 1) convs with
spectral norm + instance norm (no affine, no bias: the norm cancels it), the last of them stride 1,
then a k4 s1 conv to one logit channel. Filters start at `ndf` and double up to `ndf_max`.
Between scales the input is average-pooled (3, stride 2, pad 1, padding not counted).
Every scale returns all its intermediate features (the last is the logit map) for feature matching.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


class NLayerDiscriminator(nn.Module):
    def __init__(self, in_channels: int, ndf: int = 64, n_layers: int = 4, ndf_max: int = 512):
        super().__init__()
        kw, pad = 4, 2  # pad = ceil((kw - 1) / 2)
        blocks: list[nn.Module] = [nn.Sequential(nn.Conv2d(in_channels, ndf, kw, 2, pad), nn.LeakyReLU(0.2))]
        nf = ndf
        for n in range(1, n_layers):
            prev, nf = nf, min(nf * 2, ndf_max)
            stride = 1 if n == n_layers - 1 else 2
            blocks.append(nn.Sequential(spectral_norm(nn.Conv2d(prev, nf, kw, stride, pad, bias=False)),
                                        nn.InstanceNorm2d(nf, affine=False), nn.LeakyReLU(0.2)))
        blocks.append(nn.Sequential(nn.Conv2d(nf, 1, kw, 1, pad)))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return feats


class MultiscaleDiscriminator(nn.Module):
    """`forward(x)` -> one list of features per scale (finest first); x = [semantics, image]."""

    def __init__(self, in_channels: int, num_d: int = 2, ndf: int = 64, n_layers: int = 4, ndf_max: int = 512):
        super().__init__()
        self.scales = nn.ModuleList(NLayerDiscriminator(in_channels, ndf, n_layers, ndf_max) for _ in range(num_d))

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        out = []
        for i, d in enumerate(self.scales):
            if i:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            out.append(d(x))
        return out
