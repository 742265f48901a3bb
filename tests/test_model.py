"""The generator against independent oracles: per-pixel loop, direct PE formula, tent kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asap_deploy.config import ModelConfig
from asap_deploy.errors import InputError
from asap_deploy.model import (ASAPNetGenerator, TentDownsample, instance_edges, label_channels, pixelwise,
                               positional_encoding_table, tent_kernel)
from oracles import pe_oracle, pixelwise_oracle, tent_kernel_oracle


def small_cfg(**kw) -> ModelConfig:
    base = dict(label_nc=5, crop_size=128, learned_ds_factor=4, lr_width=8, lr_max_width=16, lr_depth=1)
    base.update(kw)
    return ModelConfig(**base)


def random_params(cfg: ModelConfig, n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, cfg.num_params, h, w, generator=g) * 0.3


@pytest.mark.parametrize("S", [2, 4, 8, 16, 64])
def test_pe_table_equals_direct_formula_in_every_tile(S):
    table = positional_encoding_table(S)
    assert table.shape == (S * S, 4 * int(np.log2(S)))
    rng = np.random.default_rng(S)
    for _ in range(20):  # random global pixels: the tile-local table must equal the global formula
        x, y = rng.integers(0, 8 * S, size=2)
        np.testing.assert_allclose(table[(y % S) * S + (x % S)], pe_oracle(int(x), int(y), S), atol=1e-6)


@pytest.mark.parametrize("s", [1, 2, 4, 8])
def test_tent_kernel_and_downsample(s):
    np.testing.assert_allclose(tent_kernel(s), tent_kernel_oracle(s), rtol=1e-6)
    if s < 2:
        return
    x = torch.rand(2, 3, 8 * s, 4 * s, dtype=torch.float64)
    got = TentDownsample(s, 3).double()(x)
    k = tent_kernel_oracle(s)
    xp = np.pad(x.numpy(), [(0, 0), (0, 0), (s // 2, s // 2), (s // 2, s // 2)], mode="reflect")
    want = np.zeros((2, 3, 8, 4))
    for i in range(8):  # direct 2-D sum over the separable kernel's footprint
        for j in range(4):
            patch = xp[:, :, i * s:i * s + 2 * s, j * s:j * s + 2 * s]
            want[:, :, i, j] = np.einsum("ncyx,y,x->nc", patch, k, k)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-10)


@pytest.mark.parametrize(
    "cfg_kw,n,H,W",
    [
        (dict(), 2, 32, 48),  # S=8, batch 2, non-square
        (dict(crop_size=64, learned_ds_factor=4, label_nc=3), 1, 12, 8),  # S=4, taller than wide
        (dict(contain_dontcare_label=True), 1, 16, 16),
        (dict(hr_width=16, hr_depth=3), 3, 8, 24),
    ],
)
def test_pixelwise_equals_per_pixel_oracle(cfg_kw, n, H, W):  # noqa: N803
    cfg = small_cfg(**cfg_kw)
    S = cfg.S  # noqa: N806
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.n_label_channels, (n, H, W), generator=g)
    params = random_params(cfg, n, H // S, W // S)
    want = pixelwise_oracle(idx.numpy(), params.numpy(), cfg.mlp_channels, S)
    assert np.abs(want).mean() > 0.1  # unsaturated, varied outputs: the comparison means something
    for chunk in (1, 10**9):  # one tile row per chunk, and everything in one chunk
        got = pixelwise(idx, params, cfg, chunk_pixels=chunk).double().numpy()
        np.testing.assert_allclose(got, want, atol=2e-5)


def unsaturated_generator(cfg: ModelConfig) -> ASAPNetGenerator:
    """Random weights with the parameter-prediction conv scaled so the MLP output stays in tanh's range."""
    torch.manual_seed(0)
    model = ASAPNetGenerator(cfg).eval()
    with torch.no_grad():
        model.lowres_stream.model[-1].weight.mul_(0.3)
    return model


