"""Outputs: unwritable folders, a disk that fills up mid-write, existing outputs (no silent
overwrite without --overwrite), and Ctrl-C (SIGINT) during export, infer and train.

Interrupts are deterministic: the command runs in a fresh interpreter with a hook that sends
SIGINT to its own process at a fixed point of the work (2nd graph of an export, half-way through
writing the 2nd PNG, between the G and D updates of training step 3). The disk filling up is a
real one for the process: RLIMIT_FSIZE makes the kernel refuse writes past a size (EFBIG)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from asap_deploy.errors import InputError, OutputError
from asap_deploy.io import MARKER

from .conftest import ROOT, label_maps, py_cli, run_cli, save_png

OUT = OutputError.exit_code
TRAIN_ARGS = ["--steps", "5", "--save-every", "2", "--batch-size", "2", "--ndf", "8", "--num-d", "1", "--threads", "1",
              "--set", "lr_width=8", "--set", "lr_max_width=8", "--set", "lr_depth=1", "--set", "hr_width=8"]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def _run(argv, hook: str = "", fsize: int | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    def limit():
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(py_cli(hook) + [str(a) for a in argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, preexec_fn=limit)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from asap_deploy.synthetic_dataset import make_dataset

    return make_dataset(tmp_path_factory.mktemp("d") / "data", 4, 2, 32, 3, 0) and \
        tmp_path_factory.getbasetemp() / "d0" / "data"


# ---- unwritable folders ------------------------------------------------------------------------------
def test_unwritable_output_folder_for_every_writing_command(tmp_path, checkpoint, good_map, dataset):
    """A path under a regular file cannot be created, even by root (chmod tricks do not stop root)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    bad = blocker / "sub"
    run_cli(["export", checkpoint, "-o", bad], OUT, names=(str(bad),), says=("cannot create the bundle folder",))
    run_cli(["make-data", bad, "--n", "2", "--size", "32"], OUT, names=(str(bad),))
    run_cli(["infer", good_map, "--model", checkpoint, "-o", bad], OUT, names=(str(bad),))
    run_cli(["train", "--data", dataset, "--out", bad, *TRAIN_ARGS], OUT, names=(str(bad),))
    run_cli(["compile-kernels", "-o", bad, "--arch", "sm_80"], None)  # needs Triton: only checked where it runs
    assert blocker.read_text() == "x" and not list(tmp_path.glob(".*"))


# ---- the disk filling up mid-write ----------------------------------------------------------------------
def test_disk_full_mid_write_leaves_nothing(tmp_path, checkpoint, good_map, dataset):
    # export: predictor.onnx (~75 KB) cannot be written past 20 KB
    r = _run(["export", checkpoint, "-o", tmp_path / "b", "--no-fp16"], fsize=20_000)
    assert r.returncode == OUT and "cannot write the bundle" in " ".join(r.stderr.split()) and "Traceback" not in r.stderr
    assert _files(tmp_path) == []
    # infer: 64x64 outputs of a few KB each, limit 1 KB
    labels, _ = label_maps(2, 64, 64, seed=9)
    ins = [save_png(tmp_path / "in" / f"{i}.png", labels[i]) for i in range(2)]
    r = _run(["infer", *ins, "--model", checkpoint, "-o", tmp_path / "o"], fsize=1_000)
    text = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == InputError.exit_code and "cannot write" in text and "2 of 2" in text, text
    assert _files(tmp_path / "o") == []
    # train: model.pt / train_state.pt through torch.save (RuntimeError inside torch, typed here)
    r = _run(["train", "--data", dataset, "--out", tmp_path / "run", *TRAIN_ARGS], fsize=30_000)
    assert r.returncode == OUT and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "cannot write" in " ".join(r.stderr.split())
    assert not [f for f in _files(tmp_path / "run") if Path(f).name.startswith(".") and Path(f).name != MARKER]


