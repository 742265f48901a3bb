"""The documented range of every numeric option, and the bounds on file arguments and folder walks.

Every command checks its options here, before any work, so that all of them fail alike: a
UsageError (exit 2) naming the option and its range, e.g. "--batch must be in 1..256 (got 0)".
NaN, infinities, negative and huge values are all "outside the range" (no allocation is ever sized
from an unchecked number). Folder walks and globs never follow a symlinked folder (no loop can
make them endless) and stop with an error after `MAX_WALK_ENTRIES` entries.
"""

from __future__ import annotations

import fnmatch
import glob
import math
import os
import stat
from pathlib import Path

from .errors import UsageError

MAX_SEED = 2**32 - 1            # numpy / torch seeds
MAX_PIXELS_CAP = 2**30          # the largest --max-pixels (1 Gpx: 3 GiB of uint8 RGB output)
MAX_SIDE = 65536                # a side of a size option (HxW), before the --max-pixels check
MAX_BATCH = 256
MAX_WALK_ENTRIES = 1_000_000    # folder entries one folder argument or glob may visit
MAX_JSON_BYTES = 16 * 2**20     # config and palette JSON files
THREADS_PER_CORE = 4


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def range_text(lo, hi, lo_open: bool = False, unit: str = "") -> str:
    """'1..256' or '(0, 3600]' (+ unit): how ranges read in errors and --help."""
    text = f"({_fmt(lo)}, {_fmt(hi)}]" if lo_open else f"{_fmt(lo)}..{_fmt(hi)}"
    return text + (f" {unit}" if unit else "")


def check_range(option: str, value, lo, hi, *, lo_open: bool = False, unit: str = "", why: str = ""):
    """`value` if lo <= value <= hi (lo < value with lo_open) and finite, else UsageError naming
    `option` and the range. Returns the value (ints stay ints)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and isinstance(value, float):
        ok = math.isfinite(value)
    if ok:
        ok = (lo < value if lo_open else lo <= value) and value <= hi
    if not ok:
        shown = _fmt(value) if isinstance(value, (int, float)) else repr(value)
        if isinstance(value, int) and len(shown) > 24:
            shown = shown[:10] + "..." + f" ({len(shown)} digits)"
        raise UsageError(f"{option} must be in {range_text(lo, hi, lo_open, unit)} (got {shown}){why}")
    return value


def check_optional(option: str, value, lo, hi, **kw):
    """check_range unless value is None (an option left at its default)."""
    return None if value is None else check_range(option, value, lo, hi, **kw)


def check_seed(option: str, value: int) -> int:
    return check_range(option, value, 0, MAX_SEED)


def check_max_pixels(option: str, value: int) -> int:
    return check_range(option, value, 1, MAX_PIXELS_CAP)


def cores() -> int:
    return os.cpu_count() or 1


def max_threads() -> int:
    """The most CPU threads an option may ask for: THREADS_PER_CORE x the cores here (far more
    threads than cores only thrash, and thousands of them exhaust memory or crash the runtime)."""
    return THREADS_PER_CORE * cores()


def check_threads(option: str, value: int | None) -> int | None:
    if value is None:
        return None
    return check_range(option, value, 1, max_threads(),
                       why=f"; the limit is {THREADS_PER_CORE} x the {cores()} cores here")


def parse_size(option: str, text: str, order: str = "HxW") -> tuple[int, int]:
    """'N' (square) or 'AxB' in `order` ('HxW' or 'WxH') -> (H, W), each side in 1..MAX_SIDE;
    UsageError naming the option otherwise."""
    t = str(text).strip().lower().replace(" ", "")
    parts = t.split("x") if "x" in t else [t, t]
    if len(parts) != 2 or not all(p.isdigit() and len(p) <= 12 for p in parts):
        raise UsageError(f"{option} {text!r}: expected {order} (e.g. 512x256) or N (a square), whole numbers")
    a, b = int(parts[0]), int(parts[1])
    h, w = (a, b) if order == "HxW" else (b, a)
    for side, v in (("height", h), ("width", w)):
        if not 1 <= v <= MAX_SIDE:
            raise UsageError(f"{option} {text!r}: the {side} must be in 1..{MAX_SIDE} (got {v})")
    return h, w


def check_pixels(option: str, what: str, pixels: int, max_pixels: int, limit_name: str = "--max-pixels") -> None:
    """UsageError unless `pixels` (of `what`, e.g. '4x1024x1024') is at most `max_pixels`."""
    if pixels > max_pixels:
        raise UsageError(f"{option} {what}: {pixels:,} pixels, more than {limit_name} {max_pixels:,}")


# ---- file arguments ---------------------------------------------------------------------------------
def check_file_arg(option: str, path, what: str = "file", error: type = UsageError, folder_ok: bool = False) -> Path:
    """`path` unless it exists and is not a regular file (nor a folder with `folder_ok`): a FIFO,
    device or socket would block or never end. Only stats the path: a missing file is left to its
    loader to report, large files (checkpoints) are read by their loaders, small ones with
    io.read_regular_file."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return p
    except OSError as exc:
        raise error(f"{option} {p}: cannot read the {what} ({exc.strerror or exc})") from exc
    if stat.S_ISREG(st.st_mode) or (folder_ok and stat.S_ISDIR(st.st_mode)):
        return p
    kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, device or socket)"
    raise error(f"{option} {p}: the {what} is {kind}")


