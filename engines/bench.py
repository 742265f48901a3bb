"""`asap bench` as a library: latency per backend, size, batch, precision and stage, with the
authors' forward as the baseline measured in the same run. This module measures and builds the
report (a dict of rows); engines/bench_report.py checks, tabulates, plots and writes it.

What is timed (wall clock, `time.perf_counter`, host side):
  * stages `predictor` (ids -> parameter grid), `pixelwise` (ids + grid -> RGB) and `end_to_end`
    (ids -> uint8 RGB), each called through the Engine interface, so every backend is timed the
    same way: host arrays in, host arrays out. On a GPU the host<->device copies of the inputs and
    outputs are INSIDE these times (TensorRT: H2D + execute + D2H + stream sync); the TensorRT
    engine also times each phase with CUDA events, reported per row as medians (`phases_ms`).
  * `authors`: benchmarks' restatement of the authors' forward (engines/authors.py: their
    generator's two streams, `lowres_stream` after the tent downsample and `highres_stream`, as
    their generator's forward calls them) on the full-resolution fp32 one-hot their generator
    receives; building that one-hot (their Pix2PixModel.preprocess_input: scatter_ into a zeroed
    fp32 tensor, + instance edges) is their caller's work and is not timed (in their favour). Run
    under torch.no_grad(), as their inference mode runs it. fp32 only, measured ONCE per size,
    batch and stage, first: every row of every precision is compared with that fp32 baseline.
Ratios to the authors (same size, batch and stage; any precision): `speedup_vs_authors` = the
authors' median / the row's median, `speedup_vs_authors_best` = the authors' min / the row's min
(the best times: less hurt by a busy machine), `vs_authors` = the inverse of the first. A noisy
baseline row (cv above NOISY_CV) marks every ratio to it (`baseline_noisy`; '*' in the tables) and
the report's warnings say so: such a ratio is not to be trusted.
The pixelwise stage's sgemm floor (CPU rows): the machine's fp32 GEMM rate measured at the start
with the bench's threads (engines.machine.sgemm_rates: ONNX Runtime MatMul, a large square one and
the pixelwise shape, per-tile (S*S x width) @ (width x width)), the stage's FLOPs
(2 * pixels * sum(c_in * c_out) over the MLP layers), floor = FLOPs / rate; each pixelwise row on a
CPU gets `vs_sgemm_floor` = its median / the floor (1.0 = as fast as the machine's sgemm allows).
`--precision all`: every precision each backend's registry row lists, skipping (with the reason, in
the report's `skipped`) those the bundle has no graphs for (int8 before `asap quantize`, fp16 of a
bundle exported with --no-fp16) or the backend cannot run here while it runs another. Any run
skips (with the reason) a backend at a precision its registry row does not list (torch at fp16).
Per item: warm-up for `warmup_s` (at least one call), then at least `min_iters` calls AND
`min_seconds` (defaults 0.2 s, 3 calls, 2 s: a default run at 1024x1024 fits about two minutes on
a 2-core CPU; trtexec's are 200 ms, 10, 3 s; a longer --duration buys more samples). Statistics:
min, max, mean, std, median, p90, p95, p99 with trtexec's percentile rule
`sorted[max(n - 1 - int((1 - p/100) * n), 0)]`; throughput = images / total wall time of the timed
calls; coefficient of variation `cv` = std / mean: a row above NOISY_CV is flagged `noisy` (its
median is not to be trusted; trtexec warns the same way), and the report's `warnings` say so and
whether the machine was busy (load average before and after the run).
Threads: every CPU backend (torch, the authors' forward, ONNX Runtime, OpenVINO) runs with the same
`threads` (default: the cores this process may use); each row records it (null on TensorRT).
Fidelity: each row's output (the first call's) is compared with the torch fp32 engine's output
of the same stage on the same label map: PSNR on the 8-bit image and max abs (8-bit levels) for
pixelwise/end_to_end, cosine and max abs (parameter units) for the predictor, flagged below
engines.validate's threshold of the row's precision, so a fast but wrong backend cannot look good. Peak memory: the growth of the process's
resident high-water mark during the item's timed calls over its resident size before them
(Linux: /proc/self/clear_refs resets it); memory that earlier items left in allocator caches is
not counted again, so this is a lower bound (benchmarks/onnx_speed.py measures in fresh processes).
On CUDA torch, torch.cuda.max_memory_allocated is reported as device memory.
A backend that fails to load or run becomes rows with status "failed: ..." and the table goes on.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from asap_deploy.errors import UsageError
from asap_deploy.export.stages import KEYS, Stage
from asap_deploy.precisions import PRECISIONS

from . import registry
from .bench_report import NOISY_CV, SCHEMA, SCHEMA_VERSION

STAGES = KEYS  # report keys: predictor, pixelwise, end_to_end (export/stages.py)
BASELINE = "authors"
BENCH_BACKENDS = (BASELINE, *registry.NAMES)  # every backend of the registry, variants included
DEFAULT_BACKENDS = (registry.TORCH.name, registry.ONNXRUNTIME.name)  # measured even where unusable
PERCENTILES = (90, 95, 99)
MAX_ITERATIONS = 100_000
MAX_DURATION_S = 600.0   # --duration: timed seconds per row
MAX_WARMUP_S = 60.0
ALL = "all"  # --precision all: every precision each backend lists


def percentile(sorted_samples: Sequence[float], p: float) -> float:
    """trtexec's rule: sorted[max(n - 1 - int((1 - p/100) * n), 0)]."""
    n = len(sorted_samples)
    # (100 - p) * n / 100 rather than (1 - p/100) * n: the same number without the binary rounding
    # that turns (1 - 0.9) * 10 into 0.99999 (and p90 of 10 samples into the maximum)
    return sorted_samples[max(n - 1 - int((100 - p) * n / 100), 0)]


