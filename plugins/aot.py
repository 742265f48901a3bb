"""Ahead-of-time compilation of the fused kernel (and its re-pack pre-pass) for CUDA GPUs, on a
machine WITHOUT a GPU: `triton.compile(ASTSource, target=GPUTarget("cuda", cc, 32))` per
architecture, with the ptxas that ships in the Triton wheel.

Writes, per (kernel variant, architecture): `<stem>.cubin`, `<stem>.ptx` and `<stem>.json`
(metadata: entry name, argument list with types, the hidden trailing arguments Triton appends,
launch grid rule, block size, num_warps, shared memory, Triton version, hashes); and `index.json`
listing them all with the sha256 of each file. The launcher (plugins/launcher.py) needs only these
files and the CUDA driver.

A kernel folder is the toolkit's (ownership marker of kind "kernels"): only files listed in its
marker are replaced, and a folder of other files is never written into. Read back, it is untrusted
input: names must be plain names inside the folder (no `..`, absolute or hidden names, no symbolic
links), files must be regular and bounded, types are checked, and every binary is verified against
the sha256 its index and metadata record (`load_index`, `load_kernel`, `read_images`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

from asap_deploy.config import ModelConfig
from asap_deploy.errors import KernelError, MissingDependencyError, OutputError, UsageError
from asap_deploy.io import atomic_path, check_file_replaceable, claim_files, owned_folder, read_regular_file

from .spec import KernelSpec, kernel_spec

SCHEMA_VERSION = 1
DEFAULT_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
KNOWN_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_100", "sm_120")
PARAM_DTYPES = ("fp16", "fp32")
OUT_DTYPES = ("fp32", "fp16", "u8")
POINTER_ALIGN = 16  # bytes: the compiled code assumes every pointer argument is 16-byte aligned
REPACK_BLOCK_T, REPACK_BLOCK_C = 32, 64
_TYPE_BYTES = {"i32": 4, "u32": 4, "i64": 8, "fp32": 4}  # scalars; pointers are 8 bytes
KIND = "kernels"  # the ownership-marker kind of a kernel folder (compile-kernels output, kernel-cache entry)
INDEX = "index.json"
# Kernel folders are untrusted input when read back: bounded reads, plain names, hashes checked.
MAX_JSON_BYTES = 4 << 20
MAX_IMAGE_BYTES = 256 << 20
MAX_ENTRIES = 10_000
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}")  # a plain name inside the folder, never hidden
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
# Largest shared memory one thread block may use, per architecture, after opting in with
# cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES) (the CUDA programming guide's table; NVIDIA's
# libcu++ cuda::arch_traits: per-SM shared memory less the 1 KB the driver reserves per block from
# sm_80 on). A kernel above its target's limit compiles but cannot launch there.
MAX_SHARED_OPTIN = {
    70: 96 * 1024, 75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 88: 99 * 1024, 89: 99 * 1024,
    90: 227 * 1024, 100: 227 * 1024, 103: 227 * 1024, 110: 227 * 1024, 120: 99 * 1024, 121: 99 * 1024,
}
_ARG_TYPE = re.compile(r"\*(?:i1|i8|u8|i16|i32|i64|u32|u64|fp16|bf16|fp32|fp64)|i32|u32|i64|fp32")


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
                f"p{self.params_dtype}_y{self.out_dtype}_b{s.BLOCK_P}x{s.ITERS}_w{s.num_warps}"
                f"{'_reload' if s.RELOAD else ''}")

    def with_reload(self) -> "Variant":
        """The same kernel re-reading the hidden weights per block: less shared memory (kernel.py)."""
        return replace(self, spec=replace(self.spec, RELOAD=True))

    def candidates(self) -> list["Variant"]:
        """What compile_variant may produce for this request, in the order it tries them."""
        return [self] if self.spec.RELOAD else [self, self.with_reload()]

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


# Per-SM limits for the occupancy estimate, per architecture: (max resident threads, max resident
# blocks, shared memory per SM in bytes) (the CUDA programming guide's "technical specifications
# per compute capability"; NVIDIA libcu++ cuda::arch_traits). Every one of them has 64 K registers
# per SM, allocated per warp in units of 256, and from sm_80 on reserves 1 KiB of shared memory
# per block.
SM_LIMITS = {
    75: (1024, 16, 64 * 1024), 80: (2048, 32, 164 * 1024), 86: (1536, 16, 100 * 1024),
    87: (1536, 16, 164 * 1024), 88: (1536, 16, 100 * 1024), 89: (1536, 24, 100 * 1024),
    90: (2048, 32, 228 * 1024), 100: (2048, 32, 228 * 1024), 103: (2048, 32, 228 * 1024),
    110: (1536, 24, 228 * 1024), 120: (1536, 24, 100 * 1024), 121: (1536, 24, 100 * 1024),
}
REGS_PER_SM, REG_UNIT, SHARED_UNIT = 65536, 256, 128


def occupancy(cc: int, regs: int, shared: int, threads: int) -> dict:
    """Resident blocks and warps per SM of a kernel using `regs` registers per thread, `shared`
    bytes of shared memory and `threads` threads per block on sm_<cc>, and what limits them (the
    CUDA occupancy calculator's rules); {} for an architecture not in SM_LIMITS."""
    if cc not in SM_LIMITS:
        return {}
    max_threads, max_blocks, smem_sm = SM_LIMITS[cc]
    warps = -(-threads // 32)
    regs_per_warp = -(-max(regs, 1) * 32 // REG_UNIT) * REG_UNIT
    per_block = shared + (1024 if cc >= 80 else 0)
    per_block = -(-per_block // SHARED_UNIT) * SHARED_UNIT
    limits = {"threads": max_threads // (warps * 32), "blocks": max_blocks,
              "registers": (REGS_PER_SM // regs_per_warp) // warps,
              "shared memory": smem_sm // per_block if per_block else max_blocks}
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: (limits[k], k != "registers"))
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps, "max_warps_per_sm": max_threads // 32,
            "occupancy": round(blocks * warps / (max_threads // 32), 4), "limited_by": limiter}


def cubin_info(cubin: bytes, kernel_name: str) -> dict:
    """What ptxas recorded in a cubin (ELF) about `kernel_name`: {registers, stack_bytes,
    static_shared} (registers per thread and stack frame from the `.nv.info` attributes
    EIATTR_REGCOUNT / EIATTR_FRAME_SIZE, else the top byte of the `.text.<name>` sh_info where
    older ptxas put the registers; static shared memory = the size of `.nv.shared.<name>`). Keys it
    cannot find are absent; {} for an image that is not a 64-bit ELF."""
    import struct

    out: dict = {}
    try:
        if cubin[:4] != b"\x7fELF" or cubin[4] != 2:
            return out
        shoff = struct.unpack_from("<Q", cubin, 0x28)[0]
        entsize, count, names = struct.unpack_from("<HHH", cubin, 0x3A)
        heads = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * entsize) for i in range(count)]

        def name_at(table: int, off: int) -> str:
            start = heads[table][4] + off
            return cubin[start:cubin.index(b"\0", start)].decode("ascii", "replace")

        secs = {name_at(names, h[0]): h for h in heads}
        sym = None  # the kernel's symbol index, which .nv.info attributes name
        if ".symtab" in secs and ".strtab" in secs:
            tab, strtab = secs[".symtab"], list(secs).index(".strtab")
            for i in range(tab[5] // 24):
                if name_at(strtab, struct.unpack_from("<I", cubin, tab[4] + 24 * i)[0]) == kernel_name:
                    sym = i
        info = secs.get(".nv.info")
        i, end = (info[4], info[4] + info[5]) if info else (0, 0)
        while i + 2 <= end:  # entries: format byte, attribute byte, then a value by format
            fmt, attr = cubin[i], cubin[i + 1]
            i += 2
            if fmt == 4:  # EIFMT_SVAL: u16 size + payload
                (size,) = struct.unpack_from("<H", cubin, i)
                payload, i = cubin[i + 2:i + 2 + size], i + 2 + size
                if attr in (0x2F, 0x12) and size == 8:  # EIATTR_REGCOUNT / EIATTR_FRAME_SIZE: (symbol, value)
                    s_idx, value = struct.unpack("<II", payload)
                    if sym is None or s_idx == sym:
                        out["registers" if attr == 0x2F else "stack_bytes"] = value
            else:
                i += {3: 2, 2: 1}.get(fmt, 0)
        text = secs.get(f".text.{kernel_name}")
        if "registers" not in out and text is not None and text[7] >> 24:
            out["registers"] = text[7] >> 24
        shared = secs.get(f".nv.shared.{kernel_name}")
        out["static_shared"] = int(shared[5]) if shared is not None else 0
    except (struct.error, IndexError, ValueError):
        return out
    return out


def ptxas_report(ptx: str, target: str, cc: int) -> dict:
    """Re-assemble `ptx` for `target` (e.g. sm_90a) with the ptxas this Triton uses for sm_<cc> and
    the options Triton passes (plus -v): {registers, stack_bytes, spill_store_bytes, spill_load_bytes,
    cubin_sha256, ptxas}. No GPU needed. KernelError if ptxas fails or prints no report."""
    import subprocess
    import tempfile

    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as exc:  # pragma: no cover - Triton without the NVIDIA backend
        raise MissingDependencyError("the ptxas report needs Triton's NVIDIA backend") from exc
    tool = get_ptxas(cc).path
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        src.write_text(ptx)
        res = subprocess.run([tool, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={target}", str(src),
                              "-o", str(out)], capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise KernelError(f"ptxas failed on the kernel's PTX for {target}: {res.stderr.strip()[-400:]}")
        sha = hashlib.sha256(out.read_bytes()).hexdigest()
    log = res.stderr + res.stdout
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not frame:
        raise KernelError(f"ptxas printed no resource report for {target}")
    return {"registers": int(regs.group(1)), "stack_bytes": int(frame.group(1)),
            "spill_store_bytes": int(frame.group(2)), "spill_load_bytes": int(frame.group(3)),
            "cubin_sha256": sha, "ptxas": tool}


def kernel_resources(meta: dict, cubin: bytes, ptx: bytes | str) -> dict:
    """Registers, spills, shared memory and occupancy of one compiled kernel, without a GPU:
    registers from the cubin itself, spills from ptxas -v on its PTX (`same_cubin`: the re-assembly
    reproduced the shipped cubin byte for byte, so the spill figures are the cubin's), occupancy
    from SM_LIMITS."""
    text = ptx.decode() if isinstance(ptx, bytes) else ptx
    rep = ptxas_report(text, meta.get("ptx_target") or meta["arch"], int(meta["cc"]))
    elf = cubin_info(cubin, meta["kernel_name"])
    regs = elf.get("registers", rep["registers"])
    shared = int(meta["shared"]) + elf.get("static_shared", 0)
    threads = int(meta["block"][0])
    return {"arch": meta["arch"], "ptx_target": meta.get("ptx_target"), "registers": regs,
            "spill_store_bytes": rep["spill_store_bytes"], "spill_load_bytes": rep["spill_load_bytes"],
            "stack_bytes": elf.get("stack_bytes", rep["stack_bytes"]), "shared_bytes": int(meta["shared"]),
            "static_shared_bytes": elf.get("static_shared", 0), "shared_limit": shared_limit(int(meta["cc"])),
            "threads": threads, "reload": bool(meta.get("constexprs", {}).get("RELOAD", 0)),
            "same_cubin": rep["cubin_sha256"] == meta["sha256"]["cubin"],
            **occupancy(int(meta["cc"]), regs, shared, threads)}


def shared_limit(cc: int) -> int:
    """Opt-in shared memory per block of sm_<cc> (MAX_SHARED_OPTIN); an architecture not in the table
    gets the smallest limit of its major (or of all) known ones: never more than it may have."""
    if cc in MAX_SHARED_OPTIN:
        return MAX_SHARED_OPTIN[cc]
    same = [v for k, v in MAX_SHARED_OPTIN.items() if k // 10 == cc // 10]
    return min(same or MAX_SHARED_OPTIN.values())


def _kib(n: int) -> str:
    return f"{n:,} bytes ({n / 1024:.0f} KiB)"


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


def _ptxas_cuda_version(cc: int) -> str | None:
    """'X.Y': the CUDA release of the ptxas this Triton uses for sm_<cc> (Triton 3.9 uses one for
    sm < 90 and another for newer targets); None if this Triton cannot say."""
    try:
        from triton.backends.nvidia import compiler as nv
    except ImportError:  # pragma: no cover - a Triton without the NVIDIA backend cannot compile for it
        return None
    text = None
    try:
        if hasattr(nv, "get_ptxas"):
            text = getattr(nv.get_ptxas(cc), "version", None)
        if not text and hasattr(nv, "get_ptxas_version"):
            try:
                text = nv.get_ptxas_version(cc)
            except TypeError:  # older Tritons take no architecture
                text = nv.get_ptxas_version()
    except Exception:  # noqa: BLE001 - a missing or unrunnable ptxas: the version stays unknown
        return None
    m = re.search(r"release (\d+\.\d+)", str(text or "")) or re.match(r"\s*(\d+\.\d+)", str(text or ""))
    return m.group(1) if m else None


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
    cuda_ver = _ptxas_cuda_version(cc)
    return {
        "schema": SCHEMA_VERSION,
        "kind": kind,
        "kernel_name": md.name,
        "arch": f"sm_{cc}",
        "cc": cc,
        "target": {"backend": "cuda", "arch": cc, "warp_size": 32},
        "triton_version": triton.__version__,
        "ptx_version": ptx_ver.group(1) if ptx_ver else None,  # PTX ISA: a driver JIT-compiles it from CUDA ...
        "cuda_version": cuda_ver,  # the CUDA release of the ptxas that made the cubin (launcher: driver check)
        "ptx_target": (re.search(r"^\.target\s+(\S+)", ptx, re.M) or [None, None])[1],
        "args": runtime,
        "hidden_args": hidden,
        "ptx_params": ptx_params,
        "constexprs": {k: (int(v) if isinstance(v, bool) else v) for k, v in constexprs.items()},
        "num_warps": md.num_warps,
        "num_ctas": getattr(md, "num_ctas", 1),
        "num_stages": md.num_stages,
        "block": [md.num_warps * 32, 1, 1],
        "shared": md.shared,  # dynamic shared memory, passed at launch
        # static shared memory ptxas put in the cubin (ptxas 13 for sm_90: 1 KiB); the driver's limit is on the sum
        "static_shared": cubin_info(bytes(ck.asm["cubin"]), md.name).get("static_shared", 0),
        "shared_limit": shared_limit(cc),  # opt-in bytes per block on this architecture (checked again at load)
        "grid_rule": grid_rule,
        "pointer_align": POINTER_ALIGN,
        "launch_cooperative_grid": bool(getattr(md, "launch_cooperative_grid", False)),
        "launch_pdl": bool(getattr(md, "launch_pdl", False)),
        "hash": md.hash,
    }


def _write(out_dir: Path, stem: str, ck, meta: dict, replace: bool = True) -> tuple[dict, str]:
    """Write `<stem>.cubin`, `.ptx` and `.json` into the kernel folder `out_dir` (each name claimed in its
    ownership marker before its file is written; an existing file is replaced only if the marker lists
    it and `replace`); return the metadata and the sha256 of the JSON bytes written."""
    cubin, ptx = bytes(ck.asm["cubin"]), ck.asm["ptx"].encode("utf-8")
    files = {"cubin": f"{stem}.cubin", "ptx": f"{stem}.ptx"}
    meta = dict(meta, files=files, sha256={"cubin": hashlib.sha256(cubin).hexdigest(),
                                            "ptx": hashlib.sha256(ptx).hexdigest()})
    raw = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode("utf-8")
    for name in files.values():
        _check_writable(out_dir / name, replace)
    _check_writable(out_dir / f"{stem}.json", replace)
    _write_owned(out_dir, files["cubin"], cubin, replace)
    _write_owned(out_dir, files["ptx"], ptx, replace)
    _write_owned(out_dir, f"{stem}.json", raw, replace)  # last: the metadata names only files that exist
    return meta, hashlib.sha256(raw).hexdigest()


def _check_writable(path: Path, replace: bool) -> None:
    check_file_replaceable(path, "compiled kernel file", replace)


def _write_owned(folder: Path, name: str, data: bytes, replace: bool = True) -> None:
    """Write one file of a kernel folder atomically, after claiming its name in the folder's marker."""
    path = folder / name
    _check_writable(path, replace)
    _make_folder(folder)
    claim_files(folder, KIND, [name])
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the kernel folder ({exc.strerror or exc})") from exc


def compile_variant(variant: Variant, cc: int, out_dir: str | Path, replace: bool = True) -> dict:
    """Compile one variant for sm_<cc> into out_dir; return its metadata. Files asap did not write
    there are never replaced (OutputError); see _write."""
    return _compile_variant(variant, cc, out_dir, replace)[0]


def fit_variant(variant: Variant, cc: int) -> tuple[Variant, object]:
    """(the variant to use on sm_<cc>, its compiled kernel): `variant` if its shared memory fits the
    architecture's opt-in limit per block (MAX_SHARED_OPTIN), else the same kernel re-reading its
    hidden weights per block (RELOAD, a fraction of the shared memory); KernelError naming the limit
    when neither fits. A kernel above the limit would compile and then fail at its first launch."""
    from .kernel import spatial_mlp

    limit, tried = shared_limit(cc), []
    for v in variant.candidates():
        s = v.spec
        ck = _compile(spatial_mlp, v.signature(), v.constexprs(), cc, s.num_warps, s.num_stages)
        need = int(ck.metadata.shared) + cubin_info(bytes(ck.asm["cubin"]), ck.metadata.name).get("static_shared", 0)
        if need <= limit:
            return v, ck
        tried.append(f"{_kib(need)}{' re-reading the weights per block' if s.RELOAD else ''}")
    s = variant.spec
    raise KernelError(f"the fused kernel (hr_width {s.HID}, {s.N_HIDDEN} hidden layers, S={s.S}) needs "
                      f"{' / '.join(tried)} of shared memory per block on sm_{cc}, which allows at most "
                      f"{_kib(limit)} per block (opt-in limit); use a smaller hr_width or hr_depth, or a GPU with "
                      f"more shared memory per block (sm_80/sm_87: 163 KiB, sm_90/sm_100: 227 KiB)")


def _compile_variant(variant: Variant, cc: int, out_dir: str | Path, replace: bool = True) -> tuple[dict, str]:
    variant, ck = fit_variant(variant, cc)
    s = variant.spec
    sig, cons = variant.signature(), variant.constexprs()
    rule = {"x": "N * (H / S) * (W / S) * programs_per_tile", "y": "1", "z": "1",
            "S": s.S, "programs_per_tile": s.programs_per_tile, "pixels_per_program": s.pixels_per_program}
    meta = _describe(ck, sig, cons, cc, rule, "spatial_mlp")
    meta["variant"] = {"params_dtype": variant.params_dtype, "out_dtype": variant.out_dtype,
                       "ids_dtype": variant.ids_dtype, "extra_dtype": variant.extra_dtype}
    meta["params_per_tile"] = {"rule": "(n_lab + EXTRA + 4*LOG2S + 1)*HID + N_HIDDEN*(HID+1)*HID + (HID+1)*OUT"}
    meta["stem"] = variant.stem
    return _write(Path(out_dir), f"{variant.stem}_sm{cc}", ck, meta, replace)


def compile_repack(src_dtype: str, cc: int, out_dir: str | Path, num_warps: int = 4, replace: bool = True) -> dict:
    """Compile the re-pack pre-pass ((N,P,h,w) any dtype -> (N*h*w, P) fp16) for sm_<cc>."""
    return _compile_repack(src_dtype, cc, out_dir, num_warps, replace)[0]


def _compile_repack(src_dtype: str, cc: int, out_dir: str | Path, num_warps: int = 4,
                    replace: bool = True) -> tuple[dict, str]:
    from .kernel import asap_repack_params, repack

    del asap_repack_params
    sig = {"src_ptr": f"*{src_dtype}", "s_sn": "i32", "s_sc": "i32", "s_sy": "i32", "s_sx": "i32", "P": "i32",
           "n_tiles_h": "i32", "n_tiles_w": "i32", "n_tiles": "i32", "dst_ptr": "*fp16",
           "BLOCK_T": "constexpr", "BLOCK_C": "constexpr"}
    cons = {"BLOCK_T": REPACK_BLOCK_T, "BLOCK_C": REPACK_BLOCK_C}
    ck = _compile(repack, sig, cons, cc, num_warps, 1)
    if int(ck.metadata.shared) > shared_limit(cc) - 1024:  # pragma: no cover - a few KiB; never near a limit
        raise KernelError(f"the re-pack kernel needs {_kib(int(ck.metadata.shared))} of shared memory per block; "
                          f"sm_{cc} allows {_kib(shared_limit(cc))}")
    rule = {"x": f"ceil(n_tiles / {REPACK_BLOCK_T})", "y": f"ceil(P / {REPACK_BLOCK_C})", "z": "1",
            "BLOCK_T": REPACK_BLOCK_T, "BLOCK_C": REPACK_BLOCK_C}
    meta = _describe(ck, sig, cons, cc, rule, "repack")
    meta["variant"] = {"src_dtype": src_dtype, "dst_dtype": "fp16"}
    return _write(Path(out_dir), f"asap_repack_params_{src_dtype}_sm{cc}", ck, meta, replace)


def compile_kernels(archs: Sequence[int], out_dir: str | Path, variants: Sequence[Variant],
                    repack_dtypes: Sequence[str] = PARAM_DTYPES,
                    progress: Callable[[str], None] | None = None, overwrite: bool = True) -> dict:
    """Compile every variant (and the re-pack pre-pass) for every architecture; write index.json
    (last: a folder without it is an unfinished run, which the next run finishes without
    `overwrite`). Needs Triton, no GPU. `overwrite=False` (the CLI's default) refuses a folder
    holding an index.json. The folder is asap's (ownership marker of kind "kernels"): a folder
    holding files asap did not write is refused, and only files listed in its marker are replaced
    (OutputError, before anything is compiled)."""
    out_dir = Path(out_dir)
    if not overwrite and os.path.lexists(out_dir / INDEX):
        raise OutputError(f"{out_dir / INDEX}: the kernel folder (index.json) already exists; pass --overwrite "
                          f"to replace it")
    check_kernel_folder(out_dir)
    stems = [f"{c.stem}_sm{cc}" for cc in archs for v in variants for c in v.candidates()]
    stems += [f"asap_repack_params_{d}_sm{cc}" for cc in archs for d in repack_dtypes]
    for name in [f"{st}{ext}" for st in stems for ext in (".cubin", ".ptx", ".json")] + [INDEX]:
        _check_writable(out_dir / name, True)  # everything that would be replaced, before any work
    _make_folder(out_dir)  # before any work: an uncreatable folder is an OutputError naming it
    triton, _, _ = _triton()
    entries = []
    for cc in archs:
        for v in variants:
            if progress:
                progress(f"sm_{cc} {v.stem}")
            m, jsha = _compile_variant(v, cc, out_dir)  # v, or v re-reading its weights (shared memory)
            entries.append({"kind": "spatial_mlp", "arch": m["arch"], "json": f"{m['stem']}_sm{cc}.json",
                            "S": v.spec.S, "HID": v.spec.HID, "N_HIDDEN": v.spec.N_HIDDEN, "OUT": v.spec.OUT,
                            "EXTRA": v.spec.EXTRA, "RELOAD": bool(m["constexprs"]["RELOAD"]), **m["variant"],
                            "sha256": {"json": jsha, **m["sha256"]}})
        for d in repack_dtypes:
            if progress:
                progress(f"sm_{cc} repack {d}")
            m, jsha = _compile_repack(d, cc, out_dir)
            entries.append({"kind": "repack", "arch": m["arch"], "json": f"asap_repack_params_{d}_sm{cc}.json",
                            **m["variant"], "sha256": {"json": jsha, **m["sha256"]}})
    index = {"schema": SCHEMA_VERSION, "triton_version": triton.__version__, "kernels": entries}
    _write_owned(out_dir, INDEX, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return index


def check_kernel_folder(out_dir: Path) -> None:
    """OutputError unless `out_dir` may receive kernels: absent, empty, or a kernel folder of asap's
    (its marker says kind "kernels"). A folder of someone else's files is never written into."""
    owned_folder(out_dir, KIND, "kernels")


# ---- reading kernel folders back (untrusted input) --------------------------------------------------
def _plain_name(name, what: str, where: Path) -> str:
    if not isinstance(name, str) or not _FILE_NAME.fullmatch(name):
        raise KernelError(f"{where}: names the {what} {name!r}, which is not a plain file name inside the kernel "
                          f"folder (no folders, '..', absolute or hidden names); refused")
    return name


def read_in_folder(folder: str | Path, name, what: str, max_bytes: int) -> bytes:
    """The bytes of the plain-named file `name` inside `folder`: KernelError (naming the file and the
    cause) unless it is a regular file there (a symbolic link is not followed, a FIFO or device is
    never opened for blocking reads) of at most `max_bytes`."""
    folder = Path(folder)
    path = folder / _plain_name(name, what, folder)
    return read_regular_file(path, what, max_bytes, error=KernelError, follow_symlinks=False)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_sha(v) -> bool:
    return isinstance(v, str) and bool(_HEX64.fullmatch(v))


def check_metadata(meta, where) -> dict:
    """KernelError unless `meta` is kernel metadata of this schema with every field the launcher,
    the plugin and the engine build use, of the right type and in range; returns it."""
    def bad(what: str):
        return KernelError(f"{where}: kernel metadata {what}; recompile with `asap compile-kernels`")

    if not isinstance(meta, dict):
        raise bad("is not a JSON object")
    if meta.get("schema") != SCHEMA_VERSION or not _is_int(meta.get("schema")):
        raise KernelError(f"{where}: kernel metadata schema {meta.get('schema')!r} is not {SCHEMA_VERSION}; "
                          f"recompile with `asap compile-kernels`")
    for key in ("kernel_name", "args", "hidden_args", "block", "shared", "files", "grid_rule"):
        if key not in meta:
            raise bad(f"lacks {key!r}")
    types = {"kind": str, "kernel_name": str, "arch": str, "cc": int, "triton_version": str, "args": list,
             "hidden_args": list, "ptx_params": list, "constexprs": dict, "num_warps": int, "num_stages": int,
             "block": list, "shared": int, "grid_rule": dict, "files": dict, "sha256": dict, "variant": dict,
             "pointer_align": int}
    for key, t in types.items():
        v = meta.get(key)
        if not (_is_int(v) if t is int else isinstance(v, t)):
            raise bad(f"field {key!r} is {type(v).__name__}, not {t.__name__}")
    if meta["kind"] not in ("spatial_mlp", "repack"):
        raise bad(f"kind {meta['kind']!r} is not spatial_mlp or repack")
    if not _IDENT.fullmatch(meta["kernel_name"]):
        raise bad(f"kernel_name {meta['kernel_name']!r} is not an identifier")
    if not 75 <= meta["cc"] <= 1000 or meta["arch"] != f"sm_{meta['cc']}":
        raise bad(f"arch {meta['arch']!r} / cc {meta['cc']!r} do not agree")
    if not 1 <= meta["num_warps"] <= 32 or meta["block"] != [meta["num_warps"] * 32, 1, 1]:
        raise bad(f"block {meta['block']!r} does not fit num_warps {meta['num_warps']}")
    if meta.get("static_shared") is not None and not (_is_int(meta["static_shared"]) and 0 <= meta["static_shared"] <= 1 << 20):
        raise bad("static_shared is not a byte count")
    if not 0 <= meta["shared"] <= 1 << 20 or meta["pointer_align"] not in (1, 2, 4, 8, 16, 32, 64, 128):
        raise bad("shared memory size or pointer alignment out of range")
    args, hidden = meta["args"], meta["hidden_args"]
    if len(args) > 256 or not all(isinstance(a, dict) and isinstance(a.get("name"), str) and _IDENT.fullmatch(a["name"])
                                  and isinstance(a.get("type"), str) and _ARG_TYPE.fullmatch(a["type"])
                                  and a.get("bytes") in (4, 8) for a in args):
        raise bad("has an argument list of the wrong shape (name, type, bytes)")
    if len(hidden) > 8 or not all(isinstance(h, dict) and isinstance(h.get("name"), str) and _IDENT.fullmatch(h["name"])
                                  and h.get("type") == "*i8" and _is_int(h.get("value")) and h["value"] == 0
                                  for h in hidden):
        raise bad("has hidden arguments other than null scratch pointers")
    if len(meta["ptx_params"]) != len(args) + len(hidden) or not all(
            isinstance(p, dict) and p.get("bytes") in (1, 2, 4, 8) for p in meta["ptx_params"]):
        raise bad("PTX parameter list does not match its arguments")
    if not all(isinstance(k, str) and (_is_int(v) or isinstance(v, float)) for k, v in meta["constexprs"].items()):
        raise bad("constexprs are not name -> number")
    rule = meta["grid_rule"]
    need = ("S", "programs_per_tile") if meta["kind"] == "spatial_mlp" else ("BLOCK_T", "BLOCK_C")
    if not all(_is_int(rule.get(k)) and 1 <= rule[k] <= 1 << 16 for k in need):
        raise bad(f"grid rule lacks positive integers {', '.join(need)}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta["variant"].items()):
        raise bad("variant is not name -> dtype")
    if meta["kind"] == "spatial_mlp" and not {"params_dtype", "out_dtype"} <= set(meta["variant"]):
        raise bad("variant lacks params_dtype/out_dtype")
    files, sha = meta["files"], meta["sha256"]
    for key in ("cubin", "ptx"):
        _plain_name(files.get(key), f"{key} file", Path(str(where)))
        if not _is_sha(sha.get(key)):
            raise bad(f"has no sha256 of its {key}")
    for key in ("ptx_target", "ptx_version", "cuda_version"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise bad(f"{key} is not a string")
    return meta


def _parse_json(raw: bytes, what: str, where) -> object:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise KernelError(f"{where}: cannot read {what}: {exc}") from exc


def load_metadata(path: str | Path) -> dict:
    """Read one kernel's JSON (a regular file, bounded) and check it is a schema this launcher knows,
    with every field of the right type (check_metadata)."""
    path = Path(path)
    raw = read_regular_file(path, "kernel metadata", MAX_JSON_BYTES, error=KernelError)
    return check_metadata(_parse_json(raw, "kernel metadata", path), path)


def read_images(meta: dict, folder: str | Path) -> tuple[bytes, bytes]:
    """(cubin, ptx) of checked metadata, read from inside `folder` and verified against the sha256
    the metadata records: KernelError naming the damaged file otherwise."""
    folder = Path(folder)
    out = []
    for key in ("cubin", "ptx"):
        name = meta["files"][key]
        data = read_in_folder(folder, name, f"kernel {key}", MAX_IMAGE_BYTES)
        if hashlib.sha256(data).hexdigest() != meta["sha256"][key]:
            raise KernelError(f"{folder / name}: the kernel {key} does not match the sha256 its metadata records "
                              f"(damaged or replaced); recompile it")
        out.append(data)
    cubin, ptx = out
    if cubin[:4] != b"\x7fELF" or f".entry {meta['kernel_name']}(".encode() not in ptx:
        raise KernelError(f"{folder / meta['files']['cubin']}: not the compiled {meta['kernel_name']} kernel; "
                          f"recompile it")
    return cubin, ptx


def load_kernel(folder: str | Path, entry: dict) -> tuple[dict, bytes, bytes]:
    """(metadata, cubin, ptx) of one index entry of a kernel folder, every file confined to the
    folder and checked against the sha256 the index records (when it has them) and the metadata
    records: a damaged, truncated, missing or foreign file is a KernelError naming it."""
    folder = Path(folder)
    raw = read_in_folder(folder, entry.get("json"), "kernel metadata", MAX_JSON_BYTES)
    sha = entry.get("sha256") or {}
    where = folder / entry["json"]
    if sha and hashlib.sha256(raw).hexdigest() != sha["json"]:
        raise KernelError(f"{where}: the kernel metadata does not match the sha256 in {INDEX} (damaged or replaced); "
                          f"recompile it")
    meta = check_metadata(_parse_json(raw, "kernel metadata", where), where)
    if sha and (meta["sha256"]["cubin"], meta["sha256"]["ptx"]) != (sha["cubin"], sha["ptx"]):
        raise KernelError(f"{where}: the kernel metadata records other images than {INDEX}; recompile it")
    if meta["arch"] != entry.get("arch") or meta["kind"] != entry.get("kind"):
        raise KernelError(f"{where}: compiled for {meta['kind']} {meta['arch']}, but {INDEX} lists "
                          f"{entry.get('kind')} {entry.get('arch')}; recompile it")
    cubin, ptx = read_images(meta, folder)
    return meta, cubin, ptx


def check_variant(meta: dict, variant: Variant, cc: int, triton_version: str | None = None, where="") -> None:
    """KernelError naming the first way `meta` is not `variant` compiled for sm_<cc> (by this
    Triton): a kernel compiled for another architecture or configuration is never used for it."""
    want = {"kind": "spatial_mlp", "kernel_name": "asap_spatial_mlp", "arch": f"sm_{cc}", "cc": cc,
            "variant": {"params_dtype": variant.params_dtype, "out_dtype": variant.out_dtype,
                        "ids_dtype": variant.ids_dtype, "extra_dtype": variant.extra_dtype},
            "constexprs": {k: (int(v) if isinstance(v, bool) else v) for k, v in variant.constexprs().items()},
            "args": [[n, t] for n, t in variant.signature().items() if t != "constexpr"]}
    if triton_version is not None:
        want["triton_version"] = triton_version
    have = dict(meta, args=[[a["name"], a["type"]] for a in meta["args"]])
    for key, value in want.items():
        if have.get(key) != value:
            raise KernelError(f"{where}: compiled with {key} {have.get(key)!r}, not {value!r} (another architecture, "
                              f"configuration or Triton); recompile it")


def load_index(out_dir: str | Path) -> dict:
    """index.json of a kernel folder (a regular file inside it, bounded), every entry of the right
    shape and naming a plain file inside the folder; KernelError otherwise."""
    folder = Path(out_dir)
    path = folder / INDEX
    index = _parse_json(read_in_folder(folder, INDEX, "kernel index", MAX_JSON_BYTES), "the kernel index", path)
    if not isinstance(index, dict) or index.get("schema") != SCHEMA_VERSION:
        got = index.get("schema") if isinstance(index, dict) else type(index).__name__
        raise KernelError(f"{path}: index schema {got!r} is not {SCHEMA_VERSION}")
    kernels = index.get("kernels")
    if not isinstance(kernels, list) or len(kernels) > MAX_ENTRIES or not isinstance(index.get("triton_version"), str):
        raise KernelError(f"{path}: malformed kernel index (kernels / triton_version of the wrong type)")
    for e in kernels:
        if not isinstance(e, dict) or not isinstance(e.get("kind"), str) or not isinstance(e.get("arch"), str):
            raise KernelError(f"{path}: malformed kernel index entry {str(e)[:80]!r}")
        _plain_name(e.get("json"), "kernel metadata", path)
        sha = e.get("sha256")
        if sha is not None and not (isinstance(sha, dict) and all(_is_sha(sha.get(k)) for k in ("json", "cubin",
                                                                                                 "ptx"))):
            raise KernelError(f"{path}: entry {e['json']!r} has a malformed sha256 record")
    return index