def check_output_file(option: str, path, error: type = UsageError) -> Path:
    """An output file argument: its folder must exist, and the path must not be a folder, FIFO or
    device (the output would block or replace something that is not a file)."""
    p = Path(path)
    parent = p.parent
    if not parent.is_dir():
        raise error(f"{option} {p}: its folder {parent} does not exist or is not a folder")
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return p
    except OSError as exc:
        raise error(f"{option} {p}: cannot use it as an output ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{option} {p}: exists and is not a regular file")
    return p


# ---- folder walks and globs -------------------------------------------------------------------------
def _too_many(where: str) -> UsageError:
    return UsageError(f"{where}: more than {MAX_WALK_ENTRIES:,} folder entries to look through (the limit); "
                      "name a smaller folder or a narrower pattern")


def list_files(folder, suffixes: tuple[str, ...] | None = None, include_hidden: bool = False) -> list[Path]:
    """The regular files (or symlinks to regular files) directly in `folder` whose suffix is in
    `suffixes` (lower case, with the dot), sorted; never descends; stops after MAX_WALK_ENTRIES
    entries with a UsageError. FIFOs, devices and folders are skipped."""
    folder = Path(folder)
    out: list[Path] = []
    seen = 0
    with os.scandir(folder) as it:
        for e in it:
            seen += 1
            if seen > MAX_WALK_ENTRIES:
                raise _too_many(str(folder))
            if not include_hidden and e.name.startswith("."):
                continue
            if suffixes is not None and os.path.splitext(e.name)[1].lower() not in suffixes:
                continue
            try:
                if e.is_file():  # follows a symlink to a file; False for FIFOs, devices, folders
                    out.append(folder / e.name)
            except OSError:
                continue
    return sorted(out)


def _visible(name: str, pat: str) -> bool:
    """glob's rule: wildcards do not match a leading dot unless the pattern starts with one."""
    return not name.startswith(".") or pat.startswith(".")


def _match(pat: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    if not pat:
        return not parts
    if pat[0] == "**":
        if _match(pat[1:], parts):
            return True
        return bool(parts) and not parts[0].startswith(".") and _match(pat, parts[1:])
    return bool(parts) and _visible(parts[0], pat[0]) and fnmatch.fnmatchcase(parts[0], pat[0]) and _match(pat[1:], parts[1:])


def _may_lead(pat: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    """Can a path below the folder `parts` still match `pat`?"""
    if not parts:
        return True
    if not pat:
        return False
    if pat[0] == "**":
        return True if not parts[0].startswith(".") else _may_lead(pat[1:], parts)
    return _visible(parts[0], pat[0]) and fnmatch.fnmatchcase(parts[0], pat[0]) and _may_lead(pat[1:], parts[1:])


def glob_files(pattern: str) -> list[Path]:
    """The regular files matching a glob pattern (`*`, `?`, `[...]`, and `**` for any number of
    folders), sorted. Unlike glob.glob(recursive=True), a pattern with `**` never enters a symlinked
    folder, so a symlink loop cannot make it endless (without `**` the pattern's length bounds the
    depth, and symlinked folders are followed as glob does); the walk stops after MAX_WALK_ENTRIES entries with a
    UsageError naming the pattern."""
    parts = Path(pattern).parts
    i = 0
    while i < len(parts) and not glob.has_magic(parts[i]):
        i += 1
    root = os.path.join(*parts[:i]) if i else ""
    pat = tuple(p for p in parts[i:])
    pat = tuple(p for k, p in enumerate(pat) if not (p == "**" and k and pat[k - 1] == "**"))
    if not pat:
        return [Path(root)] if os.path.isfile(root) else []
    follow = "**" not in pat  # without **, the pattern's own length bounds the depth: symlinked folders are safe
    out: list[Path] = []
    seen = 0
    stack: list[tuple[str, tuple[str, ...]]] = [(root, ())]
    while stack:
        folder, rel = stack.pop()
        try:
            with os.scandir(folder or ".") as it:
                entries = list(it)
        except OSError:
            continue
        seen += len(entries)
        if seen > MAX_WALK_ENTRIES:
            raise _too_many(pattern)
        for e in entries:
            sub = rel + (e.name,)
            path = os.path.join(folder, e.name) if folder else e.name
            try:
                if e.is_dir(follow_symlinks=follow):
                    if _may_lead(pat, sub):
                        stack.append((path, sub))
                elif e.is_file() and _match(pat, sub):
                    out.append(Path(path))
            except OSError:
                continue
    return sorted(out)