def summarize(samples: Sequence[float], images_per_call: int, wall_s: float) -> dict:
    """Statistics of per-call seconds, in ms, + throughput (images/s over the timed wall time)."""
    s = sorted(samples)
    out = {"iterations": len(s), "min_ms": s[0] * 1e3, "max_ms": s[-1] * 1e3, "mean_ms": statistics.fmean(s) * 1e3,
           "std_ms": (statistics.stdev(s) * 1e3) if len(s) > 1 else 0.0, "median_ms": statistics.median(s) * 1e3,
           "total_s": wall_s, "throughput_ips": images_per_call * len(s) / wall_s if wall_s > 0 else math.inf}
    for p in PERCENTILES:
        out[f"p{p}_ms"] = percentile(s, p) * 1e3
    out["cv"] = out["std_ms"] / out["mean_ms"] if len(s) > 1 and out["mean_ms"] > 0 else None
    return out


def default_threads() -> int:
    """The CPU threads a row uses without --threads: the cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass
class BenchOptions:
    backends: list[str] = field(default_factory=lambda: list(DEFAULT_BACKENDS))
    sizes: list[tuple[int, int]] = field(default_factory=lambda: [(1024, 1024)])
    batches: list[int] = field(default_factory=lambda: [1])
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    warmup_s: float = 0.2
    min_iters: int = 3
    min_seconds: float = 2.0
    memory: bool = True
    seed: int = 0
    max_pixels: int = 64 * 1024 * 1024  # batch x H x W of one row
    threads: int | None = None  # CPU threads of torch / the authors / ONNX Runtime (None: default_threads())
    sgemm: bool = True  # measure the machine's sgemm rate and each pixelwise CPU row's ratio to its floor

    def cpu_threads(self) -> int:
        return self.threads or default_threads()

    def check(self, S: int | None = None) -> None:  # noqa: N803
        """Every option in its documented range (limits.py wording), before any work."""
        from asap_deploy.config import padded_size
        from asap_deploy.limits import MAX_BATCH, MAX_SIDE, check_max_pixels, check_pixels, check_range, check_seed

        for b in self.backends:
            if b not in BENCH_BACKENDS:
                from asap_deploy.errors import did_you_mean

                raise UsageError(f"unknown backend {b!r}{did_you_mean(b, BENCH_BACKENDS)} "
                                 f"(choose from: {', '.join(BENCH_BACKENDS[1:])}; the authors' baseline is always included)")
        for s in self.stages:
            if s not in STAGES:
                raise UsageError(f"unknown stage {s!r} (choose from: {', '.join(STAGES)})")
        if not self.precisions:
            raise UsageError("give at least one --precision")
        for p in self.precisions:
            if p != ALL:
                from asap_deploy.precisions import check_precision

                check_precision(p, (*PRECISIONS, ALL))
        check_range("--iterations", self.min_iters, 1, MAX_ITERATIONS)
        check_range("--duration", self.min_seconds, 0.0, MAX_DURATION_S, unit="s")
        check_range("--warmup", self.warmup_s, 0.0, MAX_WARMUP_S, unit="s")
        check_seed("--seed", self.seed)
        from asap_deploy.limits import check_threads

        check_threads("--threads", self.threads)
        check_max_pixels("--max-pixels", self.max_pixels)
        if not self.batches or not self.sizes:
            raise UsageError("give at least one --size and one --batch")
        for b in self.batches:
            check_range("--batch", b, 1, MAX_BATCH)
        for h, w in self.sizes:
            check_range("--size height", h, 1, MAX_SIDE)
            check_range("--size width", w, 1, MAX_SIDE)
            n = max(self.batches)
            check_pixels("--size", f"{h}x{w} at --batch {n}", n * h * w, self.max_pixels)
            if S and padded_size(h, w, S) != (h, w):
                raise UsageError(f"size {h}x{w} (HxW) is not a multiple of S={S}: use {'x'.join(map(str, padded_size(h, w, S)))}")


def default_backends(bundle_dir: Path, precision: str, engine_given: bool = False) -> list[str]:
    """What `asap bench` measures without --backends: torch and onnxruntime (a failure is a row),
    and every other backend of the registry usable here for `bundle_dir` at `precision` (`all`: at
    any precision its row lists; TensorRT also when an engine file was given: its failure to run is
    then a row of the table)."""
    out = list(DEFAULT_BACKENDS)
    for b in registry.BACKENDS:
        precs = b.precisions if precision == ALL else (precision,)
        if b.name not in out and (any(b.available(bundle_dir, p)[0] for p in precs)
                                  or (engine_given and b is registry.TENSORRT)):
            out.append(b.name)
    return out


def parse_size(text: str) -> tuple[int, int]:
    """'1024' or '512x1024' (HxW), sides in 1..65536; UsageError naming --size otherwise."""
    from asap_deploy.limits import parse_size as parse

    return parse("--size", text, "HxW")


# ---- timing -------------------------------------------------------------------------------------------
def _kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(fn: Callable[[], object], opts: BenchOptions, images_per_call: int,
            device_peak: Callable[[], float | None] | None = None,
            phases: Callable[[], dict[str, float]] | None = None,
            first_output: Callable[[object], None] | None = None) -> dict:
    """Warm up, then time `fn` for >= min_iters calls and >= min_seconds; stats + peak memory.
    `phases` (GPU engines): after each call, its host->device / compute / device->host ms, reported
    as median per phase ("phases_ms") next to the wall-clock figures that include them.
    `first_output` receives what the first (warm-up) call returned (the fidelity check)."""
    t_end = time.perf_counter() + opts.warmup_s
    result = fn()
    if first_output is not None:
        first_output(result)
    del result
    while time.perf_counter() < t_end:
        fn()
    before = _kib("VmRSS") if opts.memory else None
    reset = opts.memory and before is not None and _reset_peak()
    samples: list[float] = []
    split: dict[str, list[float]] = {}
    start = time.perf_counter()
    while len(samples) < opts.min_iters or time.perf_counter() - start < opts.min_seconds:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        for k, v in (phases() if phases else {}).items():
            split.setdefault(k, []).append(v)
    wall = time.perf_counter() - start
    out = summarize(samples, images_per_call, wall)
    out["phases_ms"] = {k: statistics.median(v) for k, v in split.items()} or None
    peak = _kib("VmHWM") if reset else None
    out["peak_host_mib"] = (peak - before) / 1024 if peak is not None and before is not None else None
    out["peak_device_mib"] = device_peak() if device_peak else None
    return out


# ---- backends as stage callables -------------------------------------------------------------------------
class _Item:
    """The three stage callables of one backend on one input (labels, instances)."""

    def __init__(self, backend: str, ctx: "_Context", precision: str, threads: int):
        self.backend = backend
        self.ctx = ctx
        self.precision = precision
        self.device_peak = None
        self.threads: int | None = threads
        self.cpu = True  # runs on the CPU (its pixelwise rows get the sgemm floor ratio)
        if backend == BASELINE:
            if precision != "fp32":
                raise UsageError("the authors' forward is fp32 only (the baseline of the fp32 rows)")
            from .authors import AuthorsForward

            self.engine = None
            self.authors = AuthorsForward(ctx.torch_model())
        else:
            self.engine = ctx.engine(backend, precision, threads)
            if getattr(getattr(self.engine, "device", None), "type", None) == "cuda":  # torch, torch-cuda on a GPU
                import torch

                self.device_peak = lambda: torch.cuda.max_memory_allocated() / 2**20
                self.cpu = False
            elif backend != registry.TORCH.name and registry.backend(backend).gpu:
                self.cpu = False
            if not row_threads_apply(backend):
                self.threads = None

    def stage(self, stage: str, labels: np.ndarray, instances: np.ndarray | None) -> Callable[[], object]:
        if self.engine is not None:
            e = self.engine
            if stage == Stage.END_TO_END.key:
                return lambda: e.run(labels, instances)
            if stage == Stage.PREDICTOR.key:
                return lambda: e.predict_params(labels, instances)
            params = e.predict_params(labels, instances)
            return lambda: e.pixelwise(labels, params)
        import torch

        a = self.authors
        lt = torch.from_numpy(np.ascontiguousarray(labels))
        it = torch.from_numpy(np.ascontiguousarray(instances)) if instances is not None else None
        with torch.no_grad():  # the one-hot is their caller's work: built once, not timed
            onehot = a.encode(lt, it)
            params = a.lowres(onehot) if stage == Stage.PIXELWISE.key else None

        def run(f):
            def call():
                with torch.no_grad():  # as their Pix2PixModel runs the generator for inference
                    return f()
            return call

        return run({Stage.END_TO_END.key: lambda: a(onehot), Stage.PREDICTOR.key: lambda: a.lowres(onehot),
                    Stage.PIXELWISE.key: lambda: a.pixelwise(onehot, params)}[stage])

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def row_threads_apply(backend: str) -> bool:
    """Whether --threads governs this backend (torch, the authors' forward, ONNX Runtime, and every
    CPU-only backend such as OpenVINO: CPU work)."""
    if backend == BASELINE:
        return True
    b = registry.backend(backend)
    return b.engine == registry.TORCH.engine or bool(b.providers) or b.gpu is False


class _Context:
    """The model under test: a bundle (ONNX Runtime, TensorRT) and its PyTorch twin (torch, authors),
    and the torch fp32 reference outputs every row is compared with."""

    def __init__(self, bundle):
        self.bundle = bundle
        self._model = None
        self._reference = None
        self._ref_out: dict = {}

    def torch_model(self):
        if self._model is None:
            from .torch_engine import TorchEngine

            self._model = TorchEngine.from_bundle(self.bundle).model
        return self._model

    def engine(self, backend: str, precision: str, threads: int | None = None):
        if backend == registry.TORCH.name:  # shares the authors' baseline's model (built once)
            if precision != "fp32":
                raise UsageError("the torch backend is fp32 only")
            from .torch_engine import TorchEngine

            return TorchEngine(self.torch_model())
        b = registry.backend(backend)
        if (b.providers or b.gpu is False) and threads:  # CPU backends take intra_op_threads
            return b.open(self.bundle, precision, intra_op_threads=threads)
        return b.open(self.bundle, precision)

    def reference(self, stage: str, labels: np.ndarray, instances: np.ndarray | None, key) -> np.ndarray:
        """The torch fp32 engine's output of `stage` on this input (computed once per key)."""
        if key not in self._ref_out:
            from .torch_engine import TorchEngine

            if self._reference is None:
                self._reference = TorchEngine(self.torch_model())
            e = self._reference
            if stage == Stage.END_TO_END.key:
                out = e.run(labels, instances)
            elif stage == Stage.PREDICTOR.key:
                out = e.predict_params(labels, instances)
            else:
                out = e.pixelwise(labels, e.predict_params(labels, instances))
            self._ref_out = {k: v for k, v in self._ref_out.items() if k[:-1] == key[:-1]}  # one input at a time
            self._ref_out[key] = stage_output(stage, out)
        return self._ref_out[key]


