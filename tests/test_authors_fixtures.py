"""The authors' own generators (tests/fixtures/authors): load with NO config, reproduce their outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asap_deploy.checkpoints import load_generator
from asap_deploy.io import read_instance_map, read_label_map
from conftest import AUTHORS_FIXTURE_NAMES, authors_fixture_dir, authors_fixture_meta


def load_inputs(d, meta, edges: bool):
    labels = np.stack([read_label_map(d / f"label_{i}.png") for i in range(meta["batch"])])
    inst = np.stack([read_instance_map(d / f"instance_{i}.png") for i in range(meta["batch"])]) if edges else None
    return torch.from_numpy(labels.astype(np.int64)), None if inst is None else torch.from_numpy(inst)


@pytest.mark.parametrize("name", AUTHORS_FIXTURE_NAMES)
def test_authors_checkpoint_reproduces_their_outputs(name):
    d, meta = authors_fixture_dir(name), authors_fixture_meta(name)
    model, ck = load_generator(d / "latest_net_G.pth")
    opts, cfg = meta["authors_options"], ck.config
    assert ck.kind == "authors" and ck.config_source == "inferred"
    # the inferred config is the authors' one
    assert cfg.S == meta["S"] and cfg.num_params == meta["params_per_tile"] and cfg.mlp_channels == meta["mlp_channels"]
    assert cfg.reflection_pad == opts["reflection_pad"] and cfg.instance_edges == (not opts["no_instance_edge"])
    assert (cfg.lr_width, cfg.lr_max_width, cfg.lr_depth) == (opts["lr_width"], opts["lr_max_width"], opts["lr_depth"])
    assert cfg.n_label_channels == opts["label_nc"] + opts["contain_dontcare_label"]
    labels, inst = load_inputs(d, meta, cfg.instance_edges)
    assert tuple(labels.shape) == (meta["batch"], meta["height"], meta["width"])
    with torch.no_grad():
        params = model.predict_params(labels, inst)
        out = model(labels, inst)
    np.testing.assert_allclose(params.numpy(), np.load(d / "params.npy"), atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.numpy(), np.load(d / "output.npy"), atol=1e-4, rtol=0)


def test_dontcare_fixture_really_uses_id_255():
    d = authors_fixture_dir("dontcare_s32")
    assert (read_label_map(d / "label_0.png") == 255).any()


def test_authors_checkpoint_with_matching_preset_config():
    """Given the right config explicitly (not inferred), the same outputs come out."""
    from asap_deploy.config import ModelConfig

    d, meta = authors_fixture_dir("cityscapes_s16"), authors_fixture_meta("cityscapes_s16")
    o = meta["authors_options"]
    cfg = ModelConfig(label_nc=o["label_nc"], contain_dontcare_label=False, instance_edges=True,
                      crop_size=o["crop_size"], aspect_ratio=o["aspect_ratio"], lr_width=o["lr_width"],
                      lr_max_width=o["lr_max_width"], lr_depth=o["lr_depth"], reflection_pad=False)
    model, ck = load_generator(d / "latest_net_G.pth", config=cfg)
    assert ck.config_source == "given"
    labels, inst = load_inputs(d, meta, True)
    with torch.no_grad():
        out = model(labels, inst)
    np.testing.assert_allclose(out.numpy(), np.load(d / "output.npy"), atol=1e-4, rtol=0)
