"""The authors' generator forward, restated the way their code computes it (the speed baseline of
`asap bench` and of the benchmark scripts; benchmarks/authors_forward.py re-exports it).

Written from ASAPNET.md, "How the authors' code computes it", after reading their
`models/networks/generator.py`; it is our own restatement, not their code. What it keeps on
purpose, because that is what costs them time and memory:
  * the input is the full-resolution fp32 one-hot (+ edge channel), built by the caller;
  * the tent downsample module is rebuilt (kernels re-allocated) on every call;
  * the positional encoding is a full-resolution (N, 4 log2 S, H, W) tensor, concatenated to
    the one-hot on every call (built once and cached, as theirs is);
  * the input is unfolded into S x S tiles and copied to (N, h, w, S*S, C0);
  * each layer is a 5-D `matmul(x, W) + b` with W and b viewed out of the grid, then an in-place
    leaky ReLU or tanh; the tiles are finally permuted back to (N, 3, H, W).
The low-res stream is our `LowResStream` module: same layers, same weights, same computation.
One deviation: their encoding cache is never invalidated (a later call at another size fails);
here it is rebuilt when the size changes, so one instance can serve tests at several sizes.

What `asap bench` times as "the authors' forward" (checked against their generator.py): exactly
their generator's forward, `get_lowres` (a fresh tent module) -> `lowres_stream` ->
`highres_stream`, in fp32 under torch.no_grad() as their Pix2PixModel runs inference. What it
does NOT time, in their favour: their caller's preprocessing (Pix2PixModel.preprocess_input: the
one-hot, `scatter_` into a zeroed fp32 (N, C, H, W) tensor, and the instance edges), built once
per input by `encode` outside the timed calls. tests/test_authors_baseline.py checks this
restatement's outputs (image and parameter grid) against the outputs the authors' own code
computed for the generators of tests/fixtures/authors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from asap_deploy.config import ModelConfig
from asap_deploy.model import ASAPNetGenerator, TentDownsample, instance_edges, label_channels, one_hot


def full_res_encoding(n: int, H: int, W: int, S: int) -> torch.Tensor:  # noqa: N803
    """(n, 4 log2 S, H, W) positional encoding, every pixel materialised (their layout)."""
    xs = torch.arange(W, dtype=torch.float32)
    ys = torch.arange(H, dtype=torch.float32)
    planes, f = [], S
    while f > 1:
        ax = 2 * math.pi * torch.remainder(xs, f) / f
        ay = 2 * math.pi * torch.remainder(ys, f) / f
        for v in (torch.cos(ax), torch.sin(ax)):
            planes.append(v.view(1, 1, 1, W).repeat(n, 1, H, 1))
        for v in (torch.cos(ay), torch.sin(ay)):
            planes.append(v.view(1, 1, H, 1).repeat(n, 1, 1, W))
        f //= 2
    return torch.cat(planes, 1)


class AuthorsForward:
    """The baseline, sharing the weights of an `ASAPNetGenerator`.

    `lowres(onehot)` -> params grid, `pixelwise(onehot, params)` -> (N, 3, H, W),
    `__call__(onehot)` -> (image, params), as their generator returns.
    """

    def __init__(self, generator: ASAPNetGenerator):
        self.cfg = generator.cfg
        self.lowres_stream = generator.lowres_stream
        self._pe: torch.Tensor | None = None

    def encode(self, labels: torch.Tensor, instances: torch.Tensor | None = None) -> torch.Tensor:
        """The caller's side of their pipeline: ids -> full-res fp32 one-hot (+ edges)."""
        x = one_hot(label_channels(labels, self.cfg), self.cfg.n_label_channels)
        if self.cfg.instance_edges:
            x = torch.cat([x, instance_edges(instances)], 1)
        return x

    def lowres(self, onehot: torch.Tensor) -> torch.Tensor:
        s1 = self.cfg.pre_downsample
        if s1 > 1:  # a fresh module (and kernels) per call, as theirs
            onehot = TentDownsample(s1, onehot.shape[1]).to(onehot.device)(onehot)
        return self.lowres_stream(onehot)

    def pixelwise(self, onehot: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        cfg, S = self.cfg, self.cfg.S  # noqa: N806
        x = onehot[:, :-1] if cfg.instance_edges else onehot  # edge channel: low-res only
        n, _, H, W = x.shape  # noqa: N806
        h, w = params.shape[2:]
        if self._pe is None or self._pe.shape[0] != n or self._pe.shape[2:] != (H, W):
            self._pe = full_res_encoding(n, H, W, S)
        x = torch.cat([x, self._pe], 1)
        c0 = x.shape[1]
        # (n, C, h, w, S, S) tiles -> channels last, one tile's pixels contiguous
        x = x.unfold(2, S, S).unfold(3, S, S).permute(0, 2, 3, 4, 5, 1).contiguous().view(n, h, w, S * S, c0)
        offsets = cfg.param_offsets()
        for li, (b0, w0, cin, cout) in enumerate(offsets):
            wgt = params[:, w0:w0 + cin * cout].permute(0, 2, 3, 1).view(n, h, w, cin, cout)
            bias = params[:, b0:b0 + cout].permute(0, 2, 3, 1).view(n, h, w, 1, cout)
            x = torch.matmul(x, wgt) + bias
            # 0.01 written out, not config.LEAKY_SLOPE: the baseline restates the authors' code, whose
            # slope is this literal (ASAPNET.md), whatever our contract says
            x = torch.tanh(x) if li == len(offsets) - 1 else F.leaky_relu(x, 0.01, inplace=True)
        x = x.view(n, h, w, S, S, -1).permute(0, 5, 1, 3, 2, 4)
        return x.contiguous().view(n, -1, H, W)

    def __call__(self, onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.lowres(onehot)
        return self.pixelwise(onehot, params), params


def random_generator(cfg: ModelConfig, labels: torch.Tensor, instances: torch.Tensor | None = None,
                     seed: int = 0, param_std: float = 0.1) -> ASAPNetGenerator:
    """A generator with random weights whose outputs are varied but unsaturated on `labels`:
    the final conv is rescaled so the predicted parameters have std `param_std` (a 64-wide
    layer then keeps activations of order one instead of driving tanh to +-1 or to 0)."""
    torch.manual_seed(seed)
    gen = ASAPNetGenerator(cfg).eval()
    with torch.no_grad():
        for p in gen.parameters():
            p.normal_(0, 0.3)
        final = gen.lowres_stream.model[-1]
        final.bias.zero_()
        std = float(gen.predict_params(labels, instances).std())
        final.weight.mul_(param_std / std)
        final.bias.normal_(0, param_std)
    return gen