def stage_output(stage: str, value) -> np.ndarray:
    """Any backend's output of a stage as numpy: the parameter grid (float, N x P x h x w) for the
    predictor, the 8-bit image (N x H x W x 3) for pixelwise and end_to_end (the authors' float
    image in [-1, 1] goes through the same 8-bit conversion as every engine's)."""
    from asap_deploy.io import to_uint8

    from .base import IMAGE

    if isinstance(value, tuple):  # the authors' end to end: (image, params)
        value = value[0]
    if isinstance(value, dict):  # Engine.pixelwise
        value = value[IMAGE]
    if hasattr(value, "detach"):  # a torch tensor (the authors' forward), N x C x H x W
        value = value.detach().float().cpu().numpy()
        if stage != Stage.PREDICTOR.key:
            value = to_uint8(value.transpose(0, 2, 3, 1))
    return np.asarray(value)


def fidelity(stage: str, ref: np.ndarray, got: np.ndarray, precision: str) -> dict:
    """A row's output vs the torch fp32 reference: image stages PSNR (8-bit), max abs in 8-bit
    levels and the share of pixels more than 8 levels off, the predictor cosine and max abs in
    parameter units; `below_threshold` against engines.validate's thresholds for the row's
    precision (PSNR, and the share over 8 levels where the precision limits it; cosine)."""
    from .validate import THRESHOLDS, cosine, psnr_u8, share_over_levels

    if ref.shape != got.shape:
        raise ValueError(f"output shape {tuple(got.shape)} differs from the reference's {tuple(ref.shape)}")
    t = THRESHOLDS.get(precision, THRESHOLDS["fp32"])
    finite = bool(np.isfinite(got).all())
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    out = {"reference": "torch fp32", "finite": finite, "max_abs": float(diff.max()) if finite else math.inf}
    if stage == Stage.PREDICTOR.key:
        c = cosine(ref, got) if finite else 0.0
        out.update(psnr_db=None, cosine=c, unit="parameter units", threshold=f"cosine >= {t.params_cosine}",
                   below_threshold=not finite or c < t.params_cosine)
    else:
        p = psnr_u8(ref, got)
        over = share_over_levels(ref, got)
        limit = t.share_over_8_levels
        out.update(psnr_db=p, cosine=None, unit="8-bit levels", share_over_8_levels=over,
                   threshold=f"PSNR >= {t.psnr_db:g} dB" + ("" if limit is None else f", share > 8 levels <= {limit:.1%}"),
                   below_threshold=p < t.psnr_db or (limit is not None and over > limit))
    return out


