"""A path of another kind than its option wants gets a hint naming the right option or path
(issue 14, item 3), before any work (no backend is chosen, nothing is written), exit 2."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from asap_deploy.checkpoints import save_generator
from asap_deploy.cli import app
from asap_deploy.config import ModelConfig
from asap_deploy.export.bundle import export_model
from asap_deploy.io import write_png
from asap_deploy.random_model import random_generator, random_label_maps

CFG = ModelConfig(label_nc=5, contain_dontcare_label=True, crop_size=128, learned_ds_factor=8, lr_width=8,
                  lr_max_width=8, lr_depth=1, hr_width=16)
runner = CliRunner()


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    d = tmp_path_factory.mktemp("hints")
    model = random_generator(CFG, 3)
    save_generator(model, d / "run" / "model.pt")
    export_model(model, d / "bundle", fp16=False)
    labels, _ = random_label_maps(CFG, 1, 16, 16, seed=2)
    write_png(d / "m.png", labels[0])
    return d


def flat(text: str) -> str:
    return "".join(text.split())


@pytest.mark.parametrize("args,says", [
    (["infer", "{d}/m.png", "--bundle", "{d}/bundle/asap.onnx"], "a file of a bundle, not the bundle; pass its folder: --bundle {d}/bundle"),
    (["infer", "{d}/m.png", "--bundle", "{d}/bundle/manifest.json"], "pass its folder: --bundle {d}/bundle"),
    (["infer", "{d}/m.png", "--bundle", "{d}/run/model.pt"], "a checkpoint, not a bundle folder; pass it as --model {d}/run/model.pt"),
    (["infer", "{d}/m.png", "--bundle", "{d}/run"], "a folder holding the checkpoint {d}/run/model.pt"),
    (["infer", "{d}/m.png", "--model", "{d}/bundle"], "a bundle folder, not a checkpoint; pass it as --bundle {d}/bundle"),
    (["infer", "{d}/m.png", "--model", "{d}/bundle/asap.onnx"], "pass its folder as --bundle {d}/bundle"),
    (["infer", "{d}/m.png", "--engine", "{d}/bundle"], "a bundle folder, not an engine file; pass it as --bundle {d}/bundle"),
    (["infer", "{d}/m.png", "--engine", "{d}/bundle/asap.onnx"], "an ONNX graph, not a TensorRT engine"),
    (["bench", "--bundle", "{d}/run/model.pt"], "pass it as --model {d}/run/model.pt"),
    (["export", "{d}/run", "-o", "{d}/never"], "a folder, not a checkpoint file; did you mean {d}/run/model.pt?"),
    (["export", "{d}/bundle/asap.onnx", "-o", "{d}/never"], "a file of a bundle (ONNX or engine), not a checkpoint"),
    (["validate", "{d}/bundle/asap.onnx"], "pass its folder: {d}/bundle"),
    (["validate", "{d}/run/model.pt"], "a checkpoint, not a bundle folder; export it first: asap export {d}/run/model.pt"),
])
def test_wrong_kind_gets_a_hint_before_any_work(place, args, says):
    d = str(place)
    r = runner.invoke(app, [a.format(d=d) for a in args])
    assert r.exit_code == 2, r.output
    out = flat(r.output)
    assert flat(says.format(d=d)) in out, r.output
    assert "skipped" not in r.output and "backend:" not in r.output  # refused before choosing a backend
    assert "Traceback" not in r.output and not (place / "never").exists()


def test_the_right_kind_still_works(place, tmp_path):
    r = runner.invoke(app, ["infer", str(place / "m.png"), "--bundle", str(place / "bundle"), "-o", str(tmp_path / "o"),
                            "--backend", "onnxruntime"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["infer", str(place / "m.png"), "--model", str(place / "run" / "model.pt"), "-o",
                            str(tmp_path / "o2")])
    assert r.exit_code == 0, r.output
