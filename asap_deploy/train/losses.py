"""Losses of the SPADE/pix2pixHD recipe: hinge GAN, feature matching, VGG19 perceptual, L1.

All losses are means over the batch (per-sample means averaged), so a data-parallel run whose
processes hold equal shares of a global batch averages to exactly the single-process loss.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, InputError


def _final(preds: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [p[-1] for p in preds]


def hinge_d_loss(pred_real: list[list[torch.Tensor]], pred_fake: list[list[torch.Tensor]]) -> torch.Tensor:
    """Discriminator hinge loss: mean over scales of mean(relu(1 - real)) + mean(relu(1 + fake))."""
    real, fake = _final(pred_real), _final(pred_fake)
    loss_real = sum(F.relu(1 - r).mean() for r in real) / len(real)
    loss_fake = sum(F.relu(1 + f).mean() for f in fake) / len(fake)
    return loss_real + loss_fake


def hinge_d_parts(pred_real, pred_fake) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of `hinge_d_loss`, for logging: (real term, fake term)."""
    real, fake = _final(pred_real), _final(pred_fake)
    return (sum(F.relu(1 - r).mean() for r in real) / len(real),
            sum(F.relu(1 + f).mean() for f in fake) / len(fake))


def hinge_g_loss(pred_fake: list[list[torch.Tensor]]) -> torch.Tensor:
    """Generator hinge loss: mean over scales of -mean(D(fake))."""
    fake = _final(pred_fake)
    return sum(-f.mean() for f in fake) / len(fake)


def feature_matching_loss(pred_fake, pred_real, weight: float = 10.0) -> torch.Tensor:
    """L1 between D features of fake and (detached) real, all layers but the logits, weight / num scales."""
    n = len(pred_fake)
    total = pred_fake[0][0].new_zeros(())
    for pf, pr in zip(pred_fake, pred_real):
        for f, r in zip(pf[:-1], pr[:-1]):
            total = total + F.l1_loss(f, r.detach()) * (weight / n)
    return total


# ---- VGG19 perceptual loss ----------------------------------------------------------------------
# torchvision's vgg19().features layout: conv widths, "M" = max pool. Indices of the Sequential match
# torchvision's, so its state dict (keys `features.<i>.weight`) loads as is.
_VGG19_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
# The slices of the perceptual loss end after relu1_1, relu2_1, relu3_1, relu4_1, relu5_1.
_VGG_SLICE_ENDS = (2, 7, 12, 21, 30)
VGG_LAYER_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)


def vgg19_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    c = 3
    for v in _VGG19_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
            c = v
    return nn.Sequential(*layers)


def load_vgg19_features(path: str | os.PathLike) -> nn.Sequential:
    """VGG19 conv layers with weights from a LOCAL torchvision-format file (never downloaded).

    Accepts torchvision's full `vgg19` state dict (`features.<i>.*`, classifier keys ignored) or a
    features-only one (`<i>.*`).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"{path}: VGG19 weights file not found. The perceptual loss needs torchvision's VGG19 "
            "ImageNet weights as a local file (e.g. vgg19-dcbb9e9d.pth, copied from a machine with internet); "
            "nothing is downloaded. Pass its path with --vgg-weights, or train without --vgg.")
    from ..checkpoints import read_state

    sd = read_state(path)  # bounded like any checkpoint (zip bombs, allocating pickles, dtypes)
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(sd).__name__}")
    feats = vgg19_features()
    if any(k.startswith("features.") for k in sd):
        sd = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
    expected = feats.state_dict()
    missing = sorted(set(expected) - set(sd))
    wrong = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or wrong:
        raise CheckpointError(f"{path}: not torchvision VGG19 weights: "
                              + (f"missing {', '.join(missing[:6])}; " if missing else "")
                              + (f"shape mismatch at {', '.join(wrong[:6])}" if wrong else ""))
    feats.load_state_dict({k: sd[k] for k in expected}, strict=True)
    return feats.eval().requires_grad_(False)


class VGGLoss(nn.Module):
    """sum_i w_i * L1(vgg_i(fake), vgg_i(real)) over relu1_1..relu5_1.

    Images go in as the generator makes them ([-1, 1], no ImageNet normalisation), as in the
    authors' recipe.
    """

    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.slices = nn.ModuleList()
        start = 0
        for end in _VGG_SLICE_ENDS:
            self.slices.append(nn.Sequential(*[features[i] for i in range(start, end)]))
            start = end
        self.requires_grad_(False)

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        loss = fake.new_zeros(())
        x, y = fake, real
        for w, s in zip(VGG_LAYER_WEIGHTS, self.slices):
            x, y = s(x), s(y)
            loss = loss + w * F.l1_loss(x, y.detach())
        return loss
