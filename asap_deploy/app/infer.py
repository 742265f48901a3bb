"""`asap infer` as a library: find inputs, decode label maps, pick a backend, pad, batch, run,
crop, write one PNG per input atomically. No torch here (the onnxruntime path runs without it).

    summary = infer(["maps/*.png"], "out", Source(bundle="bundle"), InferOptions(scale=2))

Per input, in order: header read (size; unreadable files fail here), grouping by padded size,
full decode + validation (ids in range, colours in the palette, instance map of the same size),
then one Engine call per batch of same-size maps. A failing file is recorded with a message naming
it and the others go on (`fail_fast` stops at the first). Output files are written whole or not
at all (temp file + rename; stale temp files of an interrupted earlier run are removed first).
"""

from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..config import ModelConfig, crop
from ..config import pad_to_tiles as pad_to_multiple  # noqa: F401 - the name clients and tests know
from ..errors import AsapError, BundleError, InputError, OutputError, UsageError
from ..limits import glob_files, list_files
from ..io import (DEFAULT_MAX_PIXELS, derived_name, file_identity, is_our_png, open_image, read_ids_or_rgb, read_instance_map,
                 remove_stale_temps, to_uint8, write_png)
from ..palette import Palette, load_palette

# backend names, availability, auto and opening: the registry (re-exported: infer's callers use them)
from ..engines.registry import Choice, Source, choose_backend, open_engine  # noqa: F401

IMAGE_SUFFIXES = (".png",)