# ---- existing outputs ----------------------------------------------------------------------------------
def test_no_silent_overwrite(tmp_path, checkpoint, good_map, bundle_dir):
    # infer: an existing output fails that input only; --overwrite replaces it
    out = tmp_path / "o"
    out.mkdir()
    (out / "good.png").write_bytes(b"mine")
    run_cli(["infer", good_map, "--model", checkpoint, "-o", out], InputError.exit_code, names=("good.png",),
            says=("already exists; pass --skip-existing", "--overwrite to replace it"))
    assert (out / "good.png").read_bytes() == b"mine"
    # --overwrite replaces only a PNG asap wrote (tests/robustness/test_ownership.py): not the user's file
    run_cli(["infer", good_map, "--model", checkpoint, "-o", out, "--overwrite"], InputError.exit_code,
            names=("good.png",), says=("not written by asap",))
    assert (out / "good.png").read_bytes() == b"mine"
    (out / "good.png").unlink()
    run_cli(["infer", good_map, "--model", checkpoint, "-o", out], 0)
    first = (out / "good.png").read_bytes()
    os.utime(out / "good.png", (0, 0))
    run_cli(["infer", good_map, "--model", checkpoint, "-o", out, "--overwrite"], 0)
    assert np.array(Image.open(out / "good.png")).shape == (16, 16, 3)
    assert (out / "good.png").read_bytes() == first and (out / "good.png").stat().st_mtime > 0  # rewritten
    # make-data
    d = tmp_path / "data"
    run_cli(["make-data", d, "--n", "3", "--size", "32"], 0)
    run_cli(["make-data", d, "--n", "2", "--size", "32"], OUT, names=(str(d),), says=("--overwrite",))
    run_cli(["make-data", d, "--n", "2", "--size", "32", "--overwrite"], 0)
    assert len(list((d / "train_label").iterdir())) == 2  # no leftovers of the 3-pair set
    # bench reports: refused before measuring anything
    rep = tmp_path / "bench"
    rep.mkdir()
    (rep / "report.json").write_text("{}")
    run_cli(["bench", "-o", rep, "--bundle", bundle_dir], OUT, names=("report.json",), says=("--overwrite",))
    # compile-kernels: a folder with an index.json (refused before Triton is imported)
    k = tmp_path / "kernels"
    k.mkdir()
    (k / "index.json").write_text("{}")
    run_cli(["compile-kernels", "-o", k, "--arch", "sm_80"], OUT, names=("index.json",), says=("--overwrite",))
    # build-engine: an existing engine (refused before TensorRT is imported or anything is built)
    import shutil

    b = Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))
    (b / "asap.fp32.rtx.engine").write_bytes(b"old")
    run_cli(["build-engine", b, "--flavor", "rtx", "--stage", "end-to-end"], OUT, names=("asap.fp32.rtx.engine",),
            says=("--overwrite",))
    assert (b / "asap.fp32.rtx.engine").read_bytes() == b"old"
    # export and train refuse too (tests/test_export_bundle.py::test_overwrite_rules,
    # tests/test_train.py::test_run_writes_loadable_outputs_and_refuses_to_clobber)


# ---- Ctrl-C ----------------------------------------------------------------------------------------------
_SIGINT_SELF = "import os, signal\ndef _interrupt(): os.kill(os.getpid(), signal.SIGINT)\n"


def test_sigint_during_export_leaves_nothing(tmp_path, checkpoint):
    hook = _SIGINT_SELF + (
        "import asap_deploy.export.graphs as g\n_real, _n = g.build_graph, [0]\n"
        "def build(*a, **k):\n    _n[0] += 1\n    if _n[0] == 2: _interrupt()\n    return _real(*a, **k)\n"
        "g.build_graph = build\n")
    r = _run(["export", checkpoint, "-o", tmp_path / "b"], hook)
    assert r.returncode == 130 and "interrupted" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert _files(tmp_path) == []


