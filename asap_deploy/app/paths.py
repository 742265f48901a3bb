"""A path given where another kind of artifact is expected gets a hint naming the right option or
path (a checkpoint as --bundle: use --model; an ONNX file as --bundle: use its folder; a run folder
as a checkpoint: did you mean run/model.pt?). Only stats and reads a file's first bytes."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import AsapError, UsageError

# Checkpoint names a folder may hold (ours, then the authors' training runs).
CHECKPOINT_NAMES = ("model.pt", "latest_net_G.pth")


def _kind(path: Path) -> str | None:
    """The artifact kind of an existing path (app.inspect.detect_kind), or None when it cannot
    tell (missing, a folder of something else, unreadable): the loader then reports as before."""
    from .inspect import detect_kind

    if not os.path.lexists(path):
        return None
    try:
        kind, _ = detect_kind(path)
    except AsapError:
        return None
    return kind


def _checkpoint_in(folder: Path) -> Path | None:
    for name in CHECKPOINT_NAMES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth"))
    return found[0] if len(found) == 1 else None


def check_bundle_arg(option: str, path: Path | None, *, model_option: str | None = "--model") -> None:
    """UsageError with a hint when `path`, given as a bundle folder, is something else
    (`model_option`: the command's option for a checkpoint, if it has one)."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        if _kind(path) == "bundle":
            return
        ck = _checkpoint_in(path)
        if ck is not None:
            use = f"pass it as {model_option} {ck}, or " if model_option else ""
            raise UsageError(f"{option} {path}: a folder holding the checkpoint {ck}, not a bundle; {use}export it "
                             f"first: asap export {ck} -o BUNDLE")
        return  # the loader says what is missing
    kind = _kind(path)
    if kind in ("onnx", "engine") or path.name == "manifest.json":
        use = f"{option} {path.parent}" if option.startswith("--") else str(path.parent)
        raise UsageError(f"{option} {path}: a file of a bundle, not the bundle; pass its folder: {use}")
    if kind == "checkpoint":
        use = f"pass it as {model_option} {path}, or " if model_option else ""
        raise UsageError(f"{option} {path}: a checkpoint, not a bundle folder; {use}export it first: "
                         f"asap export {path} -o BUNDLE")


def check_checkpoint_arg(option: str, path: Path | None, *, bundle_option: str | None = "--bundle") -> None:
    """UsageError with a hint when `path`, given as a checkpoint file, is something else."""
    if path is None:
        return
    path = Path(path)
    kind = _kind(path)
    if path.is_dir():
        if kind == "bundle":
            where = f"pass it as {bundle_option} {path}" if bundle_option else "it is already exported"
            raise UsageError(f"{option} {path}: a bundle folder, not a checkpoint; {where}")
        ck = _checkpoint_in(path)
        if ck is not None:
            raise UsageError(f"{option} {path}: a folder, not a checkpoint file; did you mean {ck}?")
        return
    if kind in ("onnx", "engine") or path.name == "manifest.json":
        where = f"pass its folder as {bundle_option} {path.parent}" if bundle_option else \
            f"the bundle is {path.parent}"
        raise UsageError(f"{option} {path}: a file of a bundle (ONNX or engine), not a checkpoint; {where}")


def check_engine_arg(option: str, path: Path | None) -> None:
    """UsageError with a hint when `path`, given as an engine file, is a bundle folder or a checkpoint."""
    if path is None:
        return
    path = Path(path)
    kind = _kind(path)
    if kind == "bundle":
        raise UsageError(f"{option} {path}: a bundle folder, not an engine file; pass it as --bundle {path}")
    if kind == "onnx":
        raise UsageError(f"{option} {path}: an ONNX graph, not a TensorRT engine; pass its folder as --bundle "
                         f"{path.parent} (build engines with: asap build-engine {path.parent})")
    if kind == "checkpoint" and not path.name.endswith(".engine"):
        raise UsageError(f"{option} {path}: a checkpoint, not an engine file; pass it as --model {path}")