@contextlib.contextmanager
def _torch_threads(n: int):
    """torch's intra-op threads = n for the block (torch and the authors' rows), restored after."""
    from .machine import importable

    if not importable("torch"):
        yield
        return
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _status(exc: BaseException) -> str:
    """A failed row's status: the whole message (whitespace collapsed), never cut."""
    msg = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return "failed: " + " ".join(msg.split())


def skip_reason(backend: str, precision: str, bundle) -> str | None:
    """Why `--precision all` leaves out `backend` at `precision` for `bundle`, or None: the bundle has
    no graphs for it (int8 before `asap quantize`), or the backend cannot run that precision here
    while it runs another (TensorRT without an engine of it, bf16 on a CPU without bf16 units)."""
    from .validate import missing_graphs

    why = missing_graphs(bundle, precision)
    if why is not None:
        return why
    b = registry.backend(backend)
    ok, reason = b.available(bundle.path, precision)
    if not ok and any(b.available(bundle.path, q)[0] for q in b.precisions if q != precision):
        return reason
    return None


def plan(opts: BenchOptions, bundle=None) -> tuple[list[tuple[str, str]], list[dict]]:
    """((precision, backend) in measuring order, skipped): the authors' fp32 baseline first, always,
    once; then each precision's backends. A backend whose registry row does not list a precision
    asked for is skipped (nothing to measure: `asap bench --precision fp16` measures onnxruntime's
    fp16, not a torch row that cannot exist). `all`: every precision each backend lists, in
    precisions.py's order; with a bundle, those skip_reason leaves out are skipped too. Skipped:
    [{backend, precision, reason}]."""
    backends = [b for b in dict.fromkeys(opts.backends) if b != BASELINE]
    pairs: list[tuple[str, str]] = [("fp32", BASELINE)]
    skipped: list[dict] = []
    if ALL not in opts.precisions:
        for p in dict.fromkeys(opts.precisions):
            for b in backends:
                listed = registry.backend(b).precisions
                if p in listed:
                    pairs.append((p, b))
                else:
                    skipped.append({"backend": b, "precision": p,
                                    "reason": f"the {b} backend runs {', '.join(listed)}, not {p}"})
        return pairs, skipped
    for p in PRECISIONS:
        for b in backends:
            if p not in registry.backend(b).precisions:
                continue
            why = skip_reason(b, p, bundle) if bundle is not None else None
            if why is None:
                pairs.append((p, b))
            else:
                skipped.append({"backend": b, "precision": p, "reason": why})
    return pairs, skipped


