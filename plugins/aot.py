"""Ahead-of-time compilation of the fused kernel (and its re-pack pre-pass) for CUDA GPUs, on a
machine WITHOUT a GPU: `triton.compile(ASTSource, target=GPUTarget("cuda", cc, 32))` per
architecture, with the ptxas that ships in the Triton wheel.

Writes, per (kernel variant, architecture): `<stem>.cubin`, `<stem>.ptx` and `<stem>.json`
(metadata: entry name, argument list with types, the hidden trailing arguments Triton appends,
launch grid rule, block size, num_warps, shared memory, Triton version, hashes); and `index.json`
listing them all. The launcher (plugins/launcher.py) needs only these files and the CUDA driver.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from asap_deploy.config import ModelConfig
from asap_deploy.errors import KernelError, MissingDependencyError, UsageError
from asap_deploy.io import atomic_path, write_json

from .torch_op import KernelSpec, kernel_spec

SCHEMA_VERSION = 1
DEFAULT_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
KNOWN_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_100", "sm_120")
PARAM_DTYPES = ("fp16", "fp32")
OUT_DTYPES = ("fp32", "fp16", "u8")
POINTER_ALIGN = 16  # bytes: the compiled code assumes every pointer argument is 16-byte aligned
REPACK_BLOCK_T, REPACK_BLOCK_C = 32, 64
_TYPE_BYTES = {"i32": 4, "u32": 4, "i64": 8, "fp32": 4}  # scalars; pointers are 8 bytes


def _triton():
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        raise MissingDependencyError("compiling the fused kernel needs Triton: pip install 'asap-deploy[gpu]'") from exc
    return triton, GPUTarget, ASTSource


def parse_archs(text: str | Sequence[str]) -> list[int]:
    """'sm_80,sm_90' (or 80, 'sm90', '8.6') -> [80, 90]; UsageError naming the bad item."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if str(t).strip()]
    if not items:
        raise UsageError("no architecture given; e.g. --arch sm_80,sm_86,sm_89,sm_90")
    out = []
    for item in items:
        m = re.fullmatch(r"(?:sm_?)?(\d+)(?:\.(\d))?", str(item).lower())
        if not m:
            raise UsageError(f"bad architecture {item!r}: write it as sm_XY (known: {', '.join(KNOWN_ARCHS)})")
        cc = int(m.group(1)) * 10 + int(m.group(2)) if m.group(2) else int(m.group(1))
        if cc < 75:
            raise UsageError(f"architecture sm_{cc} is too old for the fused kernel (fp16 tensor-core dots): "
                             f"use sm_75 or newer")
        if cc not in out:
            out.append(cc)
    return out


@dataclass(frozen=True)
class Variant:
    """One compiled kernel: compile-time constants + pointer element types."""

    spec: KernelSpec
    params_dtype: str = "fp16"
    out_dtype: str = "fp32"
    ids_dtype: str = "i32"  # TensorRT hands the plugin INT32 ids
    extra_dtype: str = "fp32"

    @property
    def stem(self) -> str:
        s = self.spec
        return (f"asap_spatial_mlp_S{s.S}_h{s.HID}x{s.N_HIDDEN}_o{s.OUT}_e{s.EXTRA}_"
                f"p{self.params_dtype}_y{self.out_dtype}_b{s.BLOCK_P}x{s.ITERS}_w{s.num_warps}")

    def signature(self) -> dict[str, str]:
        from .kernel import CONSTEXPR_ARGS, SCALAR_ARGS

        sig = {"ids_ptr": f"*{self.ids_dtype}", "params_ptr": f"*{self.params_dtype}",
               "extra_ptr": f"*{self.extra_dtype}"}
        sig.update({name: "i32" for name in SCALAR_ARGS})
        sig["out_ptr"] = "*u8" if self.out_dtype == "u8" else f"*{self.out_dtype}"
        sig.update({name: "constexpr" for name in CONSTEXPR_ARGS})
        return sig

    def constexprs(self) -> dict:
        c = self.spec.constexprs()
        c["OUT_U8"] = self.out_dtype == "u8"
        return c


