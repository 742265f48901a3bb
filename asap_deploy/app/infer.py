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
from dataclasses import dataclass
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
    cpu_threads: int | None = None  # torch / ONNX Runtime threads (None: all cores; on Ray: per actor)


@dataclass
class FileResult:
    input: Path
    output: Path | None = None
    error: str | None = None
    note: str | None = None
    size: tuple[int, int] | None = None  # (H, W) of the input
    out_size: tuple[int, int] | None = None

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
        return [r for r in self.results if r.ok]

    @property
    def images_per_s(self) -> float:
        return len(self.written) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"backend": self.backend, "reason": self.reason, "skipped": self.skipped, "seconds": self.seconds,
                "images_per_s": self.images_per_s, "stopped_early": self.stopped_early,
                "files": [{"input": str(r.input), "output": str(r.output) if r.output else None, "error": r.error,
                           "note": r.note} for r in self.results]}


def check_out_dir(out_dir: Path) -> None:
    """Create the output folder, or OutputError (the whole run stops before any work) if it cannot
    be created or written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create the output folder ({exc.strerror})") from exc
    if not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder")
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise OutputError(f"{out_dir}: the output folder is not writable")


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


def check_output_file(out: Path, label: Path, overwrite: bool, protected: dict[tuple[int, int], Path]) -> None:
    """InputError (this input fails, the others go on) unless writing `out` loses nothing: absent,
    or --overwrite and a PNG asap wrote (is_our_png); never an input."""
    if not os.path.lexists(out):
        return
    ident = file_identity(out)
    if ident in protected:
        raise InputError(f"{label}: its output {out} would replace the input {protected[ident]}; choose another "
                         "output folder (-o)")
    if not overwrite:
        raise InputError(f"{label}: its output {out} already exists; pass --overwrite to replace it")
    if not is_our_png(out):
        raise InputError(f"{label}: its output {out} exists and was not written by asap (a symlink, a folder or "
                         "a file without asap's PNG signature); refusing to replace it: move it or choose another -o")


def _write(path: Path, img: np.ndarray) -> None:
    remove_stale_temps(path)
    try:
        write_png(path, img)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc


def infer(inputs: Sequence[str | os.PathLike], source: Source, options: InferOptions, backend: str = "auto",
          progress: Callable[[int, int, FileResult], None] | None = None, engine=None,
          choice: Choice | None = None) -> InferSummary:
    """Run `asap infer`. `engine` (with `choice`) reuses an open Engine (the demo calls this in a loop)."""
    from .scale import ScaledRenderer, check_scale, check_scaled_output, scaled_size

    opts = options
    if opts.batch_size < 1:
        raise UsageError(f"--batch must be >= 1 (got {opts.batch_size})")
    if opts.max_pixels < 1:
        raise UsageError(f"--max-pixels must be >= 1 (got {opts.max_pixels})")
    check_threads(opts.cpu_threads)
    scale = check_scale(opts.scale, opts.max_pixels) if opts.scale is not None else None
    if opts.hires_labels is not None and scale is None:
        raise UsageError("--hires-labels needs --scale K (the high-resolution maps are K times the input size)")
    paths, problems = discover_inputs(inputs)
    if not paths and not problems:
        raise UsageError("no inputs given")
    out_dir = Path(opts.out_dir)
    protected = input_identities(paths, source, opts)
    check_outputs_are_not_inputs(paths, out_dir, protected)
    check_out_dir(out_dir)
    if engine is None:
        choice = choose_backend(backend, source, opts.precision, scale)
        engine, bundle = open_engine(choice, source, opts.precision, opts.cpu_threads)
    else:
        bundle = getattr(engine, "bundle", None)
        choice = choice or Choice(engine.name, "engine given by the caller")
    cfg: ModelConfig = engine.config
    S = cfg.S  # noqa: N806
    palette = load_palette(opts.palette, cfg, bundle.manifest if bundle is not None else None)
    renderer = ScaledRenderer(engine) if scale is not None and scale != 1 else None

    t0 = time.perf_counter()
    results: list[FileResult] = []
    total = len(paths) + len(problems)
    done = [0]
    stopped = [False]

    def finish(r: FileResult) -> None:
        results.append(r)
        done[0] += 1
        if progress:
            progress(done[0], total, r)
        if not r.ok and opts.fail_fast:
            stopped[0] = True

    for spec, msg in problems:
        finish(FileResult(Path(spec), error=msg))
        if stopped[0]:
            return InferSummary(results, choice.backend, choice.reason, choice.skipped, time.perf_counter() - t0, True)

    # pass 1: headers -> groups of the same padded size; output names
    groups: dict[tuple[int, int], list[FileResult]] = {}
    owners: dict[Path, Path] = {}
    for p in paths:
        r = FileResult(p)
        try:
            im = open_image(p, opts.max_pixels)
            w, h = im.size
            im.close()
            r.size = (h, w)
            if scale is not None:  # the output's size, from the header, before anything is decoded
                check_scaled_output(p, h, w, scale, opts.max_pixels, opts.side_by_side)
            r.output = output_path(out_dir, p)
            if r.output in owners:
                raise InputError(f"{p}: its output {r.output} would overwrite the output of {owners[r.output]} "
                                 "(same file name); rename one of them")
            check_output_file(r.output, p, opts.overwrite, protected)
            owners[r.output] = p
        except AsapError as exc:
            r.error, r.output = exc.message, None
            finish(r)
            if stopped[0]:
                break
            continue
        groups.setdefault(cfg.padded_size(h, w), []).append(r)

    # pass 2: per batch of the same padded size: decode, run, crop, write
    for (ph, pw), members in groups.items():
        if stopped[0]:
            break
        for i in range(0, len(members), opts.batch_size):
            if stopped[0]:
                break
            batch = members[i:i + opts.batch_size]
            labels, insts, hires, ok = [], [], [], []
            for r in batch:
                try:
                    lab = decode_label_map(r.input, cfg, palette, opts.max_pixels)
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
                        hi = decode_label_map(hpath, cfg, palette, opts.max_pixels)
                        want = (scaled_size(lab.shape[0], scale), scaled_size(lab.shape[1], scale))
                        if hi.shape != want:
                            raise InputError(f"{r.input}: its high-resolution label map {hpath} is {hi.shape[1]}x"
                                             f"{hi.shape[0]}; --scale {scale:g} of {lab.shape[1]}x{lab.shape[0]} "
                                             f"needs {want[1]}x{want[0]}")
                except AsapError as exc:
                    r.error, r.output = exc.message, None
                    finish(r)
                    if stopped[0]:
                        break
                    continue
                labels.append(cfg.pad_to_tiles(lab))
                insts.append(cfg.pad_to_tiles(inst) if inst is not None else None)
                hires.append(hi)
                ok.append(r)
            if not ok or stopped[0]:
                continue
            lab_b = np.stack(labels)
            inst_b = np.stack(insts) if cfg.instance_edges else None
            try:
                if renderer is None:
                    images = engine.run(lab_b, inst_b, ids_checked=True)
                else:
                    params = engine.predict_params(lab_b, inst_b, ids_checked=True)
                    images = []
                    for j, r in enumerate(ok):  # sizes differ after cropping: one render per map
                        h, w = r.size
                        hj = hires[j][None] if hires[j] is not None else None
                        images.append(to_uint8(renderer.render(params[j:j + 1], lab_b[j:j + 1], scale, h, w, hj,
                                                               str(r.input), ids_checked=True))[0])
            except BundleError:
                raise  # the model itself is unusable (e.g. a graph ONNX Runtime refuses): not one input's fault
            except AsapError as exc:
                for r in ok:
                    r.error, r.output = f"{r.input}: {exc.message}", None
                    finish(r)
                    if stopped[0]:
                        break
                continue
            for j, r in enumerate(ok):
                if stopped[0]:
                    break
                h, w = r.size
                if renderer is None:
                    img = crop(images[j], h, w)
                else:
                    img = images[j]
                notes = []
                if (ph, pw) != (h, w):
                    notes.append(f"padded {w}x{h} -> {pw}x{ph} (reflect, multiples of S={S}), output cropped back")
                if renderer is not None:
                    notes.append(f"rendered at scale {scale:g}: {img.shape[1]}x{img.shape[0]}")
                if opts.side_by_side:
                    src = hires[j] if hires[j] is not None else crop(labels[j], h, w)
                    left = palette.colourise(upscale_nearest(src, img.shape[0], img.shape[1]))
                    img = np.concatenate([left, img], axis=1)
                try:
                    check_output_file(r.output, r.input, opts.overwrite, protected)  # it may have appeared meanwhile
                    _write(r.output, img)
                    r.out_size = img.shape[:2]
                except AsapError as exc:
                    r.error, r.output = exc.message, None
                r.note = "; ".join(notes) or None
                finish(r)
    return InferSummary(results, choice.backend, choice.reason, choice.skipped, time.perf_counter() - t0, stopped[0])