def test_sigint_during_make_data_leaves_nothing_and_keeps_the_old_set(tmp_path):
    hook = _SIGINT_SELF + (
        "import asap_deploy.synthetic_dataset as syn\n_real, _n = syn.write_png, [0]\n"
        "def wp(*a, **k):\n    _n[0] += 1\n    if _n[0] == 3: _interrupt()\n    return _real(*a, **k)\n"
        "syn.write_png = wp\n")
    r = _run(["make-data", tmp_path / "d", "--n", "4", "--size", "32"], hook)
    assert r.returncode == 130 and "interrupted" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert _files(tmp_path) == []
    assert _run(["make-data", tmp_path / "d", "--n", "2", "--size", "32"]).returncode == 0
    before = {p: (tmp_path / "d" / p).read_bytes() for p in _files(tmp_path / "d") if p.endswith((".png", ".json"))}
    r = _run(["make-data", tmp_path / "d", "--n", "4", "--size", "32", "--seed", "1", "--overwrite"], hook)
    assert r.returncode == 130
    assert {p: (tmp_path / "d" / p).read_bytes() for p in before} == before  # the old set, whole
    assert [p for p in _files(tmp_path) if p.split("/")[-1].startswith(".") and not p.endswith(MARKER)] == []


def test_make_data_overwrite_never_replaces_a_folder_of_other_files(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep")
    run_cli(["make-data", tmp_path / "mine", "--n", "2", "--size", "32", "--overwrite"], OUT,
            names=(str(tmp_path / "mine"),), says=("asap did not write",))
    assert _files(tmp_path / "mine") == ["thesis.tex"]
    # a dataset.json of the user's own is no proof that asap wrote the folder
    (tmp_path / "mine" / "dataset.json").write_text("{}")
    run_cli(["make-data", tmp_path / "mine", "--n", "2", "--size", "32", "--overwrite"], OUT,
            names=(str(tmp_path / "mine"),), says=("asap did not write",))
    assert _files(tmp_path / "mine") == ["dataset.json", "thesis.tex"]
    # an earlier set of ours into which the user put a file of their own: refused, all kept
    run_cli(["make-data", tmp_path / "set", "--n", "2", "--size", "32"], 0)
    (tmp_path / "set" / "train_label" / "notes.txt").write_text("keep")
    before = {f: (tmp_path / "set" / f).read_bytes() for f in _files(tmp_path / "set") if "." in f}
    run_cli(["make-data", tmp_path / "set", "--n", "3", "--size", "32", "--overwrite"], OUT,
            names=("train_label/notes.txt",), says=("asap did not write",))
    assert {f: (tmp_path / "set" / f).read_bytes() for f in before} == before


def test_sigint_mid_png_write_leaves_only_whole_files(tmp_path, checkpoint):
    labels, _ = label_maps(3, 32, 32, seed=4)
    ins = [save_png(tmp_path / "in" / f"{i}.png", labels[i]) for i in range(3)]
    hook = _SIGINT_SELF + (
        "import pathlib\n_real, _n = pathlib.Path.write_bytes, [0]\n"
        "def wb(self, data):\n    _n[0] += 1\n    if _n[0] == 2:\n"
        "        _real(self, data[:len(data) // 2])\n        _interrupt()\n    return _real(self, data)\n"
        "pathlib.Path.write_bytes = wb\n")
    r = _run(["infer", *ins, "--model", checkpoint, "-o", tmp_path / "o", "--batch", "1"], hook)
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert _files(tmp_path / "o") == ["0.png"]
    assert np.array(Image.open(tmp_path / "o" / "0.png")).shape == (32, 32, 3)


def test_sigint_mid_training_step_resumes_to_the_uninterrupted_state(tmp_path, dataset):
    """SIGINT arrives between the G and D updates of step 3: the step finishes, the run saves at
    step 3 (never half a step) and exits 130; --resume then reaches exactly the weights of a run
    that was never interrupted."""
    hook = _SIGINT_SELF + (
        "import asap_deploy.train.trainer as t\n_real, _n = t.hinge_d_parts, [0]\n"
        "def parts(*a, **k):\n    _n[0] += 1\n    if _n[0] == 3: _interrupt()\n    return _real(*a, **k)\n"
        "t.hinge_d_parts = parts\n")
    r = _run(["train", "--data", dataset, "--out", tmp_path / "cut", *TRAIN_ARGS], hook)
    assert r.returncode == 130, r.stderr[-3000:]
    from asap_deploy.train.trainer import read_train_state

    assert read_train_state(tmp_path / "cut" / "train_state.pt")["step"] == 3
    assert not [f for f in _files(tmp_path / "cut") if Path(f).name.startswith(".") and Path(f).name != MARKER]
    r = _run(["train", "--data", dataset, "--out", tmp_path / "cut", "--resume", "--steps", "5", "--threads", "1"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(["train", "--data", dataset, "--out", tmp_path / "full", *TRAIN_ARGS])
    assert r.returncode == 0, r.stderr[-3000:]
    a = read_train_state(tmp_path / "full" / "train_state.pt")
    b = read_train_state(tmp_path / "cut" / "train_state.pt")
    assert a["step"] == b["step"] == 5
    for part in ("G", "D"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"junk")
    r = _run(["inspect", bad])
    assert r.returncode == 4 and "Traceback" not in r.stderr and "junk.pt" in r.stderr
    r = _run(["--debug", "inspect", bad])
    assert r.returncode != 0 and "Traceback" in r.stderr and "CheckpointError" in r.stderr


def test_interrupt_right_after_the_temp_file_is_created_leaves_nothing(tmp_path, monkeypatch):
    import asap_deploy.io as io

    real_close = os.close

    def close_then_interrupt(fd):  # SIGTERM landing on the first bytecode after the file exists
        real_close(fd)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(io.os, "close", close_then_interrupt)
        try:
            with io.atomic_path(tmp_path / "out.png"):
                pass
        finally:
            monkeypatch.undo()
    assert _files(tmp_path) == []


def test_interrupt_between_the_two_renames_of_a_folder_swap_keeps_the_old_folder(tmp_path, monkeypatch):
    """Replacing a bundle/report/data set moves the old folder aside, then renames the new one in:
    Ctrl-C between the two renames must not leave the target missing."""
    import asap_deploy.io as io

    with io.staged_dir(tmp_path / "b", "bundle") as tmp:  # an earlier bundle of ours
        (tmp / "manifest.json").write_text("old")
    real = os.replace

    def replace(src, dst):
        if Path(dst) == tmp_path / "b" and ".partial" in Path(src).name:
            raise KeyboardInterrupt  # after the old folder moved aside, before the new one is in
        return real(src, dst)

    with pytest.raises(KeyboardInterrupt):
        with io.staged_dir(tmp_path / "b", "bundle") as tmp:
            (tmp / "manifest.json").write_text("new")
            monkeypatch.setattr(io.os, "replace", replace)
    monkeypatch.undo()
    assert _files(tmp_path) == ["b", f"b/{MARKER}", "b/manifest.json"]
    assert (tmp_path / "b" / "manifest.json").read_text() == "old"


@pytest.mark.parametrize("enter,fill", [
    ("atomic_path(OUT)", "tmp.write_bytes(b'half')"),
    ("staged_dir(OUT, 'bundle')", "(tmp / 'predictor.onnx').write_bytes(b'half')"),
])
def test_interrupt_that_skips_the_write_blocks_cleanup_still_removes_the_temp_file(tmp_path, enter, fill):
    # An interrupt can land inside contextlib's own code, so the block's finally never runs.
    # Model that: enter the block, write half an output, raise, and leave the interpreter without
    # the generator ever being finalised (an exit hook registered first runs last and calls os._exit).
    code = ("import atexit, os; atexit.register(os._exit, 1)\n"
            f"from asap_deploy.io import atomic_path, staged_dir; OUT = {str(tmp_path / 'out.png')!r}\n"
            f"cm = {enter}; tmp = cm.__enter__(); {fill}\n"
            "print(tmp.name, flush=True); raise KeyboardInterrupt\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 1 and "KeyboardInterrupt" in proc.stderr, proc.stderr
    assert proc.stdout.strip().startswith(".out.png.")  # the temp path existed while the block was open
    assert _files(tmp_path) == []
