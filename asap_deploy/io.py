"""File I/O with validation and atomic writes. No torch here (inference-only installs use it)."""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import stat
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import InputError, OutputError

# Refuse images whose header declares more pixels than this before decoding them.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024


# Longest file name most file systems allow (bytes). Derived names (temp files, folder swaps)
# are shortened to fit, so that every legal output name works.
NAME_MAX = 255
# Temp names carry this tag + 12 hex digits: what remove_stale_temps may delete is provably ours.
TEMP_TAG = "asaptmp"
_TEMP_RE = re.compile(rf"\.(?P<base>.*)\.{TEMP_TAG}-[0-9a-f]{{12}}(?P<kind>\.partial|\.old)?(?P<suffix>\.[^.]*)?")

# Temp files and folders that atomic_path / staged_dir have named and not yet removed. An
# interrupt can land on any bytecode, including between creating a temp path and entering the
# block that removes it; the exit hook removes whatever such a race left behind.
_live_temps: set[Path] = set()


def _fit_name(name: str, room: int) -> str:
    """`name` cut (on a UTF-8 character boundary) to at most `room` bytes."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= room:
        return name
    return raw[:max(room, 0)].decode("utf-8", "ignore")


def derived_name(base: str, tail: str) -> str:
    """`base` + `tail` (an output named after an input: "x" + ".png", "bundle" + "-validation"),
    `base` shortened so that the name fits NAME_MAX bytes whatever the input's name."""
    return _fit_name(base, NAME_MAX - len(tail.encode("utf-8", "surrogateescape"))) + tail


def temp_name(target: Path, kind: str = "", suffix: str = "") -> Path:
    """A hidden sibling name for `target`, `.NAME.asaptmp-<hex><kind><suffix>`, at most NAME_MAX
    bytes whatever the length of NAME (NAME is shortened; the random part keeps it unique)."""
    tail = f".{TEMP_TAG}-{secrets.token_hex(6)}{kind}{suffix}"
    room = NAME_MAX - 1 - len(tail.encode("utf-8", "surrogateescape"))
    return target.parent / f".{_fit_name(target.name, room)}{tail}"


def remove_stale_temps(target: Path) -> None:
    """Remove temp files of `target` left by a killed run: only names temp_name makes for it
    (`.NAME.asaptmp-<12 hex>...`), never another file."""
    room = NAME_MAX - 1 - len(f".{TEMP_TAG}-000000000000{target.suffix or '.tmp'}".encode())  # as atomic_path
    base = _fit_name(target.name, room)
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return
    for e in entries:
        m = _TEMP_RE.fullmatch(e.name)
        if m and m["base"] in (target.name, base) and not m["kind"] and e.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(e.path)


def _remove(tmp: Path) -> None:
    try:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    except OSError:  # an exit hook must never print a traceback
        pass


