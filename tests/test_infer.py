"""`asap infer`: inputs, palettes, padding/cropping, batching, backends, bad inputs, atomic output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from asap_deploy.cli import app
from asap_deploy.config import ModelConfig
from asap_deploy.engines import create_engine
from asap_deploy.errors import InputError, OutputError, UsageError
from asap_deploy.export.bundle import export_model, load_bundle
from asap_deploy.random_model import random_generator, random_label_maps
from asap_deploy.app.infer import InferOptions, Source, choose_backend, discover_inputs, infer, pad_to_multiple
from asap_deploy.palette import bundle_palette

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
CFG = ModelConfig(label_nc=5, contain_dontcare_label=True, crop_size=128, learned_ds_factor=8, lr_width=8,
                  lr_max_width=8, lr_depth=1, hr_width=16)  # S=8
CFG_INST = CFG.replace(instance_edges=True, contain_dontcare_label=False)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return export_model(random_generator(CFG, 3), tmp_path_factory.mktemp("i") / "b", fp16=False).path


@pytest.fixture(scope="module")
def engine(bundle_dir):
    return create_engine("onnxruntime", load_bundle(bundle_dir))


def save(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


def read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im)


def reflect_pad_oracle(a: np.ndarray, H: int, W: int) -> np.ndarray:  # noqa: N803
    """Reflect (edge not repeated) written as index arithmetic."""
    def idx(i, n):
        period = 2 * (n - 1)
        i = i % period
        return i if i < n else period - i
    h, w = a.shape
    return np.array([[a[idx(y, h), idx(x, w)] for x in range(W)] for y in range(H)], a.dtype)


def test_pad_to_multiple_is_reflect_at_bottom_right():
    rng = np.random.default_rng(0)
    for h, w in [(5, 7), (8, 8), (9, 3), (2, 13)]:
        a = rng.integers(0, 9, (h, w)).astype(np.uint8)
        p = pad_to_multiple(a, 8)
        assert p.shape == (-(-h // 8) * 8, -(-w // 8) * 8)
        assert np.array_equal(p, reflect_pad_oracle(a, *p.shape))


def test_outputs_cropped_back_and_equal_to_padded_run(tmp_path, bundle_dir, engine):
    labels, _ = random_label_maps(CFG, 2, 21, 30, seed=2)
    save(tmp_path / "in" / "m0.png", labels[0])
    save(tmp_path / "in" / "m1.png", labels[1])
    r = runner.invoke(app, ["infer", str(tmp_path / "in"), "--bundle", str(bundle_dir), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "padded 30x21 -> 32x24" in r.output and "images/s" in r.output and "onnxruntime" in r.output
    for i in range(2):
        out = read(tmp_path / "out" / f"m{i}.png")
        assert out.shape == (21, 30, 3)
        want = engine.run(reflect_pad_oracle(labels[i], 24, 32)[None])[0, :21, :30]
        assert np.array_equal(out, want)


def test_id_colour_and_palette_png_inputs_agree(tmp_path, bundle_dir):
    labels, _ = random_label_maps(CFG, 1, 24, 16, seed=7)
    lab = labels[0]
    pal = bundle_palette(CFG)
    save(tmp_path / "in" / "ids.png", lab)
    save(tmp_path / "in" / "colour.png", pal.colourise(lab))
    # a palette PNG whose colours are arbitrary: its indices are the ids
    p = Image.fromarray(lab, "P")
    rng = np.random.default_rng(0)
    p.putpalette(rng.integers(0, 256, 768).astype(np.uint8).tolist())
    p.save(tmp_path / "in" / "indexed.png")
    r = runner.invoke(app, ["infer", str(tmp_path / "in" / "*.png"), "--bundle", str(bundle_dir), "-o",
                            str(tmp_path / "out"), "--backend", "torch", "--batch", "1"])
    # --batch 1: every map runs alone (torch's CPU convolutions may round differently per batch size)
    assert r.exit_code == 0, r.output
    outs = [read(tmp_path / "out" / f"{n}.png") for n in ("ids", "colour", "indexed")]
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


def test_batching_does_not_change_results(tmp_path, bundle_dir):
    labels, _ = random_label_maps(CFG, 5, 16, 24, seed=3)
    paths = [save(tmp_path / "in" / f"{i}.png", labels[i]) for i in range(5)]
    src = Source(bundle=bundle_dir)
    a = infer(paths, src, InferOptions(out_dir=tmp_path / "a", batch_size=1), "onnxruntime")
    b = infer(paths, src, InferOptions(out_dir=tmp_path / "b", batch_size=4), "onnxruntime")
    assert len(a.written) == len(b.written) == 5 and a.backend == "onnxruntime"
    for i in range(5):
        assert np.array_equal(read(tmp_path / "a" / f"{i}.png"), read(tmp_path / "b" / f"{i}.png"))


def test_side_by_side_and_scale(tmp_path, bundle_dir):
    labels, _ = random_label_maps(CFG, 1, 16, 20, seed=4)
    save(tmp_path / "in" / "a.png", labels[0])
    base = ["infer", str(tmp_path / "in" / "a.png"), "--bundle", str(bundle_dir)]
    assert runner.invoke(app, base + ["-o", str(tmp_path / "plain")]).exit_code == 0
    r = runner.invoke(app, base + ["-o", str(tmp_path / "k1"), "--scale", "1"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "plain" / "a.png").read_bytes() == (tmp_path / "k1" / "a.png").read_bytes()
    r = runner.invoke(app, base + ["-o", str(tmp_path / "k"), "--scale", "2.5", "--side-by-side"])
    assert r.exit_code == 0, r.output
    out = read(tmp_path / "k" / "a.png")
    assert out.shape == (40, 100, 3)  # (label | image), each 50x40
    left = bundle_palette(CFG).colourise(labels[0].repeat(5, 0).repeat(5, 1)[::2, ::2])
    assert np.array_equal(out[:, :50], left)


def _bad_inputs(tmp, bundle_dir):
    labels, _ = random_label_maps(CFG, 3, 16, 16, seed=5)
    save(tmp / "in" / "a_good.png", labels[0])
    (tmp / "in" / "b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    rgb = bundle_palette(CFG).colourise(labels[1])
    rgb[3, 5] = (1, 2, 3)
    save(tmp / "in" / "c_colour.png", rgb)
    oor = labels[2].copy()
    oor[0, 0] = 7
    save(tmp / "in" / "d_range.png", oor)
    data = (tmp / "in" / "a_good.png").read_bytes()
    (tmp / "in" / "e_truncated.png").write_bytes(data[: len(data) // 2])
    save(tmp / "in" / "f_good.png", labels[2])
    return labels


def test_bad_inputs_named_others_processed(tmp_path, bundle_dir):
    _bad_inputs(tmp_path, bundle_dir)
    r = runner.invoke(app, ["infer", str(tmp_path / "in"), str(tmp_path / "missing.png"), "--bundle", str(bundle_dir),
                            "-o", str(tmp_path / "out")])
    assert r.exit_code == InputError.exit_code, r.output
    text = " ".join(r.output.split())
    for name, why in [("b_corrupt.png", "cannot read the image"), ("c_colour.png", "not in the bundle palette: [1, 2, 3]"),
                      ("d_range.png", "label id 7 at x=0, y=0 is out of range"), ("e_truncated.png", "cannot decode"),
                      ("missing.png", "no such file")]:
        assert name in text and why in text, (name, text)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_good.png", "f_good.png"]
    assert "5 of 7 input(s) failed" in text


def test_fail_fast_stops(tmp_path, bundle_dir):
    _bad_inputs(tmp_path, bundle_dir)
    r = runner.invoke(app, ["infer", str(tmp_path / "in"), "--bundle", str(bundle_dir), "-o", str(tmp_path / "out"),
                            "--fail-fast", "--batch", "1"])
    assert r.exit_code == InputError.exit_code
    assert "--fail-fast" in r.output
    assert not (tmp_path / "out" / "f_good.png").exists()


def test_instance_maps_matched_by_name(tmp_path):
    b = export_model(random_generator(CFG_INST, 1), tmp_path / "bi", fp16=False).path
    labels, inst = random_label_maps(CFG_INST, 2, 16, 24, seed=1)
    save(tmp_path / "in" / "x_labelIds.png", labels[0])
    save(tmp_path / "in" / "y.png", labels[1])
    save(tmp_path / "inst" / "x_instanceIds.png", inst[0].astype(np.uint16))
    save(tmp_path / "inst" / "y.png", inst[1][:8].astype(np.uint16))  # wrong size
    args = ["infer", str(tmp_path / "in"), "--bundle", str(b), "-o", str(tmp_path / "out")]
    r = runner.invoke(app, args)
    assert r.exit_code == InputError.exit_code and "instance maps" in r.output  # none given
    r = runner.invoke(app, args + ["--instances", str(tmp_path / "inst")])
    text = " ".join(r.output.split())
    assert r.exit_code == InputError.exit_code and "y.png: its instance map" in text and "is 24x8" in text
    eng = create_engine("onnxruntime", load_bundle(b))
    assert np.array_equal(read(tmp_path / "out" / "x_labelIds.png"), eng.run(labels[:1], inst[:1])[0])


def test_threads_option_reaches_the_engine(tmp_path, bundle_dir, monkeypatch):
    import asap_deploy.app.infer as inf

    labels, _ = random_label_maps(CFG, 1, 16, 16)
    src = save(tmp_path / "a.png", labels[0])
    r = runner.invoke(app, ["infer", str(src), "--bundle", str(bundle_dir), "--threads", "0", "-o", str(tmp_path / "o")])
    assert r.exit_code == UsageError.exit_code and "--threads must be in 1.." in r.output
    opened = []
    real = inf.open_engine

    def spy(choice, source, precision="fp32", cpu_threads=None):
        engine, bundle = real(choice, source, precision, cpu_threads)
        opened.append(engine.describe().get("intra_op_threads"))
        return engine, bundle

    monkeypatch.setattr(inf, "open_engine", spy)
    r = runner.invoke(app, ["infer", str(src), "--bundle", str(bundle_dir), "--backend", "onnxruntime", "--threads", "1",
                            "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert opened == [1] and (tmp_path / "o" / "a.png").is_file()


def test_unwritable_output_and_usage_errors(tmp_path, bundle_dir):
    labels, _ = random_label_maps(CFG, 1, 16, 16)
    src = save(tmp_path / "a.png", labels[0])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        r = runner.invoke(app, ["infer", str(src), "--bundle", str(bundle_dir), "-o", str(out)])
        assert r.exit_code == OutputError.exit_code, r.output
        assert str(out) in "".join(r.output.split())  # the message names the folder (rich may wrap it)
    r = runner.invoke(app, ["infer", str(src), "--bundle", str(bundle_dir), "--backend", "onnxrt"])
    assert r.exit_code == UsageError.exit_code and "did you mean 'onnxruntime'" in r.output
    r = runner.invoke(app, ["infer", str(src), "--bundle", str(bundle_dir), "--model", str(src)])
    assert r.exit_code == UsageError.exit_code and "exactly one of" in r.output
    r = runner.invoke(app, ["infer", str(src), "--bundle", str(bundle_dir), "--scale", "0.5"])
    assert r.exit_code == UsageError.exit_code


def test_auto_backend_says_why(bundle_dir):
    """On any machine: the bundle has no engine, so auto never picks TensorRT and says so first."""
    c = choose_backend("auto", Source(bundle=bundle_dir))
    assert c.backend in ("onnxruntime-cuda", "onnxruntime"), c
    assert c.skipped[0].startswith(f"tensorrt: no fp32 engine in {bundle_dir}"), c.skipped
    assert choose_backend("auto", Source(model=Path("m.pt"))).backend == "torch"


@pytest.mark.parametrize("trt_ok,providers,ov_ok,torch_ok,want,skipped", [
    (True, ["CUDAExecutionProvider", "CPUExecutionProvider"], True, True, "tensorrt", []),
    (False, ["CUDAExecutionProvider", "CPUExecutionProvider"], True, True, "onnxruntime-cuda",
     ["tensorrt: WHY", "torch CUDA: NO GPU"]),
    (False, ["CPUExecutionProvider"], True, True, "onnxruntime", ["tensorrt: WHY", "torch CUDA: NO GPU",
                                                                  "onnxruntime CUDA: CUDAExecutionProvider"]),
    (False, [], True, True, "openvino", ["tensorrt: WHY", "torch CUDA: NO GPU", "onnxruntime CUDA: CUDAExecutionProvider",
                                         "onnxruntime: not installed"]),
    (False, [], False, True, "torch", ["tensorrt: WHY", "torch CUDA: NO GPU", "onnxruntime CUDA: CUDAExecutionProvider",
                                       "onnxruntime: not installed", "openvino: not installed"]),
    (False, [], False, False, None, ["tensorrt: WHY", "torch CUDA: NO GPU", "onnxruntime CUDA: CUDAExecutionProvider",
                                     "onnxruntime: not installed", "openvino: not installed",
                                     "torch: PyTorch is not installed"]),
])
def test_auto_backend_order_and_reasons(bundle_dir, monkeypatch, trt_ok, providers, ov_ok, torch_ok, want, skipped):
    """Each machine auto can meet: the backend it picks and, in order, what it skipped and why."""
    inf = sys.modules[choose_backend.__module__]
    monkeypatch.setattr(inf, "tensorrt_usable", lambda b, p: (trt_ok, "OK" if trt_ok else "WHY"))
    monkeypatch.setattr(inf, "_ort_providers", lambda: list(providers))
    monkeypatch.setattr(inf, "_openvino_installed", lambda: ov_ok)
    monkeypatch.setattr(inf, "torch_cuda_runtime", lambda: (False, "NO GPU"))  # (a GPU: tests/test_torch_cuda.py)
    monkeypatch.setattr(inf, "_torch_ok", lambda: (torch_ok, "" if torch_ok else "PyTorch is not installed (pip ...)"))
    if want is None:
        with pytest.raises(UsageError, match="no backend can run this bundle") as ei:
            choose_backend("auto", Source(bundle=bundle_dir))
        got = ei.value.message.split(": ", 1)[1].split("; ")
    else:
        c = choose_backend("auto", Source(bundle=bundle_dir))
        assert c.backend == want and c.reason, c
        got = c.skipped
    assert len(got) == len(skipped) and all(g.startswith(s) for g, s in zip(got, skipped)), got
    scaled = choose_backend("auto", Source(bundle=bundle_dir), scale=2.0) if want else None
    if scaled is not None:  # --scale: TensorRT is skipped for that reason, even where it is usable
        assert scaled.backend != "tensorrt"
        assert scaled.skipped[0] == "tensorrt: --scale runs on torch/onnxruntime/openvino only"


def test_discover_inputs(tmp_path):
    for n in ("b.png", "a.png", ".hidden.png", "c.txt"):
        (tmp_path / n).write_bytes(b"")
    paths, problems = discover_inputs([tmp_path, str(tmp_path / "a.png"), str(tmp_path / "*.txt"), "nope/*.png"])
    assert [p.name for p in paths] == ["a.png", "b.png", "c.txt"]
    assert problems == [("nope/*.png", "nope/*.png: the pattern matches no file")]


def test_failed_write_leaves_no_partial_png(tmp_path, bundle_dir, monkeypatch):
    """A run failing mid-way (the second rename fails): the first PNG is whole, no temp files remain."""
    labels, _ = random_label_maps(CFG, 3, 16, 16, seed=8)
    paths = [save(tmp_path / "in" / f"{i}.png", labels[i]) for i in range(3)]
    import asap_deploy.io as io_mod

    real, calls = os.replace, []

    def flaky(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(io_mod.os, "replace", flaky)
    s = infer(paths, Source(bundle=bundle_dir), InferOptions(out_dir=tmp_path / "out"), "onnxruntime")
    monkeypatch.undo()
    assert [r.ok for r in s.results] == [True, False, True]
    assert "No space left on device" in s.results[1].error and "1.png" in s.results[1].error
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.png", "2.png"]
    for p in (tmp_path / "out").iterdir():
        assert read(p).shape == (16, 16, 3)


def test_stale_temps_removed_only_ours(tmp_path):
    from asap_deploy.io import remove_stale_temps, temp_name

    ours = temp_name(tmp_path / "a.png", suffix=".png")
    ours.write_bytes(b"partial")
    keep = [".a.png.x1y2.png", ".b.png.zz.png", ".a.png.asaptmp-zzzzzzzzzzzz.png", "a.png"]
    for name in keep:  # a user's files that merely look like temp names are never deleted
        (tmp_path / name).write_bytes(b"user")
    remove_stale_temps(tmp_path / "a.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
    long = tmp_path / ("é" * 125 + "a.png")  # 255 bytes: its temp name is shortened, and still found
    stale = temp_name(long, suffix=".png")
    stale.write_bytes(b"partial")
    remove_stale_temps(long)
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_sigterm_mid_run_leaves_only_whole_pngs(tmp_path, bundle_dir):
    labels, _ = random_label_maps(CFG, 1, 256, 256, seed=1)
    for i in range(40):
        save(tmp_path / "in" / f"{i:02d}.png", labels[0])
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "infer", str(tmp_path / "in"), "--bundle",
                             str(bundle_dir), "-o", str(tmp_path / "out"), "--batch", "1", "--backend", "torch"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / "out").is_dir() and any((tmp_path / "out").glob("*.png")):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    assert proc.returncode in (0, 130), proc.stderr.read().decode()[-2000:]
    left = sorted((tmp_path / "out").iterdir()) if (tmp_path / "out").is_dir() else []
    assert not [p for p in left if p.name.startswith(".")], left
    for p in left:
        assert read(p).shape == (256, 256, 3)


def test_onnxruntime_without_torch(tmp_path, bundle_dir, engine):
    """`asap infer --backend onnxruntime` (and --scale) in a process where torch cannot be imported."""
    labels, _ = random_label_maps(CFG, 1, 20, 24, seed=6)
    src = save(tmp_path / "a.png", labels[0])
    code = ("import sys; sys.modules['torch'] = None\n"
            "sys.argv = ['asap'] + sys.argv[1:]\n"
            "from asap_deploy.cli import app\n"
            "app()\n")
    for extra in ([], ["--scale", "2"]):
        out = tmp_path / ("scaled" if extra else "plain")
        res = subprocess.run([sys.executable, "-c", code, "infer", str(src), "--bundle", str(bundle_dir), "--backend",
                              "onnxruntime", "-o", str(out)] + extra, capture_output=True, text=True, cwd=ROOT)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "torch" not in res.stderr
    want = engine.run(pad_to_multiple(labels[0], 8)[None])[0, :20, :24]
    assert np.array_equal(read(tmp_path / "plain" / "a.png"), want)
    assert read(tmp_path / "scaled" / "a.png").shape == (40, 48, 3)


def test_model_checkpoint_runs_on_torch(tmp_path, bundle_dir):
    import torch

    from asap_deploy.checkpoints import save_generator

    model = random_generator(CFG, 3)
    save_generator(model, tmp_path / "m.pt")
    labels, _ = random_label_maps(CFG, 1, 16, 16, seed=2)
    src = save(tmp_path / "a.png", labels[0])
    r = runner.invoke(app, ["infer", str(src), "--model", str(tmp_path / "m.pt"), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "backend: torch" in r.output and "checkpoint" in r.output
    with torch.inference_mode():
        want = model(torch.from_numpy(labels)).permute(0, 2, 3, 1).numpy()
    from asap_deploy.io import to_uint8

    assert np.array_equal(read(tmp_path / "out" / "a.png"), to_uint8(want)[0])
    r = runner.invoke(app, ["infer", str(src), "--model", str(tmp_path / "m.pt"), "--backend", "onnxruntime"])
    assert r.exit_code == UsageError.exit_code and "export a bundle first" in " ".join(r.output.split())
    r = runner.invoke(app, ["infer", str(src), "--engine", str(tmp_path / "nope.engine"), "-o", str(tmp_path / "o2")])
    assert r.exit_code == InputError.exit_code and "no such engine file" in " ".join(r.output.split())


def test_skip_existing_resumes_an_interrupted_folder_run(tmp_path, bundle_dir):
    """Issue 14, item 4: re-running a folder run keeps what asap finished (skipped, exit 0); a file
    of the same name that asap did not write still fails its input; --overwrite with it is refused."""
    labels, _ = random_label_maps(CFG, 4, 16, 16, seed=11)
    for i in range(4):
        save(tmp_path / "in" / f"m{i}.png", labels[i])
    out = tmp_path / "out"
    base = ["infer", str(tmp_path / "in"), "--bundle", str(bundle_dir), "-b", "onnxruntime", "-o", str(out)]
    r = runner.invoke(app, base)
    assert r.exit_code == 0, r.output
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "m2.png").unlink()  # the run was interrupted before m2 and m3
    (out / "m3.png").unlink()
    r = runner.invoke(app, base + ["--skip-existing", "--json"])
    assert r.exit_code == 0, r.output
    summary = __import__("json").loads(r.output)
    assert (summary["written"], summary["skipped_existing"], summary["failed"]) == (2, 2, 0)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # the same images, none redone twice
    r = runner.invoke(app, base + ["--skip-existing"])
    assert r.exit_code == 0, r.output
    assert "0 image(s) written" in r.output and "4 skipped, 0 failed" in " ".join(r.output.split())
    save(out / "m1.png", labels[1])  # not asap's: a label map of the same name
    res = infer([str(tmp_path / "in")], Source(bundle=bundle_dir), InferOptions(out_dir=out, skip_existing=True),
                "onnxruntime")
    assert [r.input.name for r in res.failed] == ["m1.png"] and len(res.skipped_files) == 3 and not res.written
    assert "not written by asap" in res.failed[0].error
    r = runner.invoke(app, base + ["--skip-existing", "--overwrite"])
    assert r.exit_code == 2 and "--skip-existing" in r.output


def test_run_that_writes_nothing_leaves_no_output_folder(tmp_path, bundle_dir):
    """Issue 14, item 4: a run in which no input succeeded removes the output folder it created
    (and never one that was there before)."""
    (tmp_path / "bad.png").write_bytes(b"not a png")
    out = tmp_path / "new" / "out"
    r = runner.invoke(app, ["infer", str(tmp_path / "bad.png"), "--bundle", str(bundle_dir), "-o", str(out)])
    assert r.exit_code == 5, r.output
    assert not (tmp_path / "new").exists()
    (tmp_path / "there").mkdir()
    r = runner.invoke(app, ["infer", str(tmp_path / "bad.png"), "--bundle", str(bundle_dir), "-o",
                            str(tmp_path / "there")])
    assert r.exit_code == 5 and (tmp_path / "there").is_dir()
