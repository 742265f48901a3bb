"""`asap infer --ray`: Ray Data on a local Ray instance gives byte-identical outputs to local
`asap infer`; a corrupt file is reported and the rest written; options refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from asap_deploy.errors import UsageError
from asap_deploy.app.infer import InferOptions, Source, infer
from asap_deploy.app.ray_infer import RayOptions, ray_infer

CFG_KW = dict(label_nc=5, contain_dontcare_label=True, crop_size=128, learned_ds_factor=8, lr_width=8,
              lr_max_width=8, lr_depth=1, hr_width=16)


@pytest.mark.parametrize("kw, msg", [({"actors": 0}, "--ray-actors"), ({"num_cpus": 0}, "--ray-cpus"),
                                     ({"address": "nowhere"}, "local, auto")])
def test_options_refused(kw, msg):
    with pytest.raises(UsageError, match=msg):
        RayOptions(**kw).check()


def test_fail_fast_refused(tmp_path):
    with pytest.raises(UsageError, match="--fail-fast is not available with --ray"):
        ray_infer([str(tmp_path)], Source(bundle=tmp_path), InferOptions(out_dir=tmp_path / "o", fail_fast=True))


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'asap-deploy[ray]')")
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'ray[data]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    pytest.importorskip("torch", reason="making the test bundle needs torch (asap-deploy[torch])")
    from asap_deploy.config import ModelConfig
    from asap_deploy.export.bundle import export_model
    from asap_deploy.random_model import random_generator

    return export_model(random_generator(ModelConfig(**CFG_KW), 3), tmp_path_factory.mktemp("ray") / "b",
                        fp16=False).path


def test_200_maps_byte_identical_to_local_infer(ray_local, bundle_dir, tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(200):  # three sizes, one not a multiple of S (padded + cropped)
        h, w = [(16, 24), (32, 32), (13, 21)][i % 3]
        Image.fromarray(rng.integers(0, 6, (h, w)).astype(np.uint8)).save(src / f"m{i:03d}.png")
    (src / "m100.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # one corrupt file
    source = Source(bundle=bundle_dir)
    local = infer([str(src)], source, InferOptions(out_dir=tmp_path / "local"))
    dist = ray_infer([str(src), str(tmp_path / "missing.png")], source, InferOptions(out_dir=tmp_path / "ray"),
                     ray_options=RayOptions(address="local", actors=2, files_per_batch=16))
    assert len(local.written) == len(dist.written) == 199
    failed = {str(r.input): r.error for r in dist.failed}
    assert set(failed) == {str(src / "m100.png"), str(tmp_path / "missing.png")}
    assert str(src / "m100.png") in failed[str(src / "m100.png")] and "cannot read the image" in failed[str(src / "m100.png")]
    assert [str(r.input) for r in dist.results[:2]] == [str(tmp_path / "missing.png"), str(src / "m000.png")]
    names = sorted(p.name for p in (tmp_path / "ray").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "local").iterdir()) and len(names) == 199  # no temp files
    for n in names:
        assert (tmp_path / "ray" / n).read_bytes() == (tmp_path / "local" / n).read_bytes(), n
    assert all(r.output is not None and r.output.parent == tmp_path / "ray" for r in dist.written)
    assert "on Ray (local, 2 actor(s))" in dist.reason


def test_same_output_name_reported(ray_local, bundle_dir, tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        Image.fromarray(np.ones((16, 16), np.uint8)).save(tmp_path / d / "x.png")
    s = ray_infer([str(tmp_path / "a"), str(tmp_path / "b")], Source(bundle=bundle_dir),
                  InferOptions(out_dir=tmp_path / "o"), ray_options=RayOptions(actors=1))
    assert len(s.written) == 1 and "would overwrite the output of" in s.failed[0].error


def test_cli_infer_ray(ray_local, bundle_dir, tmp_path):
    from typer.testing import CliRunner

    from asap_deploy.cli import app

    (tmp_path / "in").mkdir()
    Image.fromarray(np.ones((16, 16), np.uint8)).save(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "b.png").write_bytes(b"junk")
    r = CliRunner().invoke(app, ["infer", str(tmp_path / "in"), "--bundle", str(bundle_dir), "-o", str(tmp_path / "o"),
                                 "--ray", "local", "--ray-actors", "1"])
    assert r.exit_code == 5, r.output
    assert "1 image(s) written" in " ".join(r.output.split()) and (tmp_path / "o" / "a.png").is_file()


def test_actor_engines_use_the_cpus_ray_reserved_for_them(bundle_dir, monkeypatch):
    """Each actor's engine runs as many CPU threads as its Ray reservation (default: every core,
    which oversubscribes a node shared by several actors)."""
    from asap_deploy.app import ray_infer as ri
    from asap_deploy.app.infer import Choice, open_engine

    eng, _ = open_engine(Choice("onnxruntime", "test"), Source(bundle=bundle_dir), cpu_threads=1)
    assert eng.describe()["intra_op_threads"] == 1
    labels = np.ones((1, 16, 16), np.uint8)
    assert eng.run(labels).shape == (1, 16, 16, 3)
    seen = {}
    monkeypatch.setattr("asap_deploy.app.infer.open_engine",
                        lambda choice, source, precision, cpu_threads=None: (seen.setdefault("threads", cpu_threads),
                                                                             None))
    ri._Translator(Source(bundle=bundle_dir), InferOptions(), "onnxruntime", Choice("onnxruntime", "test"), 3)
    assert seen["threads"] == 3


def test_ray_skip_existing(ray_local, bundle_dir, tmp_path):
    """Issue 14, item 4 on Ray: finished outputs (asap's) are skipped and reported so; the rest written."""
    (tmp_path / "in").mkdir()
    for name, v in (("a", 1), ("b", 2)):
        Image.fromarray(np.full((16, 16), v, np.uint8)).save(tmp_path / "in" / f"{name}.png")
    opts = InferOptions(out_dir=tmp_path / "o", skip_existing=True)
    infer([str(tmp_path / "in" / "a.png")], Source(bundle=bundle_dir), opts, "onnxruntime")
    s = ray_infer([str(tmp_path / "in")], Source(bundle=bundle_dir), opts, "onnxruntime", RayOptions(actors=1))
    assert [r.input.name for r in s.skipped_files] == ["a.png"] and [r.input.name for r in s.written] == ["b.png"]
    assert not s.failed and (tmp_path / "o" / "b.png").is_file()
    with pytest.raises(UsageError, match="--skip-existing"):
        ray_infer([str(tmp_path / "in")], Source(bundle=bundle_dir), InferOptions(out_dir=tmp_path / "p",
                  skip_existing=True, overwrite=True), "onnxruntime", RayOptions(actors=1))