@atexit.register
def _remove_live_temps() -> None:
    for tmp in list(_live_temps):
        _remove(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it over `path` only if the block succeeds.

    An OSError while creating, writing or renaming (unwritable folder, disk full) becomes an
    OutputError naming `path`; the temporary file is removed on every failure, Ctrl-C and SIGTERM
    included (the temp name is registered before the file exists; see _remove_live_temps).
    """
    path = Path(path)
    tmp = temp_name(path, suffix=suffix or path.suffix or ".tmp")
    _live_temps.add(tmp)
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # 0o666 through the umask: the result gets the permissions of any new file
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except OSError as exc:
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
        try:
            yield tmp
            os.replace(tmp, path)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc}); nothing was written") from exc
    finally:
        _remove(tmp)
        _live_temps.discard(tmp)


# ---- Ownership: the toolkit deletes or replaces only what it can prove it wrote -----------------
# A folder the toolkit owns (bundle, report, data set, run, model repository, kernel folder)
# carries MARKER: our signature, the folder's kind and the files we wrote there. A folder
# without it is never emptied; a file not listed in it is never replaced.
MARKER = ".asap-deploy.json"
SIGNATURE = "asap-deploy"
MARKER_SCHEMA = 1
MAX_MARKER_BYTES = 1 << 20


def _plain_relpath(name: object) -> bool:
    """A relative name without `..`; a trailing "/" names a whole sub-folder."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name or "\0" in name:
        return False
    return all(part not in ("", ".", "..") for part in name.removesuffix("/").split("/"))


def _listed(name: str, files) -> bool:
    """Whether the marker list `files` covers `name` (listed itself, or under a listed "dir/")."""
    return name in files or any(f.endswith("/") and name.startswith(f) for f in files)


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The ownership marker of `folder` if it is a valid one of ours (a regular file, our
    signature, a list of plain relative names); None otherwise (a foreign folder)."""
    path = Path(folder) / MARKER
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_MARKER_BYTES:
            return None
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    if (not isinstance(obj, dict) or obj.get("tool") != SIGNATURE or obj.get("schema") != MARKER_SCHEMA
            or not isinstance(obj.get("kind"), str) or not isinstance(obj.get("files"), list)
            or not all(_plain_relpath(f) for f in obj["files"])):
        return None
    return obj


def _write_marker(folder: Path, kind: str, files) -> None:
    from . import __version__

    write_json(folder / MARKER, {"tool": SIGNATURE, "schema": MARKER_SCHEMA, "kind": kind,
                                 "version": __version__, "files": sorted(set(files))})


def folder_files(folder: Path, limit: int = 100_000) -> list[str]:
    """Relative names of everything under `folder` that is not a folder (symlinks are not
    followed: a link is an entry itself), MARKER excluded; bounded."""
    out: list[str] = []
    stack = [(folder, "")]
    while stack:
        d, rel = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                name = f"{rel}{e.name}"
                if e.is_dir(follow_symlinks=False):
                    stack.append((Path(e.path), name + "/"))
                elif name != MARKER:
                    out.append(name)
                if len(out) > limit:
                    raise OutputError(f"{folder}: more than {limit} files; refusing to treat it as an output folder")
    return out


def file_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_not_input(output: str | os.PathLike, inputs, what: str = "output") -> None:
    """Refuse (OutputError) an output that is one of `inputs` or holds one (a folder output):
    resolved real paths (symlinks followed) and device/inode (hard links) are compared, so no
    spelling of a path lets an output replace an input, --overwrite or not."""
    out = Path(output)
    real_out = Path(os.path.realpath(out))
    ident = file_identity(out)
    for src in inputs:
        if src is None:
            continue
        src = Path(src)
        real_src = Path(os.path.realpath(src))
        if _inside(real_src, real_out) or (ident is not None and ident == file_identity(src)):
            raise OutputError(f"{out}: the {what} would replace the input {src}; choose another output "
                              "(an output never replaces an input, even with --overwrite)")


def owned_folder(target: str | os.PathLike, kind: str, what: str) -> tuple[dict | None, list[str]]:
    """(marker, files present) of a folder the toolkit may write its `kind` into; OutputError unless
    `target` is absent, empty, or carries our marker of that `kind` (a folder of someone else's
    files is never written into or emptied)."""
    target = Path(target)
    if not os.path.lexists(target):
        return None, []
    if target.is_symlink() or not target.is_dir():
        raise OutputError(f"{target}: exists and is not a folder; refusing to write the {what} there")
    try:
        present = folder_files(target)
        if not present and not os.path.lexists(target / MARKER) and not any(target.iterdir()):
            return None, []
    except OSError as exc:
        raise OutputError(f"{target}: cannot read the folder ({exc.strerror or exc})") from exc
    marker = read_marker(target)
    if marker is None:
        raise OutputError(f"{target}: holds files asap did not write (no valid {MARKER} marker); refusing to "
                          f"write the {what} there: choose another folder or empty it yourself")
    if marker["kind"] != kind:
        raise OutputError(f"{target}: holds a {marker['kind']} written by asap, not a {kind}; refusing to "
                          f"write the {what} there: choose another folder")
    return marker, present


def check_replaceable(target: str | os.PathLike, kind: str, what: str, inputs=()) -> None:
    """Raise OutputError unless writing the `kind` folder `target` in one piece loses nothing:
    `target` is absent, an empty folder, or a folder whose marker says `kind` and lists every file
    in it. Callers check --overwrite first; this holds with --overwrite too."""
    target = Path(target)
    check_not_input(target, inputs, what)
    marker, present = owned_folder(target, kind, what)
    foreign = sorted(f for f in present if marker is not None and not _listed(f, marker["files"]))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputError(f"{target}: holds files asap did not write ({shown}); refusing to replace the "
                          f"{what}: move them out or choose another folder")


def owns_file(path: str | os.PathLike) -> bool:
    """True if `path` is listed in its folder's marker (the toolkit wrote it there)."""
    path = Path(path)
    marker = read_marker(path.parent)
    return marker is not None and _listed(path.name, marker["files"])


def check_file_replaceable(path: str | os.PathLike, what: str, overwrite: bool, inputs=()) -> None:
    """Refuse (OutputError) to write the file `path` if that would lose anything: an existing
    `path` is replaced only with --overwrite and only if its folder's marker lists it (we wrote
    it); an output never replaces an input."""
    path = Path(path)
    check_not_input(path, inputs, what)
    if not os.path.lexists(path):
        return
    if not overwrite:
        raise OutputError(f"{path}: the {what} already exists; pass --overwrite to replace it")
    if path.is_symlink() or not path.is_file():
        raise OutputError(f"{path}: exists and is not a regular file; refusing to replace it with the {what}")
    if not owns_file(path):
        raise OutputError(f"{path}: exists and was not written by asap (not listed in {path.parent / MARKER}); "
                          f"refusing to replace it with the {what}: move it or choose another output")


def claim_files(folder: str | os.PathLike, kind: str, names) -> None:
    """Record in `folder`'s marker that the toolkit wrote `names` there (the marker is created
    with `kind` if the folder has none; an existing marker keeps its kind)."""
    folder = Path(folder)
    marker = read_marker(folder)
    files = set(marker["files"]) if marker else set()
    new = {str(n) for n in names}
    if new <= files:
        return
    _write_marker(folder, marker["kind"] if marker else kind, files | new)


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike, what: str, kind: str | None = None, inputs=()) -> Iterator[Path]:
    """Yield a hidden temporary folder next to `target`; rename it over `target` (replace_dir) only
    if the block succeeds, and remove it on every failure, interrupts included (as atomic_path).
    The folder gets an ownership marker of `kind` (default: `what`) listing what the block wrote;
    an existing `target` is replaced only if check_replaceable allows it (checked before and again
    just before the swap). An OSError (unwritable folder, disk full, file size limit) becomes an
    OutputError naming `target`: typed, and nothing is left behind."""
    target = Path(target)
    kind = kind or what
    check_replaceable(target, kind, what, inputs)
    tmp = temp_name(target, kind=".partial")
    _live_temps.add(tmp)
    try:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        except OSError as exc:
            raise OutputError(f"{target}: cannot create the {what} folder ({exc.strerror or exc})") from exc
        try:
            yield tmp
            _write_marker(tmp, kind, folder_files(tmp))
            check_replaceable(target, kind, what, inputs)  # the folder may have changed meanwhile
            replace_dir(tmp, target)
        except OSError as exc:
            raise OutputError(f"{target}: cannot write the {what} ({exc.strerror or exc}); nothing was written") from exc
    finally:
        _remove(tmp)
        _live_temps.discard(tmp)


def replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing target is moved aside first and removed after. If the
    second rename fails or is interrupted (Ctrl-C, SIGTERM), the old target is put back."""
    old = None
    try:
        if os.path.lexists(target):
            old = temp_name(target, kind=".old")
            os.replace(target, old)
        os.replace(new, target)
    except BaseException:
        if old is not None and os.path.lexists(old) and not os.path.lexists(target):
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_regular_file(path: str | os.PathLike, what: str, max_bytes: int, error: type = InputError,
                      follow_symlinks: bool = True) -> bytes:
    """The bytes of a file argument, refused (`error`, naming the file) unless it is a regular file
    (not a folder, FIFO, device or socket: those hang or never end) of at most `max_bytes`.
    `follow_symlinks=False` refuses a symbolic link itself (files that must lie inside a folder)."""
    path = Path(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)  # a FIFO must not block the open
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise error(f"{path}: the {what} is a symbolic link; refused (it must lie inside its folder)") from exc
        raise error(f"{path}: cannot read the {what} ({exc.strerror or exc})") from exc
    try:
        st = os.fstat(fd)  # checked on the open file: no swap between check and read
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise error(f"{path}: the {what} is not a regular file")
        with os.fdopen(fd, "rb") as f:
            if st.st_size > max_bytes:
                raise error(f"{path}: the {what} is {st.st_size} bytes, more than the limit of {max_bytes}")
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror or exc})") from exc
    if len(data) > max_bytes:
        raise error(f"{path}: the {what} is more than the limit of {max_bytes} bytes")
    return data


def sigterm_as_interrupt(signum, frame):
    """A SIGTERM handler raising KeyboardInterrupt, so a terminated command cleans up as on Ctrl-C
    (atomic writes remove their temp files; servers stop cleanly)."""
    raise KeyboardInterrupt


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def cache_root() -> Path:
    """asap-deploy's folder in the user's cache ($XDG_CACHE_HOME or ~/.cache): kernel cache,
    TensorRT-RTX library link."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "asap-deploy"


