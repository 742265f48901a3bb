"""`asap compile-kernels`'s use case: which kernel variants the presets (or a config) need, compiled
ahead of time for the given architectures, and one row per compiled kernel for the report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..config import config_from
from ..plugins import aot

ROW_COLUMNS = ("arch", "kernel", "variant", "shared B", "warps", "hidden args")


@dataclass
class KernelsResult:
    out_dir: Path
    archs: list[int]  # compute capabilities, e.g. 86
    index: dict  # index.json

    @property
    def triton_version(self) -> str:
        return self.index["triton_version"]

    @property
    def count(self) -> int:
        return len(self.index["kernels"])

    def rows(self) -> list[tuple[str, ...]]:
        """One row of ROW_COLUMNS per kernel, read back from its metadata file."""
        rows = []
        for e in self.index["kernels"]:
            m = aot.load_metadata(self.out_dir / e["json"])
            what = (f"S={e['S']} params {e['params_dtype']} out {e['out_dtype']}" if e["kind"] == "spatial_mlp"
                    else f"{e['src_dtype']} -> fp16")
            rows.append((e["arch"], m["kernel_name"], what, str(m["shared"]), str(m["num_warps"]),
                         ", ".join(h["name"] for h in m["hidden_args"]) or "-"))
        return rows

    def arch_option(self) -> str:
        return ",".join(f"sm_{c}" for c in self.archs)


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def compile_for(out_dir: Path, arch: str, presets: Sequence[str], config: Path | None, params_dtype: str,
                out_dtype: str, *, overwrite: bool = False,
                progress: Callable[[str], None] | None = None) -> KernelsResult:
    """Compile the kernels of `presets` (or of the config file, which replaces them) for the
    comma-separated `arch`, `params_dtype` and `out_dtype` lists into `out_dir`."""
    archs = aot.parse_archs(arch)
    cfgs = [config_from(None, config)] if config else [config_from(p, None) for p in presets]
    variants = aot.variants_for(cfgs, params_dtypes=_split(params_dtype), out_dtypes=_split(out_dtype))
    index = aot.compile_kernels(archs, out_dir, variants, progress=progress, overwrite=overwrite)
    return KernelsResult(out_dir=out_dir, archs=archs, index=index)