def planned_rows(opts: BenchOptions, bundle=None) -> int:
    """How many rows a run of `opts` measures (a backend that fails to open counts its rows too)."""
    return len(plan(opts, bundle)[0]) * len(opts.sizes) * len(opts.batches) * len(opts.stages)


def run_bench(bundle, opts: BenchOptions, progress: Callable[[str], None] | None = None,
              model_info: dict | None = None,
              on_row: Callable[[dict, int, int], None] | None = None) -> dict:
    """Benchmark `bundle` (export.bundle.Bundle) -> report dict (schema asap-deploy/bench).
    `progress(text)` is called before each row, `on_row(row, done, total)` after each finished row
    (done/total count planned rows; a backend that fails to open finishes all of its rows at once)."""
    from asap_deploy.engines.machine import cpu_flags, machine_info
    from asap_deploy.random_model import random_label_maps

    from .bench_report import report_warnings

    cfg = bundle.config
    opts.check(cfg.S)
    threads = opts.cpu_threads()
    ctx = _Context(bundle)
    rows: list[dict] = []
    base: dict = {}
    pairs, skipped = plan(opts, bundle)
    total, done = len(pairs) * len(opts.sizes) * len(opts.batches) * len(opts.stages), 0
    machine = machine_info()
    machine["cpu_flags"] = cpu_flags()
    t_start = time.perf_counter()
    if opts.sgemm and Stage.PIXELWISE.key in opts.stages:
        if progress:
            progress("the machine's sgemm rate (the pixelwise stage's floor)")
        machine["sgemm"] = _sgemm(cfg, threads)

    def finish(row: dict, count: int = 1, cpu: bool = False) -> None:
        nonlocal done
        if row["backend"] == BASELINE and row.get("status") == "ok":
            base[_key(row)] = row
        _ratio(row, base.get(_key(row)))
        _floor(row, cfg, machine.get("sgemm") if cpu else None)
        rows.append(row)
        done += count
        if on_row:
            on_row(row, done, total)

    with _torch_threads(threads):
        for precision, backend in pairs:
            head = {"backend": backend, "precision": precision}
            try:
                item = _Item(backend, ctx, precision, threads)
            except Exception as exc:  # noqa: BLE001 - any backend failure becomes a row; the table goes on
                for (h, w) in opts.sizes:
                    for n in opts.batches:
                        finish({**head, "size": [h, w], "batch": n, "stage": "all",
                                "threads": threads if row_threads_apply(backend) else None,
                                "status": _status(exc)}, len(opts.stages))
                continue
            try:
                for (h, w) in opts.sizes:
                    for n in opts.batches:
                        labels, inst = random_label_maps(cfg, n, h, w, seed=opts.seed)
                        for st in opts.stages:
                            row = {**head, "size": [h, w], "batch": n, "stage": st, "threads": item.threads}
                            if progress:
                                progress(f"{backend} {precision} {h}x{w} batch {n} {st}")
                            first: list = []
                            try:
                                row.update(measure(item.stage(st, labels, inst), opts, n, item.device_peak,
                                                   getattr(item.engine, "last_phases", None), first.append))
                                row["status"] = "ok"
                                row["noisy"] = row["cv"] is not None and row["cv"] > NOISY_CV
                            except Exception as exc:  # noqa: BLE001 - a failing run is a row, not the end
                                row["status"] = _status(exc)
                            if row["status"] == "ok":
                                try:
                                    ref = ctx.reference(st, labels, inst, (h, w, n, opts.seed, st))
                                    row["fidelity"] = fidelity(st, ref, stage_output(st, first[0]), precision)
                                except Exception as exc:  # noqa: BLE001 - no reference: said, not fatal
                                    row["fidelity"] = None
                                    row["fidelity_note"] = _status(exc).replace("failed: ", "no comparison: ", 1)
                            del first
                            finish(row, cpu=item.cpu)
            finally:
                item.close()
    add_ratios(rows)
    machine["load_avg_start"] = machine.pop("load_avg", None)
    machine["load_avg_end"] = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    rep = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "machine": machine,
        "model": model_info or {"bundle": str(bundle.path), "config": cfg.to_dict(), "S": cfg.S},
        "options": asdict(opts),
        "threads": threads,
        "baseline": BASELINE,
        "timing": ("wall clock per call through the Engine interface (host arrays in and out; on GPUs H2D/D2H "
                   "included); authors: their generator's two streams (low-res + high-res, as their forward calls them) "
                   "on the full-res fp32 one-hot, fp32, torch.no_grad (their caller's one-hot building not timed); "
                   "percentiles: trtexec rule; throughput: images / timed wall time"),
        "noisy_cv": NOISY_CV,
        "fidelity": ("each row's first output vs the torch fp32 engine's output of the same stage on the same label "
                     "map: PSNR (8-bit image) and max abs (8-bit levels) for pixelwise/end_to_end, cosine and max "
                     "abs (parameter units) for the predictor; thresholds of `asap validate` per precision"),
        "seconds": time.perf_counter() - t_start,
        "rows": rows,
        "skipped": skipped,
    }
    rep["warnings"] = report_warnings(rep)
    return rep