def _cv2():
    import cv2

    return cv2


def _header_size(path: Path, max_pixels: int) -> tuple[int, int] | None:
    """(width, height) declared by an image file's header, without decoding pixels (PNG read here,
    other formats through Pillow's lazy open); None if the format is not recognised."""
    size = _png_size(path)
    if size is not None:
        return size
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a base dependency
        return None
    try:
        with Image.open(path) as im:
            return im.size
    except Image.DecompressionBombError as exc:  # more pixels than Pillow itself opens
        raise InputError(f"{path}: the image header declares more pixels than Pillow decodes "
                         f"({2 * (Image.MAX_IMAGE_PIXELS or 0)}; limit {max_pixels}): {exc}") from exc
    except (OSError, SyntaxError, ValueError):
        return None  # not an image Pillow knows: OpenCV decides below


def _png_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from a PNG header, or None if the file is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a photo unchanged with OpenCV (bit depth and channels kept, BGR), with errors naming
    the file. Label and instance maps go through Pillow (read_ids_or_rgb), which keeps palette
    indices."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    size = _header_size(path, max_pixels)  # refuse absurd sizes before any pixel buffer is allocated
    if size is not None and size[0] * size[1] > max_pixels:
        raise InputError(f"{path}: {size[0]}x{size[1]} pixels exceeds the limit of {max_pixels} pixels")
    cv2 = _cv2()
    data = np.fromfile(path, dtype=np.uint8)  # np.fromfile + imdecode: non-ASCII paths work
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None or img.size == 0:
        raise InputError(f"{path}: cannot decode the image (corrupt, truncated or not an image)")
    if img.shape[0] * img.shape[1] > max_pixels:
        raise InputError(f"{path}: {img.shape[1]}x{img.shape[0]} pixels exceeds the limit of {max_pixels} pixels")
    return img


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow is a base dependency
        from .errors import MissingDependencyError

        raise MissingDependencyError("reading label maps needs Pillow: pip install pillow") from exc
    return Image


def open_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS):
    """A Pillow image with only its header read (size known, no pixels decoded), after the checks
    that need no pixels: exists, readable, not empty, at most `max_pixels`. InputError naming it."""
    Image = _pil()  # noqa: N806
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        im = Image.open(path)
    except Image.DecompressionBombError as exc:  # the header declares more than 2x Pillow's own limit
        raise InputError(f"{path}: the image header declares more pixels than Pillow decodes "
                         f"({2 * (Image.MAX_IMAGE_PIXELS or 0)}; --max-pixels {max_pixels}): {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the image ({exc})") from exc
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise InputError(f"{path}: {w}x{h} pixels exceeds the limit of {max_pixels} pixels")
    if w == 0 or h == 0:
        im.close()
        raise InputError(f"{path}: empty image ({w}x{h})")
    return im


