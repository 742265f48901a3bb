"""The speed baseline (benchmarks/authors_forward.py) computes the same function as our generator.

Otherwise benchmarks/forward_speed.py would compare two different things.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from asap_deploy.config import ModelConfig
from asap_deploy.model import label_channels
from oracles import pixelwise_oracle

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "authors_forward.py"
_spec = importlib.util.spec_from_file_location("authors_forward", _PATH)
authors_forward = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(authors_forward)

CASES = {
    # S=64 with tent pre-downsample by 4, reflection pad, batch 2, non-square
    "facades_like": (ModelConfig(label_nc=5, crop_size=1024, lr_width=8, lr_max_width=16, lr_depth=1,
                                 reflection_pad=True), 2, 128, 192),
    # instance edges feed the low-res stream only; aspect 2 -> S=16 (no pre-downsample)
    "edges": (ModelConfig(label_nc=4, instance_edges=True, crop_size=512, aspect_ratio=2.0, lr_width=8,
                          lr_max_width=16, lr_depth=1), 1, 32, 48),
    # don't care channel (id 255), S=32
    "dontcare": (ModelConfig(label_nc=3, contain_dontcare_label=True, crop_size=512, lr_width=8,
                             lr_max_width=16, lr_depth=0), 1, 64, 32),
}


def _inputs(cfg: ModelConfig, n: int, H: int, W: int, seed: int):  # noqa: N803
    g = torch.Generator().manual_seed(seed)
    # blocky labels so tent downsampling and tiles see regions, plus some single-pixel noise
    coarse = torch.randint(0, cfg.n_label_channels, (n, H // 8, W // 8), generator=g)
    labels = coarse.repeat_interleave(8, 1).repeat_interleave(8, 2)
    noise = torch.rand((n, H, W), generator=g) < 0.1
    labels = torch.where(noise, torch.randint(0, cfg.n_label_channels, (n, H, W), generator=g), labels)
    if cfg.contain_dontcare_label:
        labels[labels == cfg.n_label_channels - 1] = 255
    inst = torch.randint(0, 3, (n, H // 4, W // 4), generator=g).repeat_interleave(4, 1).repeat_interleave(4, 2)
    return labels, (inst if cfg.instance_edges else None)


@pytest.mark.parametrize("case", sorted(CASES))
def test_authors_baseline_equals_generator_and_oracle(case):
    cfg, n, H, W = CASES[case]  # noqa: N806
    labels, inst = _inputs(cfg, n, H, W, seed=2)
    gen = authors_forward.random_generator(cfg, labels, inst, seed=1)
    base = authors_forward.AuthorsForward(gen)
    with torch.no_grad():
        theirs, their_params = base(base.encode(labels, inst))
        ours_params = gen.predict_params(labels, inst)
        ours = gen(labels, inst)
    assert theirs.shape == (n, 3, H, W)
    assert float(theirs.std()) > 0.1 and float((theirs.abs() > 0.99).float().mean()) < 0.01  # unsaturated
    torch.testing.assert_close(their_params, ours_params, rtol=0, atol=1e-5)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    ref = pixelwise_oracle(label_channels(labels, cfg).numpy(), their_params.numpy(), cfg.mlp_channels, cfg.S)
    np.testing.assert_allclose(theirs.permute(0, 2, 3, 1).numpy(), ref, rtol=0, atol=1e-4)


def test_authors_baseline_encoding_is_the_shared_table_tiled():
    from asap_deploy.model import positional_encoding_table

    S, H, W = 16, 32, 48  # noqa: N806
    pe = authors_forward.full_res_encoding(2, H, W, S)
    table = torch.from_numpy(positional_encoding_table(S)).view(S, S, -1).permute(2, 0, 1)
    torch.testing.assert_close(pe, table.repeat(1, H // S, W // S).expand(2, -1, -1, -1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 4096, 10**9])
def test_pixelwise_gradient_equals_baseline(chunk):
    """Training differentiates our pixelwise stage: its gradients must be the authors' too.
    In float64: in fp32 a pre-activation within rounding of 0 can flip a leaky-ReLU slope."""
    from asap_deploy.model import pixelwise

    cfg, n, H, W = CASES["dontcare"]  # noqa: N806
    labels, _ = _inputs(cfg, n, H, W, seed=3)
    idx = label_channels(labels, cfg)
    g = torch.Generator().manual_seed(4)
    shape = (n, cfg.num_params, H // cfg.S, W // cfg.S)
    params = (torch.randn(shape, generator=g, dtype=torch.float64) * 0.1).requires_grad_()
    weight = torch.randn((n, 3, H, W), generator=g, dtype=torch.float64)
    base = authors_forward.AuthorsForward.__new__(authors_forward.AuthorsForward)
    base.cfg, base._pe = cfg, authors_forward.full_res_encoding(n, H, W, cfg.S).double()
    onehot = torch.nn.functional.one_hot(idx, cfg.n_label_channels).permute(0, 3, 1, 2).double()
    (want,) = torch.autograd.grad((base.pixelwise(onehot, params) * weight).sum(), params)
    ours = pixelwise(idx, params, cfg, chunk_pixels=chunk)
    (got,) = torch.autograd.grad((ours.permute(0, 3, 1, 2) * weight).sum(), params)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # both encodings are fp32 tables


@pytest.mark.parametrize("name", ["facades_s64", "cityscapes_s16", "dontcare_s32"])
def test_authors_baseline_reproduces_the_authors_own_outputs(name):
    """The restatement that `asap bench` times as the authors' forward, on the generators the authors'
    own code built and ran (tests/fixtures/authors): its OUTPUTS (image and parameter grid) equal
    what their code computed from the same checkpoint and label maps."""
    from asap_deploy.checkpoints import load_generator
    from asap_deploy.io import read_instance_map, read_label_map
    from conftest import authors_fixture_dir, authors_fixture_meta

    d, meta = authors_fixture_dir(name), authors_fixture_meta(name)
    model, _ = load_generator(d / "latest_net_G.pth")
    cfg = model.cfg
    labels = torch.from_numpy(np.stack([read_label_map(d / f"label_{i}.png") for i in range(meta["batch"])]).astype(np.int64))
    inst = (torch.from_numpy(np.stack([read_instance_map(d / f"instance_{i}.png") for i in range(meta["batch"])]))
            if cfg.instance_edges else None)
    base = authors_forward.AuthorsForward(model)
    with torch.no_grad():
        onehot = base.encode(labels, inst)
        image, params = base(onehot)
        # their caller's one-hot: channel = label id, id 255 (don't care) the last channel; + edge channel
        assert onehot.shape == (meta["batch"], cfg.n_label_channels + cfg.instance_edges, meta["height"], meta["width"])
        ids = torch.where(labels == 255, cfg.n_label_channels - 1, labels)  # 255 only in the don't-care fixture
        assert torch.equal(onehot[:, :cfg.n_label_channels].argmax(1), ids)
        assert torch.equal(onehot[:, :cfg.n_label_channels].sum(1), torch.ones_like(ids, dtype=onehot.dtype))
    np.testing.assert_allclose(params.numpy(), np.load(d / "params.npy"), atol=1e-4, rtol=0)
    np.testing.assert_allclose(image.numpy(), np.load(d / "output.npy"), atol=1e-4, rtol=0)
    # the stages as bench times them, one at a time, give the same
    with torch.no_grad():
        np.testing.assert_allclose(base.pixelwise(onehot, base.lowres(onehot)).numpy(), np.load(d / "output.npy"),
                                   atol=1e-4, rtol=0)