def _key(row: dict) -> tuple:
    return tuple(row["size"]), row["batch"], row["stage"]


def _ratio(row: dict, b: dict | None) -> None:
    """The row's ratios to the authors' baseline row `b` (medians and best times) and whether that
    baseline was noisy (its ratios then not to be trusted)."""
    if row.get("status") == "ok" and b is not None:
        row["vs_authors"] = row["median_ms"] / b["median_ms"]
        row["speedup_vs_authors"] = b["median_ms"] / row["median_ms"]
        row["speedup_vs_authors_best"] = b["min_ms"] / row["min_ms"]
        row["baseline_noisy"] = bool(b.get("noisy"))
    else:
        row["vs_authors"] = row["speedup_vs_authors"] = row["speedup_vs_authors_best"] = None
        row["baseline_noisy"] = None


def add_ratios(rows: list[dict]) -> None:
    """Each ok row, against the authors' fp32 row of the same size, batch and stage (the key has no
    precision: an fp16, bf16 or int8 row is compared with the same fp32 baseline): `vs_authors` =
    its median / the authors' median, `speedup_vs_authors` = the inverse, `speedup_vs_authors_best`
    = the authors' min / its min, `baseline_noisy` = the baseline row's noisy flag."""
    base = {_key(r): r for r in rows if r["backend"] == BASELINE and r.get("status") == "ok"}
    for r in rows:
        _ratio(r, base.get(_key(r)))