def read_ids_or_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A label or instance map, header checked before any pixel is decoded: (H, W) ids (8-bit
    gray or palette PNG: uint8, the palette indices are the ids; 16-bit: int32), or (H, W, 3) uint8
    RGB for a colour image (one whose pixels are all gray, R = G = B, is read as ids)."""
    Image = _pil()  # noqa: N806
    path = Path(path)
    open_image(path, max_pixels).close()
    try:
        with Image.open(path) as im:
            im.load()
            a = _pil_array(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"{path}: cannot decode the image (corrupt or truncated: {exc})") from exc
    if a.ndim == 3 and np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2]):
        a = np.ascontiguousarray(a[..., 0])
    return a


def _pil_array(im) -> np.ndarray:
    mode = im.mode
    if mode in ("P", "PA"):  # palette images: the indices are the ids
        return np.array(im if mode == "P" else im.getchannel(0))
    if mode == "1":
        return np.array(im).astype(np.uint8)
    if mode == "LA":
        return np.array(im.getchannel(0))
    if mode in ("L", "I", "I;16", "I;16B", "I;16L", "I;16N"):
        a = np.array(im)
        return a if a.dtype == np.uint8 else a.astype(np.int32)
    return np.array(im if mode == "RGB" else im.convert("RGB"))


def read_label_map(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A label-id map (8/16-bit gray or palette PNG) -> (H, W) ids; colour maps need a palette
    (infer.decode_label_map)."""
    a = read_ids_or_rgb(path, max_pixels)
    if a.ndim == 3:
        raise InputError(f"{path}: a colour image, expected label ids (8/16-bit gray or palette PNG)")
    return a


def read_instance_map(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An instance-id map (8/16-bit gray) -> (H, W) int32."""
    a = read_ids_or_rgb(path, max_pixels)
    if a.ndim != 2:
        raise InputError(f"{path}: instance maps must be single-channel 8- or 16-bit ids, got {a.shape[2]} channels")
    return a.astype(np.int32)


def read_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A photo -> (H, W, 3) uint8 RGB."""
    img = read_image(path, max_pixels)
    cv2 = _cv2()
    if img.dtype != np.uint8:
        img = (img / 257).round().astype(np.uint8) if img.dtype == np.uint16 else img.astype(np.uint8)
    if img.ndim == 2:
        return np.repeat(img[..., None], 3, axis=2)
    if img.shape[2] == 4:
        img = img[..., :3]
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


# Every PNG the toolkit writes carries this tEXt chunk: `asap infer --overwrite` replaces an
# existing output only if it is one of ours (ownership without a shared list that parallel
# writers, e.g. Ray actors, would have to update).
PNG_SOFTWARE = b"Software\0asap-deploy"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def sign_png(data: bytes) -> bytes:
    """PNG bytes with our Software tEXt chunk inserted right after IHDR."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    end = 8 + 8 + int.from_bytes(data[8:12], "big") + 4
    return data[:end] + _png_chunk(b"tEXt", PNG_SOFTWARE) + data[end:]


def is_our_png(path: str | os.PathLike) -> bool:
    """True if `path` is a regular file holding a PNG that the toolkit wrote (its tEXt chunk before
    the image data says so). Reads at most a few KB."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return False
        with open(path, "rb") as f:
            head = f.read(8)
            if head != b"\x89PNG\r\n\x1a\n":
                return False
            for _ in range(16):  # the chunks before IDAT
                hdr = f.read(8)
                if len(hdr) < 8:
                    return False
                size, kind = int.from_bytes(hdr[:4], "big"), hdr[4:]
                if kind == b"IDAT" or size > 1 << 16:
                    return False
                data = f.read(size)
                f.read(4)
                if kind == b"tEXt" and data == PNG_SOFTWARE:
                    return True
    except OSError:
        return False
    return False


def write_png(path: str | os.PathLike, img: np.ndarray) -> Path:
    """Write (H, W) ids or (H, W, 3) RGB uint8 as PNG (signed as ours: is_our_png), atomically."""
    cv2 = _cv2()
    arr = np.ascontiguousarray(img)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise InputError(f"{path}: could not encode PNG from array of shape {img.shape} and dtype {img.dtype}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(sign_png(buf.tobytes()))
    return Path(path)


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    """[-1, 1] float -> uint8 with (x+1)/2*255, rounded and clipped."""
    return np.clip(np.rint((rgb.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