def variants_for(configs: Iterable[ModelConfig], params_dtypes: Sequence[str] = PARAM_DTYPES,
                 out_dtypes: Sequence[str] = ("fp32", "fp16"), **spec_kw) -> list[Variant]:
    for d in params_dtypes:
        if d not in PARAM_DTYPES:
            raise UsageError(f"parameter dtype {d!r} is not one of {', '.join(PARAM_DTYPES)}")
    for d in out_dtypes:
        if d not in OUT_DTYPES:
            raise UsageError(f"output dtype {d!r} is not one of {', '.join(OUT_DTYPES)}")
    out: list[Variant] = []
    for cfg in configs:
        for pd in params_dtypes:
            for od in out_dtypes:
                v = Variant(kernel_spec(cfg, out_u8=od == "u8", **spec_kw), pd, od)
                if v not in out:
                    out.append(v)
    return out


def ptx_entry_params(ptx: str, entry: str) -> list[dict]:
    """The .param list of `.entry <entry>(...)` in PTX text: [{'name', 'type', 'bytes'}]."""
    m = re.search(r"\.entry\s+" + re.escape(entry) + r"\s*\((.*?)\)", ptx, re.S)
    if not m:
        raise KernelError(f"the PTX has no entry {entry!r}")
    params = []
    for line in m.group(1).split(","):
        line = line.strip()
        if not line:
            continue
        pm = re.match(r"\.param\s+\.([us]\d+|b\d+|f\d+)\b.*?(\S+)$", line)
        if not pm:
            raise KernelError(f"cannot read the PTX parameter {line!r}")
        bits = int(re.sub(r"\D", "", pm.group(1)))
        params.append({"name": pm.group(2), "type": pm.group(1), "bytes": bits // 8,
                       "pointer": ".ptr" in line})
    return params


def _hidden_args(md) -> list[dict]:
    """Trailing arguments Triton appends to every kernel (3.x: global scratch, and from 3.5 on
    profile scratch), read from the compiled kernel's metadata."""
    hidden = []
    for name in ("global_scratch", "profile_scratch"):
        if hasattr(md, f"{name}_size"):
            size = int(getattr(md, f"{name}_size"))
            if size > 0:
                raise KernelError(f"the compiled kernel asks for {size} bytes of {name} per program; the "
                                  f"driver-only launcher passes null scratch pointers and cannot run it")
            hidden.append({"name": name, "type": "*i8", "value": 0,
                           "size_per_program": size, "align": int(getattr(md, f"{name}_align", 1))})
    return hidden