# ---- inputs ---------------------------------------------------------------------------------------
def discover_inputs(specs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files, folders (their *.png, sorted) and globs -> (paths in order, without repeats;
    [(spec, problem)] for specs that name nothing)."""
    paths: list[Path] = []
    problems: list[tuple[str, str]] = []
    for spec in specs:
        s = str(spec)
        p = Path(s)
        if p.is_dir():
            found = list_files(p, tuple(IMAGE_SUFFIXES))  # bounded; FIFOs, devices and sub-folders skipped
            if not found:
                problems.append((s, f"{s}: folder holds no .png files"))
            paths += found
        elif p.is_file():
            paths.append(p)
        elif glob.has_magic(s):
            found = glob_files(s)  # `**` never enters a symlinked folder (no loop); bounded
            if not found:
                problems.append((s, f"{s}: the pattern matches no file"))
            paths += found
        elif p.exists():
            problems.append((s, f"{s}: not a regular file or folder (a FIFO, device or socket is never read)"))
        else:
            problems.append((s, f"{s}: no such file or folder"))
    seen, out = set(), []
    for p in paths:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out, problems


def decode_label_map(path: str | os.PathLike, cfg: ModelConfig, palette: Palette,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A label PNG -> (H, W) ids in the model's label dtype, validated.

    8/16-bit gray: the values are the ids; palette (mode P) PNG: the indices are the ids; colour:
    looked up in `palette` (a colour image whose pixels are all gray, R = G = B, is read as ids).
    """
    a = read_ids_or_rgb(path, max_pixels)
    if a.ndim == 3:
        a = palette.decode(a, str(path))
    # The one id check of `asap infer` (the engine and the renderer are told ids_checked): here the
    # error can name the file, and a bad file fails alone, not its whole batch.
    cfg.check_label_ids(a, str(path))
    return a.astype(np.dtype(cfg.label_dtype))


def match_by_name(label: Path, where: Path, what: str) -> Path:
    """The file for `label` in folder `where` (same name, same stem as .png, or Cityscapes'
    *_labelIds -> *_instanceIds), or `where` itself when it is a file."""
    if where.is_file():
        return where
    if not where.is_dir():
        raise InputError(f"{where}: no such {what} file or folder")
    names = [label.name, label.stem + ".png"]
    if "_labelIds" in label.stem:
        names.append(label.stem.replace("_labelIds", "_instanceIds") + ".png")
    for n in dict.fromkeys(names):
        if (where / n).is_file():
            return where / n
    raise InputError(f"{label}: no {what} in {where} (looked for {', '.join(dict.fromkeys(names))})")


# ---- geometry (padding to whole tiles and cropping back: ModelConfig.pad_to_tiles / crop) ------------
def upscale_nearest(a: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Nearest-neighbour resize with the same rule as --scale: out (y', x') <- (floor(y'h/H'), ...)."""
    h, w = a.shape[:2]
    ys = np.minimum((np.arange(out_h) * h) // out_h, h - 1)
    xs = np.minimum((np.arange(out_w) * w) // out_w, w - 1)
    return a[ys][:, xs]


# ---- options ---------------------------------------------------------------------------------------
def interrupt_on_sigterm() -> None:
    """SIGTERM stops a run like Ctrl-C: the file being written is never left half-written."""
    import signal

    from ..io import sigterm_as_interrupt

    signal.signal(signal.SIGTERM, sigterm_as_interrupt)


def check_threads(cpu_threads: int | None) -> None:
    """--threads: 1..4 x the cores here (limits.check_threads)."""
    from ..limits import check_threads as check

    check("--threads", cpu_threads)


# ---- the run ---------------------------------------------------------------------------------------------
@dataclass
class InferOptions:
    out_dir: Path = Path("out")
    palette: str | None = None  # None: the bundle's
    instances: Path | None = None
    hires_labels: Path | None = None
    scale: float | None = None
    side_by_side: bool = False
    batch_size: int = 4
    fail_fast: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    precision: str = "fp32"
    overwrite: bool = False  # False: an existing output file fails that input (the others go on)
    skip_existing: bool = False  # an output asap wrote is kept and its input skipped (resume a batch)
    cpu_threads: int | None = None  # torch / ONNX Runtime threads (None: all cores; on Ray: per actor)


@dataclass
class FileResult:
    input: Path
    output: Path | None = None
    error: str | None = None
    note: str | None = None
    size: tuple[int, int] | None = None  # (H, W) of the input
    out_size: tuple[int, int] | None = None
    skipped: bool = False  # --skip-existing: its output, written by asap, was already there

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class InferSummary:
    results: list[FileResult]
    backend: str
    reason: str
    skipped: list[str]
    seconds: float
    stopped_early: bool = False

    @property
    def failed(self) -> list[FileResult]:
        return [r for r in self.results if not r.ok]

    @property
    def written(self) -> list[FileResult]:
        return [r for r in self.results if r.ok and not r.skipped]

    @property
    def skipped_files(self) -> list[FileResult]:
        return [r for r in self.results if r.ok and r.skipped]

    @property
    def images_per_s(self) -> float:
        return len(self.written) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"backend": self.backend, "reason": self.reason, "skipped": self.skipped, "seconds": self.seconds,
                "images_per_s": self.images_per_s, "stopped_early": self.stopped_early,
                "written": len(self.written), "skipped_existing": len(self.skipped_files), "failed": len(self.failed),
                "files": [{"input": str(r.input), "output": str(r.output) if r.output else None, "error": r.error,
                           "note": r.note, "skipped": r.skipped} for r in self.results]}


def check_out_dir(out_dir: Path) -> list[Path]:
    """Create the output folder, or OutputError (the whole run stops before any work) if it cannot
    be created or written. The folders this call created, deepest first (see `remove_if_empty`)."""
    created = []
    for p in (out_dir, *out_dir.parents):
        if os.path.lexists(p):
            break
        created.append(p)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create the output folder ({exc.strerror})") from exc
    if not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder")
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise OutputError(f"{out_dir}: the output folder is not writable")
    return created


def remove_if_empty(created: Sequence[Path]) -> None:
    """A run that wrote nothing leaves no output folder behind: remove the folders `check_out_dir`
    created while they are empty (rmdir refuses a folder that is not, so nothing else is lost)."""
    for p in created:
        try:
            p.rmdir()
        except OSError:
            return


def output_path(out_dir: Path, label: Path) -> Path:
    """`out_dir/<the label map's stem>.png` (the stem shortened if the name would pass 255 bytes)."""
    return out_dir / derived_name(label.stem, ".png")


# A folder holding side inputs (instance maps, high-resolution maps, a bundle) is listed up to
# this many entries to protect its files from being replaced by an output.
MAX_PROTECTED_LISTING = 100_000


def input_identities(paths: Sequence[Path], source: Source, opts: InferOptions) -> dict[tuple[int, int], Path]:
    """(device, inode) -> path of every file this run reads: the label maps, the files of the
    instance / high-resolution folders, the model or bundle, the palette file. An output whose
    identity is among these would replace an input (through a symlink or a hard link too)."""
    found: dict[tuple[int, int], Path] = {}

    def add(p: Path) -> None:
        ident = file_identity(p)
        if ident is not None:
            found.setdefault(ident, p)

    for p in paths:
        add(p)
    for where in (opts.instances, opts.hires_labels, source.bundle, source.model, source.engine):
        if where is None:
            continue
        where = Path(where)
        if where.is_dir():
            try:
                with os.scandir(where) as it:
                    for i, e in enumerate(it):
                        if i >= MAX_PROTECTED_LISTING:
                            break
                        add(Path(e.path))
            except OSError:
                pass
        else:
            add(where)
    if opts.palette and Path(opts.palette).suffix.lower() == ".json":
        add(Path(opts.palette))
    return found


def check_outputs_are_not_inputs(paths: Sequence[Path], out_dir: Path, protected: dict[tuple[int, int], Path]) -> None:
    """OutputError (the whole run, before any work, --overwrite or not) if an output would be one of
    the run's inputs: `asap infer maps/ -o maps/` must never turn label maps into photos."""
    clashes = [(p, output_path(out_dir, p)) for p in paths
               if file_identity(output_path(out_dir, p)) in protected]
    if clashes:
        p, out = clashes[0]
        more = f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
        raise OutputError(f"{out}: the output of {p} would replace the input {protected[file_identity(out)]}{more}; "
                          "choose another output folder (-o): an output never replaces an input, even with --overwrite")


def check_output_file(out: Path, label: Path, overwrite: bool, protected: dict[tuple[int, int], Path],
                      skip_existing: bool = False) -> bool:
    """InputError (this input fails, the others go on) unless writing `out` loses nothing: absent,
    or --overwrite and a PNG asap wrote (is_our_png); never an input. True (nothing to do) when
    `skip_existing` and `out` is a PNG asap wrote: a finished output of an earlier run."""
    if not os.path.lexists(out):
        return False
    ident = file_identity(out)
    if ident in protected:
        raise InputError(f"{label}: its output {out} would replace the input {protected[ident]}; choose another "
                         "output folder (-o)")
    if not overwrite and not skip_existing:
        raise InputError(f"{label}: its output {out} already exists; pass --skip-existing to keep it (resume) or "
                         "--overwrite to replace it")
    if is_our_png(out) and skip_existing:
        return True
    if not is_our_png(out):
        raise InputError(f"{label}: its output {out} exists and was not written by asap (a symlink, a folder or "
                         "a file without asap's PNG signature); refusing to replace it: move it or choose another -o")
    return False


def _write(path: Path, img: np.ndarray) -> None:
    remove_stale_temps(path)
    try:
        write_png(path, img)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc


def check_skip_existing(opts: InferOptions) -> None:
    if opts.skip_existing and opts.overwrite:
        raise UsageError("--skip-existing keeps existing outputs and --overwrite replaces them: give one of them")


def _check_options(opts: InferOptions) -> float | None:
    """UsageError for a bad option, before any input is looked at; the --scale factor (or None)."""
    from .scale import check_scale

    if opts.batch_size < 1:
        raise UsageError(f"--batch must be >= 1 (got {opts.batch_size})")
    if opts.max_pixels < 1:
        raise UsageError(f"--max-pixels must be >= 1 (got {opts.max_pixels})")
    check_skip_existing(opts)
    check_threads(opts.cpu_threads)
    scale = check_scale(opts.scale, opts.max_pixels) if opts.scale is not None else None
    if opts.hires_labels is not None and scale is None:
        raise UsageError("--hires-labels needs --scale K (the high-resolution maps are K times the input size)")
    return scale


@dataclass
class _Run:
    """What every step of one run reads: the options, the open engine and what follows from it."""

    opts: InferOptions
    out_dir: Path
    protected: dict[tuple[int, int], Path]
    engine: object
    choice: Choice
    palette: Palette
    scale: float | None
    renderer: object | None  # a ScaledRenderer when --scale is not 1

    @property
    def cfg(self) -> ModelConfig:
        return self.engine.config


@dataclass
class _Tally:
    """Results in the order they were settled, the progress callback, and --fail-fast's stop."""

    total: int
    fail_fast: bool
    progress: Callable[[int, int, FileResult], None] | None
    results: list[FileResult] = field(default_factory=list)
    stopped: bool = False
    t0: float = field(default_factory=time.perf_counter)

    def finish(self, r: FileResult) -> None:
        self.results.append(r)
        if self.progress:
            self.progress(len(self.results), self.total, r)
        if not r.ok and self.fail_fast:
            self.stopped = True

    def fail(self, r: FileResult, message: str) -> None:
        r.error, r.output = message, None
        self.finish(r)

    def summary(self, choice: Choice) -> InferSummary:
        return InferSummary(self.results, choice.backend, choice.reason, choice.skipped,
                            time.perf_counter() - self.t0, self.stopped)


@dataclass
class _Decoded:
    """One input of a batch, decoded and validated: ids and instances padded to whole tiles."""

    result: FileResult
    labels: np.ndarray
    instances: np.ndarray | None
    hires: np.ndarray | None


def _plan_outputs(paths: Sequence[Path], run: _Run, tally: _Tally) -> dict[tuple[int, int], list[FileResult]]:
    """Pass 1, headers only: each input's size and output file (one owner per output, never an input);
    the inputs that pass, grouped by padded size. A failing input is settled here."""
    from .scale import check_scaled_output

    opts = run.opts
    groups: dict[tuple[int, int], list[FileResult]] = {}
    owners: dict[Path, Path] = {}
    for p in paths:
        r = FileResult(p)
        try:
            im = open_image(p, opts.max_pixels)
            w, h = im.size
            im.close()
            r.size = (h, w)
            if run.scale is not None:  # the output's size, from the header, before anything is decoded
                check_scaled_output(p, h, w, run.scale, opts.max_pixels, opts.side_by_side)
            r.output = output_path(run.out_dir, p)
            if r.output in owners:
                raise InputError(f"{p}: its output {r.output} would overwrite the output of {owners[r.output]} "
                                 "(same file name); rename one of them")
            done = check_output_file(r.output, p, opts.overwrite, run.protected, opts.skip_existing)
            owners[r.output] = p
        except AsapError as exc:
            tally.fail(r, exc.message)
            if tally.stopped:
                break
            continue
        if done:
            r.skipped, r.note = True, "skipped: its output exists (written by asap; --skip-existing)"
            tally.finish(r)
            continue
        groups.setdefault(run.cfg.padded_size(h, w), []).append(r)
    return groups


def _decode(r: FileResult, run: _Run) -> _Decoded:
    """The label map of `r` with its instance map and high-resolution map (when the run takes them),
    each checked against the label map's size; AsapError naming the file otherwise."""
    from .scale import scaled_size

    opts, cfg, scale = run.opts, run.cfg, run.scale
    lab = decode_label_map(r.input, cfg, run.palette, opts.max_pixels)
    inst = None
    if cfg.instance_edges:
        if opts.instances is None:
            raise InputError(f"{r.input}: this model uses instance maps: pass --instances FOLDER")
        ipath = match_by_name(r.input, Path(opts.instances), "instance map")
        inst = read_instance_map(ipath, opts.max_pixels)
        if inst.shape != lab.shape:
            raise InputError(f"{r.input}: its instance map {ipath} is {inst.shape[1]}x{inst.shape[0]}, "
                             f"the label map {lab.shape[1]}x{lab.shape[0]}")
    hi = None
    if opts.hires_labels is not None:
        hpath = match_by_name(r.input, Path(opts.hires_labels), "high-resolution label map")
        hi = decode_label_map(hpath, cfg, run.palette, opts.max_pixels)
        want = (scaled_size(lab.shape[0], scale), scaled_size(lab.shape[1], scale))
        if hi.shape != want:
            raise InputError(f"{r.input}: its high-resolution label map {hpath} is {hi.shape[1]}x"
                             f"{hi.shape[0]}; --scale {scale:g} of {lab.shape[1]}x{lab.shape[0]} "
                             f"needs {want[1]}x{want[0]}")
    return _Decoded(r, cfg.pad_to_tiles(lab), cfg.pad_to_tiles(inst) if inst is not None else None, hi)


def _decode_batch(batch: Sequence[FileResult], run: _Run, tally: _Tally) -> list[_Decoded]:
    """The inputs of `batch` that decode; each one that does not is settled with its message."""
    decoded = []
    for r in batch:
        try:
            decoded.append(_decode(r, run))
        except AsapError as exc:
            tally.fail(r, exc.message)
            if tally.stopped:
                break
    return decoded


def _run_batch(decoded: Sequence[_Decoded], run: _Run, tally: _Tally) -> list[np.ndarray] | None:
    """One Engine call for the batch -> an RGB image per input (cropped to its size when rendered at
    a scale); None when the call failed for these inputs (each settled with the message)."""
    engine, scale, renderer = run.engine, run.scale, run.renderer
    lab_b = np.stack([d.labels for d in decoded])
    inst_b = np.stack([d.instances for d in decoded]) if run.cfg.instance_edges else None
    try:
        if renderer is None:
            return engine.run(lab_b, inst_b, ids_checked=True)
        params = engine.predict_params(lab_b, inst_b, ids_checked=True)
        images = []
        for j, d in enumerate(decoded):  # sizes differ after cropping: one render per map
            h, w = d.result.size
            hj = d.hires[None] if d.hires is not None else None
            images.append(to_uint8(renderer.render(params[j:j + 1], lab_b[j:j + 1], scale, h, w, hj,
                                                   str(d.result.input), ids_checked=True))[0])
        return images
    except BundleError:
        raise  # the model itself is unusable (e.g. a graph ONNX Runtime refuses): not one input's fault
    except AsapError as exc:
        for d in decoded:
            tally.fail(d.result, f"{d.result.input}: {exc.message}")
            if tally.stopped:
                break
        return None


def _write_batch(decoded: Sequence[_Decoded], images, padded: tuple[int, int], run: _Run, tally: _Tally) -> None:
    """Crop (or take the rendered image), add the side-by-side map, write each output; settle each input."""
    opts, renderer = run.opts, run.renderer
    ph, pw = padded
    for j, d in enumerate(decoded):
        if tally.stopped:
            break
        r = d.result
        h, w = r.size
        img = crop(images[j], h, w) if renderer is None else images[j]
        notes = []
        if (ph, pw) != (h, w):
            notes.append(f"padded {w}x{h} -> {pw}x{ph} (reflect, multiples of S={run.cfg.S}), output cropped back")
        if renderer is not None:
            notes.append(f"rendered at scale {run.scale:g}: {img.shape[1]}x{img.shape[0]}")
        if opts.side_by_side:
            src = d.hires if d.hires is not None else crop(d.labels, h, w)
            left = run.palette.colourise(upscale_nearest(src, img.shape[0], img.shape[1]))
            img = np.concatenate([left, img], axis=1)
        try:
            # it may have appeared meanwhile
            if check_output_file(r.output, r.input, opts.overwrite, run.protected, opts.skip_existing):
                r.skipped, r.note = True, "skipped: its output appeared meanwhile (written by asap; --skip-existing)"
                tally.finish(r)
                continue
            _write(r.output, img)
            r.out_size = img.shape[:2]
        except AsapError as exc:
            r.error, r.output = exc.message, None
        r.note = "; ".join(notes) or None
        tally.finish(r)


def _batches(groups: dict[tuple[int, int], list[FileResult]], size: int):
    """(padded size, up to `size` inputs of that padded size), group by group."""
    for padded, members in groups.items():
        for i in range(0, len(members), size):
            yield padded, members[i:i + size]


def infer(inputs: Sequence[str | os.PathLike], source: Source, options: InferOptions, backend: str = "auto",
          progress: Callable[[int, int, FileResult], None] | None = None, engine=None,
          choice: Choice | None = None) -> InferSummary:
    """Run `asap infer`. `engine` (with `choice`) reuses an open Engine (the demo calls this in a loop)."""
    opts = options
    scale = _check_options(opts)
    paths, problems = discover_inputs(inputs)
    if not paths and not problems:
        raise UsageError("no inputs given")
    out_dir = Path(opts.out_dir)
    protected = input_identities(paths, source, opts)
    check_outputs_are_not_inputs(paths, out_dir, protected)
    created = check_out_dir(out_dir)
    try:
        return _infer(paths, problems, source, opts, backend, engine, choice, scale, out_dir, protected, progress)
    finally:
        remove_if_empty(created)


def _infer(paths, problems, source: Source, opts: InferOptions, backend: str, engine, choice: Choice | None,
           scale: float | None, out_dir: Path, protected, progress) -> InferSummary:
    """`infer` once its output folder exists: open the engine (unless given), then the two passes."""
    from .scale import ScaledRenderer

    if engine is None:
        choice = choose_backend(backend, source, opts.precision, scale)
        engine, bundle = open_engine(choice, source, opts.precision, opts.cpu_threads)
    else:
        bundle = getattr(engine, "bundle", None)
        choice = choice or Choice(engine.name, "engine given by the caller")
    palette = load_palette(opts.palette, engine.config, bundle.manifest if bundle is not None else None)
    renderer = ScaledRenderer(engine) if scale is not None and scale != 1 else None
    run = _Run(opts, out_dir, protected, engine, choice, palette, scale, renderer)

    tally = _Tally(len(paths) + len(problems), opts.fail_fast, progress)
    for spec, msg in problems:
        tally.finish(FileResult(Path(spec), error=msg))
        if tally.stopped:
            return tally.summary(choice)
    groups = _plan_outputs(paths, run, tally)
    # pass 2: per batch of the same padded size: decode, run, crop, write
    for padded, batch in _batches(groups, opts.batch_size):
        if tally.stopped:
            break
        decoded = _decode_batch(batch, run, tally)
        if not decoded or tally.stopped:
            continue
        images = _run_batch(decoded, run, tally)
        if images is not None:
            _write_batch(decoded, images, padded, run, tally)
    return tally.summary(choice)