def test_generator_any_batch_and_size_on_every_call():
    cfg = small_cfg()
    model = unsaturated_generator(cfg)
    with torch.no_grad():
        for n, H, W in [(1, 32, 32), (3, 16, 40), (2, 64, 8)]:  # noqa: N806
            labels = torch.randint(0, 5, (n, H, W))
            out = model(labels)
            assert out.shape == (n, 3, H, W)
            params = model.predict_params(labels)
            assert params.shape == (n, cfg.num_params, H // 8, W // 8)
            want = pixelwise_oracle(labels.numpy(), params.numpy(), cfg.mlp_channels, 8)
            assert 0.05 < np.abs(want).mean() < 0.9
            np.testing.assert_allclose(out.permute(0, 2, 3, 1).double().numpy(), want, atol=2e-5)


def test_batch_items_are_independent():
    model = unsaturated_generator(small_cfg())
    labels = torch.randint(0, 5, (3, 16, 24))
    with torch.no_grad():
        both = model(labels)
        one = model(labels[1:2])
    torch.testing.assert_close(both[1:2], one, atol=1e-4, rtol=0)  # conv algorithms vary with batch


def test_instance_edges_match_neighbour_definition():
    inst = torch.randint(0, 3, (2, 9, 7))
    got = instance_edges(inst)[:, 0].numpy()
    t = inst.numpy()
    want = np.zeros_like(got)
    for n in range(2):
        for y in range(9):
            for x in range(7):
                for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < 9 and 0 <= xx < 7 and t[n, yy, xx] != t[n, y, x]:
                        want[n, y, x] = 1
    np.testing.assert_array_equal(got, want)


def test_label_ids_are_validated_and_dontcare_maps_to_last_channel():
    cfg = small_cfg(contain_dontcare_label=True)
    idx = label_channels(torch.tensor([[[0, 4, 255, 5]]]), cfg)
    assert idx.tolist() == [[[0, 4, 5, 5]]]
    with pytest.raises(InputError, match="label id 6"):
        label_channels(torch.tensor([[[6]]]), cfg)
    with pytest.raises(InputError, match="label id 255"):
        label_channels(torch.tensor([[[255]]]), small_cfg())


def test_bad_shapes_are_refused():
    model = ASAPNetGenerator(small_cfg())
    with pytest.raises(InputError, match="multiple of S=8"):
        model(torch.zeros(1, 12, 16, dtype=torch.long))
    with pytest.raises(InputError, match=r"\(N, H, W\)"):
        model(torch.zeros(16, 16, dtype=torch.long))
    with pytest.raises(InputError, match="integer ids"):
        model(torch.zeros(1, 16, 16))
    edges = ASAPNetGenerator(small_cfg(instance_edges=True))
    with pytest.raises(InputError, match="instance map is required"):
        edges(torch.zeros(1, 16, 16, dtype=torch.long))


def test_state_dict_keys_follow_the_authors_layout():
    keys = set(ASAPNetGenerator(small_cfg(lr_depth=2)).state_dict())
    assert "lowres_stream.model.0.0.weight" in keys and "lowres_stream.model.0.1.bias" in keys
    # 3 convs (+ReLU each) at 0, 2, 4; blocks at 6, 7; final 1x1 conv at 8 (ASAPNET.md's scheme)
    assert "lowres_stream.model.4.0.weight" in keys and "lowres_stream.model.7.conv_block.0.0.weight" in keys
    assert "lowres_stream.model.8.bias" in keys
    refl = set(ASAPNetGenerator(small_cfg(lr_depth=2, reflection_pad=True)).state_dict())
    assert "lowres_stream.model.1.0.weight" in refl and "lowres_stream.model.7.0.weight" in refl
    assert "lowres_stream.model.10.conv_block.1.0.weight" in refl and "lowres_stream.model.11.weight" in refl
    assert not any("kernel" in k for k in keys | refl)  # the tent kernel is fixed, not saved


def test_generator_is_differentiable():
    cfg = small_cfg()
    model = ASAPNetGenerator(cfg)
    out = model(torch.randint(0, 5, (1, 16, 16)))
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("s,n,H,W", [(2, 5, 8, 12), (4, 13, 16, 32), (8, 3, 32, 16)])  # noqa: N803
def test_tent_from_ids_equals_tent_of_one_hot(s, n, H, W):  # noqa: N803
    from asap_deploy.model import one_hot, tent_downsample_ids

    idx = torch.randint(0, n, (2, H, W))
    want = TentDownsample(s, n)(one_hot(idx, n))
    torch.testing.assert_close(tent_downsample_ids(idx, n, s), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("edges", [False, True])
def test_lowres_input_equals_downsampled_encoding(edges):
    cfg = small_cfg(crop_size=512, learned_ds_factor=4, instance_edges=edges)  # S=32: pre-downsample by 8
    model = ASAPNetGenerator(cfg)
    idx = torch.randint(0, cfg.n_label_channels, (2, 64, 96))
    inst = torch.randint(0, 4, (2, 64, 96)) if edges else None
    want = model.pre_downsample(model.encode(idx, inst))
    torch.testing.assert_close(model.lowres_input(idx, inst), want, atol=1e-6, rtol=0)