def _sgemm(cfg, threads: int) -> dict:
    """The machine's sgemm rates at the model's tile shape (engines.machine.sgemm_rates), or the
    reason it could not be measured."""
    from .machine import sgemm_rates

    try:
        return sgemm_rates(threads, cfg.S, cfg.mlp_channels[1])
    except Exception as exc:  # noqa: BLE001 - no floor is no reason to lose the benchmark
        return {"error": _status(exc).replace("failed: ", "", 1)}


def _floor(row: dict, cfg, sgemm: dict | None) -> None:
    """A pixelwise row on the CPU: the stage's FLOPs at the row's size and batch (`pixelwise_gflop`),
    the floor at the machine's sgemm rate (`sgemm_floor_ms`) and `vs_sgemm_floor` = its median /
    the floor; None elsewhere (other stages, GPU rows, no rate)."""
    from .machine import pixelwise_flops, sgemm_floor_ms

    row["pixelwise_gflop"] = row["sgemm_floor_ms"] = row["vs_sgemm_floor"] = None
    if row.get("stage") != Stage.PIXELWISE.key or row.get("status") != "ok" or not sgemm or not sgemm.get("gflops"):
        return
    flops = pixelwise_flops(cfg.mlp_channels, row["batch"] * row["size"][0] * row["size"][1])
    row["pixelwise_gflop"] = flops / 1e9
    row["sgemm_floor_ms"] = sgemm_floor_ms(flops, sgemm["gflops"])
    row["vs_sgemm_floor"] = row["median_ms"] / row["sgemm_floor_ms"]


# ---- the default model ---------------------------------------------------------------------------------------
def random_bundle(out_dir: Path, preset_name: str = "facades", seed: int = 0, fp16: bool = False, config=None):
    """Export a randomly initialised model of a preset (or config) to `out_dir`; returns the Bundle."""
    from asap_deploy.config import preset
    from asap_deploy.errors import require_torch
    from asap_deploy.export.bundle import export_model, load_bundle
    from asap_deploy.random_model import random_generator

    require_torch("asap bench without --bundle (a random model is made and exported)")
    cfg = config or preset(preset_name)
    return load_bundle(export_model(random_generator(cfg, seed), out_dir, fp16=fp16, overwrite=True,
                                    source={"random_init": True, "preset": preset_name, "seed": seed}).path)
