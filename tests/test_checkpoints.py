"""Checkpoints: our format round-trips; bad files are refused with readable, typed errors."""

from __future__ import annotations

import os
import pickle
import zipfile

import pytest
import torch

from asap_deploy.checkpoints import load_checkpoint, load_generator, save_generator
from asap_deploy.config import ModelConfig
from asap_deploy.errors import CheckpointError
from asap_deploy.model import ASAPNetGenerator

CFG = ModelConfig(label_nc=4, crop_size=64, learned_ds_factor=4, lr_width=8, lr_max_width=8, lr_depth=1,
                  contain_dontcare_label=True)


def make_model(cfg=CFG):
    torch.manual_seed(0)
    return ASAPNetGenerator(cfg)


def test_our_format_round_trips_config_and_weights(tmp_path):
    model = make_model()
    path = save_generator(model, tmp_path / "model.pt", extra={"step": 7})
    loaded, ck = load_generator(path)
    assert ck.kind == "asap-deploy" and ck.config_source == "checkpoint" and ck.config == CFG
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    labels = torch.randint(0, 5, (1, 16, 16))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(labels), loaded(labels))
    assert not [p for p in os.listdir(tmp_path) if p != "model.pt"]  # no temp files left


def test_plain_state_dict_loads_with_inferred_config(tmp_path):
    cfg = CFG.replace(contain_dontcare_label=False)
    model = make_model(cfg)
    torch.save(model.state_dict(), tmp_path / "latest_net_G.pth")
    _, ck = load_generator(tmp_path / "latest_net_G.pth")
    assert ck.kind == "authors" and ck.config.num_params == cfg.num_params and ck.config.S == cfg.S


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {_Payload.marker}",))


def test_code_executing_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    _Payload.marker = marker
    path = tmp_path / "evil.pt"
    torch.save({"lowres_stream.model.0.0.weight": _Payload()}, path)
    with pytest.raises(CheckpointError, match="evil.pt: refused to load"):
        load_checkpoint(path)
    assert not marker.exists()
    with open(tmp_path / "evil.pkl", "wb") as f:  # a raw pickle, not even a torch zip
        pickle.dump(_Payload(), f)
    with pytest.raises(CheckpointError, match="evil.pkl"):
        load_checkpoint(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_truncated_and_missing_files(tmp_path):
    path = save_generator(make_model(), tmp_path / "model.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")


def test_mismatch_is_a_readable_diff(tmp_path):
    sd = make_model().state_dict()
    sd.pop("lowres_stream.model.0.1.bias")
    sd["extra.weight"] = torch.zeros(2)
    sd["lowres_stream.model.2.0.weight"] = torch.zeros(8, 8, 1, 1)
    obj = {"format": "asap-deploy/generator", "version": 1, "config": CFG.to_dict(), "state_dict": sd}
    torch.save(obj, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        load_generator(tmp_path / "bad.pt")
    msg = err.value.message
    assert "bad.pt" in msg and "1 missing key(s): lowres_stream.model.0.1.bias" in msg
    assert "1 unexpected key(s): extra.weight" in msg
    assert "shape mismatch at lowres_stream.model.2.0.weight: model (8, 8, 3, 3), checkpoint (8, 8, 1, 1)" in msg


def test_wrong_config_for_authors_weights_names_the_source(tmp_path):
    torch.save(make_model().state_dict(), tmp_path / "g.pth")
    with pytest.raises(CheckpointError, match=r"config \(given\)"):
        load_generator(tmp_path / "g.pth", config=CFG.replace(label_nc=9))


def test_nan_weights_are_refused(tmp_path):
    model = make_model()
    with torch.no_grad():
        model.lowres_stream.model[-1].bias[3] = float("nan")
    save_generator(model, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="NaN or Inf.*lowres_stream.model.*bias"):
        load_generator(tmp_path / "nan.pt")


def test_unknown_format_version_and_non_dicts(tmp_path):
    torch.save({"format": "asap-deploy/generator", "version": 99, "config": {}, "state_dict": {}}, tmp_path / "v.pt")
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(tmp_path / "v.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a generator checkpoint"):
        load_checkpoint(tmp_path / "list.pt")
    with zipfile.ZipFile(tmp_path / "zip.pt", "w") as z:
        z.writestr("junk", "x")
    with pytest.raises(CheckpointError, match="zip.pt"):
        load_checkpoint(tmp_path / "zip.pt")


def test_written_files_get_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_generator(make_model(), tmp_path / "model.pt")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_invalid_stored_config_is_a_checkpoint_error_naming_the_file(tmp_path):
    obj = {"format": "asap-deploy/generator", "version": 1, "config": {**CFG.to_dict(), "hr_wieth": 64},
           "state_dict": make_model().state_dict()}
    torch.save(obj, tmp_path / "typo.pt")
    with pytest.raises(CheckpointError, match=r"typo.pt: the model config stored .* hr_wieth"):
        load_checkpoint(tmp_path / "typo.pt")
