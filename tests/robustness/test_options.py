"""Issue 12: every numeric option and file argument is bounded, checked before any work.

Numeric options: NaN, infinities, negative, zero and huge values, and sizes such as 0x0, 1e9x1 or
100000x100000, fail with exit 2 and one `error:` line naming the option and its documented range
(asap_deploy/limits.py), before any output folder exists. Output sizes stay under --max-pixels.
File arguments must be regular files of bounded size (a FIFO or /dev/zero would block or never
end); globs and folder walks never follow a symlink loop and stop after a bounded number of entries.
Cases that hung before the fix run in a fresh interpreter under a timeout, so they fail, not hang.
"""

from __future__ import annotations

import glob
import os
import resource
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from asap_deploy.errors import CheckpointError, ConfigError, InputError, UsageError

from .conftest import ROOT, label_maps, py_cli, run_cli, save_png

USAGE = UsageError.exit_code
THREADS_MAX = 4 * (os.cpu_count() or 1)
SEED = "0..4294967295"


class Overtime(BaseException):
    """A case that ran past its time (raised from SIGALRM)."""


@pytest.fixture(autouse=True)
def bounded_test():
    """Before the fix some of these cases allocated hundreds of GiB or never ended: a regression must
    fail the test (MemoryError, Overtime) rather than take the machine or the run down."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    try:
        with open("/proc/self/statm") as f:
            vm = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        vm = None
    if vm is not None:
        cap = vm + (6 << 30)
        resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))

    def on_alarm(signum, frame):
        raise Overtime("the command did not stop within 60 s")  # not an Exception: no `except Exception` swallows it

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(60)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _fill(args, **where) -> list[str]:
    return [str(a).format(**where) for a in args]


def one_error_line(r, option: str, says: str, only: bool = True) -> None:
    """One `error:` line naming the option and holding `says` (with `only`: and nothing else, as
    nothing ran before the check)."""
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, r.output
    assert not only or len(lines) == 1, r.output
    assert option in errors[0] and says in errors[0], (option, says, r.output)


# (command and arguments, the option the message names, what it says); {out} must stay absent
NUMERIC = [
    # infer
    (["infer", "{map}", "--bundle", "{bundle}", "-o", "{out}", "--scale", "1e9"], "--scale", "1..1024"),
    (["infer", "{map}", "--bundle", "{bundle}", "-o", "{out}", "--scale", "inf"], "--scale", "1..1024"),
    (["infer", "{map}", "--bundle", "{bundle}", "-o", "{out}", "--scale", "nan"], "--scale", "1..1024"),
    (["infer", "{map}", "--bundle", "{bundle}", "-o", "{out}", "--scale", "-3"], "--scale", "1..1024"),
    (["infer", "{map}", "--bundle", "{bundle}", "-o", "{out}", "--scale", "1000", "--max-pixels", "100000"],
     "--max-pixels", "1x1 label map"),
    (["infer", "{map}", "--bundle", "{bundle}", "-o", "{out}", "--batch", "100000"], "--batch", "1..256"),
    (["infer", "{map}", "--bundle", "{bundle}", "-o", "{out}", "--batch", "-1"], "--batch", "1..256"),
    (["infer", "{map}", "--bundle", "{bundle}", "-o", "{out}", "--max-pixels", "0"], "--max-pixels", "1..1073741824"),
    (["infer", "{map}", "--bundle", "{bundle}", "-o", "{out}", "--max-pixels", str(2**40)], "--max-pixels",
     "1..1073741824"),
    (["infer", "{map}", "--bundle", "{bundle}", "-o", "{out}", "--ray-actors", "0"], "--ray-actors", "1..1024"),
    (["infer", "{map}", "--bundle", "{bundle}", "-o", "{out}", "--ray-actors", "100000"], "--ray-actors", "1..1024"),
    # bench
    (["bench", "--bundle", "{bundle}", "-o", "{out}", "--duration", "inf"], "--duration", "0..600 s"),
    (["bench", "--bundle", "{bundle}", "-o", "{out}", "--duration", "nan"], "--duration", "0..600 s"),
    (["bench", "--bundle", "{bundle}", "-o", "{out}", "--duration", "1e9"], "--duration", "0..600 s"),
    (["bench", "--bundle", "{bundle}", "-o", "{out}", "--warmup", "inf"], "--warmup", "0..60 s"),
    (["bench", "--bundle", "{bundle}", "-o", "{out}", "--warmup", "-1"], "--warmup", "0..60 s"),
    (["bench", "--bundle", "{bundle}", "-o", "{out}", "--iterations", "0"], "--iterations", "1..100000"),
    (["bench", "--bundle", "{bundle}", "-o", "{out}", "--iterations", str(10**12)], "--iterations", "1..100000"),
    (["bench", "--bundle", "{bundle}", "-o", "{out}", "--size", "100000x100000"], "--size", "1..65536"),
    (["bench", "--bundle", "{bundle}", "-o", "{out}", "--size", "0x0"], "--size", "1..65536"),
    (["bench", "--bundle", "{bundle}", "-o", "{out}", "--size", "1e9x1"], "--size", "expected HxW"),
    (["bench", "--bundle", "{bundle}", "-o", "{out}", "--size", "16x"], "--size", "expected HxW"),
    (["bench", "--bundle", "{bundle}", "-o", "{out}", "--size", "-16"], "--size", "expected HxW"),
    (["bench", "--bundle", "{bundle}", "-o", "{out}", "--size", "65536x65536"], "--size", "--max-pixels"),
    (["bench", "--bundle", "{bundle}", "-o", "{out}", "--size", "4096x4096", "--batch", "8"], "--size", "--max-pixels"),
    (["bench", "--bundle", "{bundle}", "-o", "{out}", "--batch", "0"], "--batch", "1..256"),
    (["bench", "--bundle", "{bundle}", "-o", "{out}", "--batch", "5000"], "--batch", "1..256"),
    (["bench", "--bundle", "{bundle}", "-o", "{out}", "--seed", "-1"], "--seed", SEED),
    (["bench", "--bundle", "{bundle}", "-o", "{out}", "--seed", str(2**32)], "--seed", SEED),
    (["bench", "--bundle", "{bundle}", "-o", "{out}", "--max-pixels", "0"], "--max-pixels", "1..1073741824"),
    # serve (checked before its dependencies and the model are loaded)
    (["serve", "{bundle}", "--max-batch", "100000"], "--max-batch", "1..256"),
    (["serve", "{bundle}", "--max-delay-ms", "inf"], "--max-delay-ms", "0..10000"),
    (["serve", "{bundle}", "--max-pixels", "0"], "--max-pixels", "1..1073741824"),
    (["serve", "{bundle}", "--max-pixels", str(2**62)], "--max-pixels", "1..1073741824"),
    # loadtest (checked before connecting)
    (["loadtest", "--size", "100000x100000"], "--size", "1..65536"),
    (["loadtest", "--size", "0x0"], "--size", "1..65536"),
    (["loadtest", "--size", "1e9x1"], "--size", "expected WxH"),
    (["loadtest", "--size", "9000x9000"], "--size", "--max-pixels"),
    (["loadtest", "--size", "64", "--max-pixels", "100"], "--size", "--max-pixels"),
    (["loadtest", "--label-nc", "0"], "--label-nc", "1..65536"),
    (["loadtest", "--label-nc", str(10**12)], "--label-nc", "1..65536"),
    (["loadtest", "--timeout", "nan"], "--timeout", "(0, 3600]"),
    (["loadtest", "--duration", "inf"], "--duration", "(0, 3600]"),
    (["loadtest", "--concurrency", "100000"], "--concurrency", "1..1024"),
    (["loadtest", "--max-pixels", "-5"], "--max-pixels", "1..1073741824"),
    # make-data
    (["make-data", "{out}", "--n", str(10**9)], "--n", "1..100000"),
    (["make-data", "{out}", "--n-val", "0"], "--n-val", "1..100000"),
    (["make-data", "{out}", "--size", "1048576"], "--size", "32..4096"),
    (["make-data", "{out}", "--classes", "100000"], "--classes", "2..255"),
    (["make-data", "{out}", "--seed", "-1"], "--seed", SEED),
    # train (checked before torch, the data and the run folder)
    (["train", "--out", "{out}", "--steps", "0"], "--steps", "1..1000000000"),
    (["train", "--out", "{out}", "--steps", str(10**15)], "--steps", "1..1000000000"),
    (["train", "--out", "{out}", "--minutes", "inf"], "--minutes", "(0, 525600]"),
    (["train", "--out", "{out}", "--minutes", "nan"], "--minutes", "(0, 525600]"),
    (["train", "--out", "{out}", "--steps", "1", "--batch-size", "100000"], "--batch-size", "1..256"),
    (["train", "--out", "{out}", "--steps", "1", "--lr-g", "nan"], "--lr-g", "(0, 1]"),
    (["train", "--out", "{out}", "--steps", "1", "--lr-d", "inf"], "--lr-d", "(0, 1]"),
    (["train", "--out", "{out}", "--steps", "1", "--lr-g", "0"], "--lr-g", "(0, 1]"),
    (["train", "--out", "{out}", "--steps", "1", "--decay-steps", str(10**12)], "--decay-steps", "0..1000000000"),
    (["train", "--out", "{out}", "--steps", "1", "--gan-weight", "-1"], "--gan-weight", "0..1e+06"),
    (["train", "--out", "{out}", "--steps", "1", "--feat-weight", "inf"], "--feat-weight", "0..1e+06"),
    (["train", "--out", "{out}", "--steps", "1", "--l1-weight", "nan"], "--l1-weight", "0..1e+06"),
    (["train", "--out", "{out}", "--steps", "1", "--vgg-weight", "1e300"], "--vgg-weight", "0..1e+06"),
    (["train", "--out", "{out}", "--steps", "1", "--ndf", "1000000"], "--ndf", "1..1024"),
    (["train", "--out", "{out}", "--steps", "1", "--num-d", "100"], "--num-d", "1..8"),
    (["train", "--out", "{out}", "--steps", "1", "--load-size", "0"], "--load-size", "16..16384"),
    (["train", "--out", "{out}", "--steps", "1", "--save-every", "0"], "--save-every", "1..1000000000"),
    (["train", "--out", "{out}", "--steps", "1", "--log-every", "-1"], "--log-every", "1..1000000000"),
    (["train", "--out", "{out}", "--steps", "1", "--seed", "-7"], "--seed", SEED),
    # demo (checked before the data set, the training and the bench)
    (["demo", "--out", "{out}", "--minutes", "inf"], "--minutes", "(0, 1440]"),
    (["demo", "--out", "{out}", "--minutes", "0"], "--minutes", "(0, 1440]"),
    (["demo", "--out", "{out}", "--steps", "0"], "--steps", "1..1000000"),
    (["demo", "--out", "{out}", "--bench-size", "100000"], "--bench-size", "16..4096"),
    (["demo", "--out", "{out}", "--bench-size", "1000"], "--bench-size", "multiple of 16"),
    (["demo", "--out", "{out}", "--seed", str(2**40)], "--seed", SEED),
    # validate
    (["validate", "{bundle}", "--report", "{out}", "--random", "0"], "--random", "1..1000"),
    (["validate", "{bundle}", "--report", "{out}", "--random", str(10**9)], "--random", "1..1000"),
    (["validate", "{bundle}", "--report", "{out}", "--seed", "-1"], "--seed", SEED),
    # export --triton-repo (checked before the export, not after it)
    (["export", "{ck}", "-o", "{out}", "--triton-repo", "{out}-repo", "--triton-max-batch", "0"],
     "--triton-max-batch", "1..256"),
    (["export", "{ck}", "-o", "{out}", "--triton-repo", "{out}-repo", "--triton-max-delay-ms", "nan"],
     "--triton-max-delay-ms", "0..10000"),
    (["export", "{ck}", "-o", "{out}", "--triton-repo", "{out}-repo", "--triton-instances", "100000"],
     "--triton-instances", "1..64"),
    # build-engine profile shapes (checked before the flavour, TensorRT and the bundle)
    (["build-engine", "{bundle}", "-o", "{out}", "--max", "100000x100000x100000"], "--max", "N must be in 1..256"),
    (["build-engine", "{bundle}", "-o", "{out}", "--max", "1x70000x16"], "--max", "H must be in 1..65536"),
    (["build-engine", "{bundle}", "-o", "{out}", "--min", "0x0x0"], "--min", "N must be in 1..256"),
    (["build-engine", "{bundle}", "-o", "{out}", "--opt", "1e9x1"], "--opt", "NxHxW"),
    (["build-engine", "{bundle}", "-o", "{out}", "--max", "256x65536x65536"], "--max", "the limit"),
]


@pytest.mark.parametrize("args, option, says", NUMERIC, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in NUMERIC])
def test_numeric_option_out_of_range(args, option, says, tmp_path, bundle_dir, checkpoint, good_map):
    out = tmp_path / "out"
    r = run_cli(_fill(args, out=out, bundle=bundle_dir, ck=checkpoint, map=good_map), USAGE, names=(option,))
    one_error_line(r, option, says)
    assert not out.exists() and not Path(f"{out}-repo").exists()  # no work done


THREADS = [
    (["infer", "{map}", "--bundle", "{bundle}", "-o", "{out}", "--threads", "100000"]),
    (["infer", "{map}", "--bundle", "{bundle}", "-o", "{out}", "--threads", "2000"]),
    (["infer", "{map}", "--bundle", "{bundle}", "-o", "{out}", "--threads", "-4"]),
    (["serve", "{bundle}", "--threads", "2000"]),
    (["train", "--out", "{out}", "--steps", "1", "--preset", "facades", "--threads", "100000"]),
    (["demo", "--out", "{out}", "--threads", "100000"]),
]


@pytest.mark.parametrize("args", THREADS, ids=[" ".join(a[:1] + a[-2:]) for a in THREADS])
def test_threads_capped_relative_to_the_cores(args, tmp_path, bundle_dir, good_map):
    """Before the fix --threads 100000 crashed (SIGSEGV) and 2000 could deadlock: in a fresh process."""
    out = tmp_path / "out"
    r = run_sub(_fill(args, out=out, bundle=bundle_dir, map=good_map))
    sub_error(r, USAGE, "--threads", f"must be in 1..{THREADS_MAX}", f"{os.cpu_count()} cores here")
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.stderr
    assert not out.exists()


def test_help_states_the_ranges():
    """Every bounded option documents its range in --help."""
    for cmd, texts in {"infer": ["1..1024", "1..256", "1..1073741824", "4 x the"],
                       "bench": ["0..600", "0..60;", "1..100000", "1..65536", "1..256"],
                       "serve": ["1..256", "0..10000", "1..1073741824", "4 x the"],
                       "loadtest": ["1..1024", "1..1000000", "(0, 3600]", "1..65536"],
                       "make-data": ["1..100000", "32..4096", "2..255", SEED],
                       "train": ["1..1000000000", "(0, 1]", "1..256", "1..1024", "1..8", "16..16384", "4 x the"],
                       "demo": ["(0, 1440]", "16..4096", "4 x the"],
                       "validate": ["1..1000", SEED],
                       "export": ["(1..256)", "(0..10000 ms)", "(1..64)"],
                       "build-engine": ["N 1..256"]}.items():
        r = run_cli([cmd, "--help"])
        assert r.exit_code == 0, r.output
        flat = " ".join(r.output.replace("│", " ").split())
        for t in texts:
            assert t in flat, (cmd, t, flat)


# ---- output sizes under --max-pixels (per input, from its header) ------------------------------------
@pytest.mark.parametrize("extra", [["--scale", "10", "--max-pixels", "10000"],
                                   ["--scale", "6", "--max-pixels", "10000", "--side-by-side"]])
def test_scaled_output_over_max_pixels_fails_that_input(extra, tmp_path, bundle_dir, good_map):
    """A 16x16 map at K=10 would be 160x160 = 25,600 pixels; at K=6 side by side 192x96: both over 10,000."""
    out = tmp_path / "out"
    r = run_cli(["infer", good_map, "--bundle", bundle_dir, "-o", out, "--backend", "onnxruntime", *extra],
                InputError.exit_code, names=(str(good_map),), says=("--max-pixels 10,000",))
    assert not list(out.glob("*.png")) if out.exists() else True


def test_scaled_output_within_max_pixels_is_written(tmp_path, bundle_dir, good_map):
    out = tmp_path / "out"
    run_cli(["infer", good_map, "--bundle", bundle_dir, "-o", out, "--backend", "onnxruntime", "--scale", "6",
             "--max-pixels", "10000"], 0)
    assert (out / "good.png").is_file()


def test_library_check_scale_bounds():
    from asap_deploy.app.scale import check_scale

    for bad in (1e9, float("inf"), float("-inf"), 1025):
        with pytest.raises(UsageError, match=r"--scale must be in 1\.\.1024"):
            check_scale(bad)
    with pytest.raises(UsageError, match="1x1 label map"):
        check_scale(100, max_pixels=1000)
    assert check_scale(2.5, max_pixels=1000) == 2.5


# ---- file arguments: regular files of bounded size ---------------------------------------------------
@pytest.fixture
def fifo(tmp_path) -> Path:
    p = tmp_path / "pipe.json"
    os.mkfifo(p)
    return p


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a runaway read fails instead of eating the machine


def run_sub(args, timeout: float = 60) -> subprocess.CompletedProcess:
    """`asap ARGS` in a fresh interpreter with a timeout: a case that would block fails with TimeoutExpired."""
    return subprocess.run(py_cli() + [str(a) for a in args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, preexec_fn=_limit_memory, stdin=subprocess.DEVNULL)


def sub_error(r: subprocess.CompletedProcess, code: int, *says: str) -> None:
    text = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert [ln for ln in r.stderr.splitlines() if ln.strip()][0].startswith("error:"), r.stderr
    for s in says:
        assert s in text, (s, text)


def test_config_dev_zero_is_refused(tmp_path, checkpoint):
    r = run_sub(["export", checkpoint, "-o", tmp_path / "b", "--config", "/dev/zero"])
    sub_error(r, ConfigError.exit_code, "/dev/zero", "--config file is not a regular file")
    assert not (tmp_path / "b").exists()


def test_config_fifo_is_refused_not_waited_on(tmp_path, checkpoint, fifo):
    r = run_sub(["inspect", checkpoint, "--config", fifo])
    sub_error(r, ConfigError.exit_code, str(fifo), "not a regular file")


def test_checkpoint_fifo_is_refused_not_waited_on(tmp_path, fifo):
    r = run_sub(["inspect", fifo])
    sub_error(r, CheckpointError.exit_code, "PATH", str(fifo), "not a regular file")


def test_infer_model_fifo_is_refused_not_waited_on(tmp_path, good_map, fifo):
    r = run_sub(["infer", good_map, "--model", fifo, "-o", tmp_path / "out"])
    sub_error(r, CheckpointError.exit_code, "--model", str(fifo), "not a regular file")
    assert not (tmp_path / "out").exists()


def test_vgg_weights_fifo_is_refused_not_waited_on(tmp_path, fifo):
    r = run_sub(["train", "--out", tmp_path / "run", "--steps", "1", "--preset", "facades", "--vgg-weights", fifo])
    sub_error(r, USAGE, "--vgg-weights", str(fifo), "not a regular file")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("cmd", [["compile-kernels", "-o", "{out}"], ["train", "--out", "{out}", "--steps", "1"],
                                 ["inspect", "{ck}"]])
def test_config_folder_and_oversized_file_are_refused(cmd, tmp_path, checkpoint):
    out = tmp_path / "out"
    args = _fill(cmd, out=out, ck=checkpoint)
    folder = tmp_path / "cfgdir"
    folder.mkdir()
    r = run_cli(args + ["--config", folder], ConfigError.exit_code, names=(str(folder),))
    one_error_line(r, str(folder), "--config file is not a regular file")
    big = tmp_path / "big.json"
    with open(big, "wb") as f:  # sparse: 17 MiB on paper, nothing on disk
        f.truncate(17 * 2**20)
    r = run_cli(args + ["--config", big], ConfigError.exit_code, names=(str(big),))
    one_error_line(r, str(big), "more than the limit")
    assert not out.exists()


def test_infer_fifo_input_is_named_as_not_a_regular_file(tmp_path, bundle_dir, fifo):
    r = run_cli(["infer", fifo, "--bundle", bundle_dir, "-o", tmp_path / "out"], InputError.exit_code,
                names=(str(fifo),), says=("not a regular file",))
    assert "no such file" not in r.output


@pytest.mark.parametrize("cmd", [["bench", "--bundle", "{bundle}", "-o", "{out}", "--size", "16", "--iterations", "1",
                                  "--duration", "0", "--warmup", "0", "--backends", "onnxruntime"],
                                 ["loadtest", "--requests", "1"]])
def test_json_output_must_be_a_file_in_an_existing_folder(cmd, tmp_path, bundle_dir, fifo):
    out = tmp_path / "out"
    args = _fill(cmd, out=out, bundle=bundle_dir)
    for target, says in ((fifo, "exists and is not a regular file"), (tmp_path, "exists and is not a regular file"),
                         (tmp_path / "no" / "such" / "r.json", "does not exist")):
        r = run_cli(args + ["--json", target], USAGE, names=("--json", str(target)))
        one_error_line(r, "--json", says)
    assert not out.exists()


# ---- globs and folder walks: no symlink loops, bounded -----------------------------------------------
def _loop_tree(root: Path) -> None:
    """root/a/b/c with a map at the bottom, and in every folder three symlinks back to root: a glob
    that follows them visits 3^depth paths until ELOOP (at 40 links): it never ends."""
    deep = root / "a" / "b" / "c"
    deep.mkdir(parents=True)
    for d in (root, root / "a", root / "a" / "b", deep):
        for i in range(3):
            (d / f"loop{i}").symlink_to(root, target_is_directory=True)


def test_recursive_glob_never_follows_symlink_loops(tmp_path, bundle_dir):
    root = tmp_path / "maps"
    _loop_tree(root)
    labels, _ = label_maps(1, seed=3)
    save_png(root / "a" / "b" / "c" / "deep.png", labels[0])
    out = tmp_path / "out"
    r = run_sub(["infer", f"{root}/**/*.png", "--bundle", bundle_dir, "-o", out, "--backend", "onnxruntime"], timeout=60)
    assert r.returncode == 0, (r.stdout, r.stderr[-2000:])
    assert sorted(p.name for p in out.iterdir()) == ["deep.png"]  # found once, through the real folders only


def _many_files(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    labels, _ = label_maps(1, seed=2)
    src = save_png(folder / "m0000.png", labels[0])
    for i in range(1, n):
        os.link(src, folder / f"m{i:04d}.png")


@pytest.mark.parametrize("spec", ["{d}", "{d}/*.png", "{d}/**/*.png"])
def test_infer_walk_is_bounded(spec, tmp_path, bundle_dir, monkeypatch):
    from asap_deploy import limits

    monkeypatch.setattr(limits, "MAX_WALK_ENTRIES", 50)
    d = tmp_path / "maps"
    _many_files(d, 60)
    out = tmp_path / "out"
    r = run_cli(["infer", spec.format(d=d), "--bundle", bundle_dir, "-o", out], USAGE,
                says=("more than 50 folder entries",))
    one_error_line(r, str(d), "the limit", only=False)  # after the "backend: ..." line
    assert not out.exists()


def test_validate_labels_walk_and_count_are_bounded(tmp_path, bundle_dir, monkeypatch):
    from asap_deploy import limits
    from asap_deploy.engines import validate as validate_mod

    d = tmp_path / "labels"
    _many_files(d, 60)
    report = tmp_path / "report"
    monkeypatch.setattr(limits, "MAX_WALK_ENTRIES", 50)
    r = run_cli(["validate", bundle_dir, "--labels", d, "--report", report], USAGE, says=("more than 50",))
    one_error_line(r, str(d), "the limit", only=False)
    monkeypatch.setattr(limits, "MAX_WALK_ENTRIES", 1000)
    monkeypatch.setattr(validate_mod, "MAX_LABEL_MAPS", 10)
    r = run_cli(["validate", bundle_dir, "--labels", d, "--report", report], InputError.exit_code,
                says=("60 label PNGs", "more than the 10"))
    assert not report.exists()


def test_glob_files_agrees_with_glob_without_symlinks(tmp_path, monkeypatch):
    from asap_deploy.limits import glob_files

    for rel in ("x.png", "a/y.png", "a/b/z.png", "a/b/z.txt", ".h.png", "a/.hidden/q.png", "c/w.PNG"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    for pat in ("**/*.png", "*.png", "a/*/*.png", "a/**", "**/z.*", "?.png", ".*.png", "a/**/*.png", "*/*.png",
                str(tmp_path / "**" / "*.png"), "c/*.PNG"):
        want = sorted(Path(q) for q in glob.glob(pat, recursive=True) if Path(q).is_file())
        assert glob_files(pat) == want, pat


def test_list_files_skips_fifos_and_folders(tmp_path):
    from asap_deploy.limits import list_files

    (tmp_path / "sub.png").mkdir()
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "ok.png").write_bytes(b"")
    (tmp_path / "link.png").symlink_to(tmp_path / "ok.png")
    assert [p.name for p in list_files(tmp_path, (".png",))] == ["link.png", "ok.png"]


def test_check_range_wording():
    from asap_deploy.limits import check_range

    for bad in (float("nan"), float("inf"), -1, 10**40, True, "3"):
        with pytest.raises(UsageError, match=r"^--x must be in 0\.\.5 \(got "):
            check_range("--x", bad, 0, 5)
    assert check_range("--x", 5, 0, 5) == 5 and np.isclose(check_range("--y", 0.5, 0.0, 1.0, lo_open=True), 0.5)