def _compile(fn, signature: dict, constexprs: dict, cc: int, num_warps: int, num_stages: int):
    triton, GPUTarget, ASTSource = _triton()  # noqa: N806
    names = list(signature)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if signature[n].startswith("*")}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    try:
        return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True})
    except Exception as exc:  # noqa: BLE001 - Triton raises many types; re-raised typed, with the cause
        raise KernelError(f"Triton {triton.__version__} failed to compile {fn.__name__} for sm_{cc}: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc


def _describe(ck, signature: dict, constexprs: dict, cc: int, grid_rule: dict, kind: str) -> dict:
    triton, _, _ = _triton()
    md = ck.metadata
    runtime = [{"name": n, "type": t, "bytes": 8 if t.startswith("*") else _TYPE_BYTES[t]}
               for n, t in signature.items() if t != "constexpr"]
    hidden = _hidden_args(md)
    ptx = ck.asm["ptx"]
    ptx_params = ptx_entry_params(ptx, md.name)
    if len(ptx_params) != len(runtime) + len(hidden):
        raise KernelError(f"{md.name}: the PTX entry takes {len(ptx_params)} parameters but the signature has "
                          f"{len(runtime)} plus {len(hidden)} hidden: this Triton version appends arguments "
                          f"the launcher does not know")
    for arg, p in zip(runtime + hidden, ptx_params):
        if (8 if arg["type"].startswith("*") else arg.get("bytes", 8)) != p["bytes"]:
            raise KernelError(f"{md.name}: argument {arg['name']} is {p['bytes']} bytes in the PTX")
    ptx_ver = re.search(r"^\.version\s+(\S+)", ptx, re.M)
    return {
        "schema": SCHEMA_VERSION,
        "kind": kind,
        "kernel_name": md.name,
        "arch": f"sm_{cc}",
        "cc": cc,
        "target": {"backend": "cuda", "arch": cc, "warp_size": 32},
        "triton_version": triton.__version__,
        "ptx_version": ptx_ver.group(1) if ptx_ver else None,
        "ptx_target": (re.search(r"^\.target\s+(\S+)", ptx, re.M) or [None, None])[1],
        "args": runtime,
        "hidden_args": hidden,
        "ptx_params": ptx_params,
        "constexprs": {k: (int(v) if isinstance(v, bool) else v) for k, v in constexprs.items()},
        "num_warps": md.num_warps,
        "num_ctas": getattr(md, "num_ctas", 1),
        "num_stages": md.num_stages,
        "block": [md.num_warps * 32, 1, 1],
        "shared": md.shared,
        "grid_rule": grid_rule,
        "pointer_align": POINTER_ALIGN,
        "launch_cooperative_grid": bool(getattr(md, "launch_cooperative_grid", False)),
        "launch_pdl": bool(getattr(md, "launch_pdl", False)),
        "hash": md.hash,
    }


def _write(out_dir: Path, stem: str, ck, meta: dict) -> dict:
    cubin, ptx = ck.asm["cubin"], ck.asm["ptx"]
    files = {"cubin": f"{stem}.cubin", "ptx": f"{stem}.ptx"}
    with atomic_path(out_dir / files["cubin"]) as tmp:
        tmp.write_bytes(cubin)
    with atomic_path(out_dir / files["ptx"]) as tmp:
        tmp.write_text(ptx, encoding="utf-8")
    meta = dict(meta, files=files, sha256={"cubin": hashlib.sha256(cubin).hexdigest(),
                                            "ptx": hashlib.sha256(ptx.encode()).hexdigest()})
    write_json(out_dir / f"{stem}.json", meta)
    return meta


def compile_variant(variant: Variant, cc: int, out_dir: str | Path) -> dict:
    """Compile one variant for sm_<cc> into out_dir; return its metadata."""
    from .kernel import spatial_mlp

    s = variant.spec
    sig, cons = variant.signature(), variant.constexprs()
    ck = _compile(spatial_mlp, sig, cons, cc, s.num_warps, s.num_stages)
    rule = {"x": "N * (H / S) * (W / S) * programs_per_tile", "y": "1", "z": "1",
            "S": s.S, "programs_per_tile": s.programs_per_tile, "pixels_per_program": s.pixels_per_program}
    meta = _describe(ck, sig, cons, cc, rule, "spatial_mlp")
    meta["variant"] = {"params_dtype": variant.params_dtype, "out_dtype": variant.out_dtype,
                       "ids_dtype": variant.ids_dtype, "extra_dtype": variant.extra_dtype}
    meta["params_per_tile"] = {"rule": "(n_lab + EXTRA + 4*LOG2S + 1)*HID + N_HIDDEN*(HID+1)*HID + (HID+1)*OUT"}
    return _write(Path(out_dir), f"{variant.stem}_sm{cc}", ck, meta)


def compile_repack(src_dtype: str, cc: int, out_dir: str | Path, num_warps: int = 4) -> dict:
    """Compile the re-pack pre-pass ((N,P,h,w) any dtype -> (N*h*w, P) fp16) for sm_<cc>."""
    from .kernel import asap_repack_params, repack

    del asap_repack_params
    sig = {"src_ptr": f"*{src_dtype}", "s_sn": "i32", "s_sc": "i32", "s_sy": "i32", "s_sx": "i32", "P": "i32",
           "n_tiles_h": "i32", "n_tiles_w": "i32", "n_tiles": "i32", "dst_ptr": "*fp16",
           "BLOCK_T": "constexpr", "BLOCK_C": "constexpr"}
    cons = {"BLOCK_T": REPACK_BLOCK_T, "BLOCK_C": REPACK_BLOCK_C}
    ck = _compile(repack, sig, cons, cc, num_warps, 1)
    rule = {"x": f"ceil(n_tiles / {REPACK_BLOCK_T})", "y": f"ceil(P / {REPACK_BLOCK_C})", "z": "1",
            "BLOCK_T": REPACK_BLOCK_T, "BLOCK_C": REPACK_BLOCK_C}
    meta = _describe(ck, sig, cons, cc, rule, "repack")
    meta["variant"] = {"src_dtype": src_dtype, "dst_dtype": "fp16"}
    return _write(Path(out_dir), f"asap_repack_params_{src_dtype}_sm{cc}", ck, meta)


def compile_kernels(archs: Sequence[int], out_dir: str | Path, variants: Sequence[Variant],
                    repack_dtypes: Sequence[str] = PARAM_DTYPES,
                    progress: Callable[[str], None] | None = None, overwrite: bool = True) -> dict:
    """Compile every variant (and the re-pack pre-pass) for every architecture; write index.json.
    Needs Triton, no GPU. `overwrite=False` (the CLI's default) refuses a folder holding an index.json."""
    out_dir = Path(out_dir)
    if not overwrite:
        from asap_deploy.io import refuse_existing

        refuse_existing([out_dir / "index.json"], "kernel folder (index.json)")
    triton, _, _ = _triton()
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for cc in archs:
        for v in variants:
            if progress:
                progress(f"sm_{cc} {v.stem}")
            m = compile_variant(v, cc, out_dir)
            entries.append({"kind": "spatial_mlp", "arch": m["arch"], "json": f"{v.stem}_sm{cc}.json",
                            "S": v.spec.S, "HID": v.spec.HID, "N_HIDDEN": v.spec.N_HIDDEN, "OUT": v.spec.OUT,
                            "EXTRA": v.spec.EXTRA, **m["variant"]})
        for d in repack_dtypes:
            if progress:
                progress(f"sm_{cc} repack {d}")
            m = compile_repack(d, cc, out_dir)
            entries.append({"kind": "repack", "arch": m["arch"], "json": f"asap_repack_params_{d}_sm{cc}.json",
                            **m["variant"]})
    index = {"schema": SCHEMA_VERSION, "triton_version": triton.__version__, "kernels": entries}
    write_json(out_dir / "index.json", index)
    return index


def load_metadata(path: str | Path) -> dict:
    """Read one kernel's JSON and check it is a schema this launcher knows."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise KernelError(f"{path}: cannot read kernel metadata: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA_VERSION:
        raise KernelError(f"{path}: kernel metadata schema {meta.get('schema') if isinstance(meta, dict) else '?'} "
                          f"is not {SCHEMA_VERSION}; recompile with `asap compile-kernels`")
    for key in ("kernel_name", "args", "hidden_args", "block", "shared", "files", "grid_rule"):
        if key not in meta:
            raise KernelError(f"{path}: kernel metadata lacks {key!r}")
    return meta


def load_index(out_dir: str | Path) -> dict:
    path = Path(out_dir) / "index.json"
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise KernelError(f"{path}: cannot read the kernel index: {exc}") from exc
    if index.get("schema") != SCHEMA_VERSION:
        raise KernelError(f"{path}: index schema {index.get('schema')} is not {SCHEMA_VERSION}")
    return index
