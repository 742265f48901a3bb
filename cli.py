"""`asap`: the command line of asap-deploy. Thin commands: parse, call the library, print, exit.

Installed as `asap_deploy.cli` (console script `asap`); from a checkout: `python cli.py`.
Heavy imports (torch, onnx, tensorrt) happen inside the commands, so `asap --help` works in any
install.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # `python cli.py` from a checkout: make `asap_deploy` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import typer
from rich.console import Console
from rich.table import Table

from asap_deploy.app.options import ENGINE_NAMES  # the backends validate (and infer) accept, for --help
from asap_deploy.app.options import BACKEND_NAMES, auto_order_text  # bench's backends, auto's order, for --help
from asap_deploy.app.options import PRECISION_NOTE, PRECISIONS, precision_choices  # --precision, for --help
from asap_deploy.errors import AsapError

class _Argument(typer.core.TyperArgument):
    """Arguments named like click's: CHECKPOINT in the usage line and the help panel, [URL] when
    optional (not '{checkpoint}'); list types as their element (INPUTS... <str>)."""

    @property
    def display_name_raw(self) -> str:
        return self.metavar if self.metavar is not None else self.name.upper()

    def _usage_display_name(self) -> str:
        name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
        return name + ("..." if self.nargs != 1 else "")

    def display_type_rich(self, ctx):
        return _element_type(super().display_type_rich(ctx))


class _Option(typer.core.TyperOption):
    """Flags are plain (--fp16, not '--fp16 <bool>'); repeatable options show their element type."""

    def display_type_rich(self, ctx):
        if self.is_flag:
            return None
        return _element_type(super().display_type_rich(ctx))


def _element_type(text):
    if text and text.startswith("<list[") and text.endswith("]>"):
        return f"<{text[6:-2]}>"
    return text


def _tidy(params) -> None:
    for param in params:
        if type(param) is typer.core.TyperArgument:
            param.__class__ = _Argument
        elif type(param) is typer.core.TyperOption:
            param.__class__ = _Option


class _Command(typer.core.TyperCommand):
    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        _tidy([option] if option is not None else [])
        return option


class _Group(typer.core.TyperGroup):
    """The `asap` group: its own and its commands' parameters (--help included) render as
    _Argument / _Option in --help."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _tidy(self.params)
        for command in self.commands.values():
            _tidy(command.params)
            if type(command) is typer.core.TyperCommand:
                command.__class__ = _Command

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        _tidy([option] if option is not None else [])
        return option


app = typer.Typer(
    name="asap",
    cls=_Group,
    help="Deploy ASAP-Net (label map -> photo) from PyTorch to ONNX and TensorRT, and prove the fast engine "
    "still computes the same model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
def _console(stderr: bool = False) -> Console:
    # piped (CI logs, files): rich would assume 80 columns and fold every table into narrow cells
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() or os.environ.get("COLUMNS") else 200)


console = _console()
err_console = _console(stderr=True)


def _command_name(fn) -> str:
    return fn.__name__.replace("_", "-")


def cli_errors(fn):
    """Turn library errors into one red line and the error's exit code (traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AsapError as exc:
            if os.environ.get("ASAP_DEBUG"):
                raise
            from rich.markup import escape  # messages hold text like 'asap-deploy[gpu]'

            # soft_wrap: never break a message inside a file name (the terminal wraps, paths stay copyable)
            err_console.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:  # a safety net: library code wraps these in typed errors naming the file
            if os.environ.get("ASAP_DEBUG"):
                raise
            from rich.markup import escape

            where = f"{exc.filename}: " if exc.filename else ""
            err_console.print(f"[bold red]error:[/] {escape(where + (exc.strerror or str(exc)))} "
                              "(run with --debug for the traceback)", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except ImportError as exc:  # a safety net: an optional module missing where no check named its extra
            from asap_deploy.errors import missing_dependency

            err = missing_dependency(exc, f"asap {_command_name(fn)}")
            if err is None or os.environ.get("ASAP_DEBUG"):
                raise
            from rich.markup import escape

            err_console.print(f"[bold red]error:[/] {escape(err.message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    if debug:
        os.environ["ASAP_DEBUG"] = "1"


def _load_config(preset: Optional[str], config: Optional[Path]):
    from asap_deploy.app.options import load_config

    return load_config(preset, config)


PRESET_HELP = "Model preset: facades, cityscapes, ade20k or coco."
CONFIG_HELP = "Model config JSON file (fields of ModelConfig; a regular file of at most 16 MiB)."
SEED_HELP_RANGE = " (0..4294967295)"


# ---- options several commands share: declared once ------------------------------------------------
def preset_option():
    return typer.Option(None, "--preset", help=PRESET_HELP)


def config_option(extra: str = ""):
    return typer.Option(None, "--config", help=CONFIG_HELP + extra)


def seed_option(what: str):
    return typer.Option(0, "--seed", help=f"{what}{SEED_HELP_RANGE}.")


def engine_threads_option(extra: str = ""):
    """--threads of the commands that open an engine (infer, serve)."""
    return typer.Option(None, "--threads", help="CPU threads of the torch / ONNX Runtime engine (1..4 x the cores "
                        f"here; default: all cores{extra}).")


def _source_kinds(model: Optional[Path], bundle_dir: Optional[Path], engine_file: Optional[Path]) -> None:
    """A path of another kind than its option wants gets a hint (a checkpoint as --bundle: --model)."""
    from asap_deploy.app.paths import check_bundle_arg, check_checkpoint_arg, check_engine_arg

    check_checkpoint_arg("--model", model)
    check_bundle_arg("--bundle", bundle_dir)
    check_engine_arg("--engine", engine_file)


def _checkpoint_arg(option: str, path: Optional[Path], folder_ok: bool = False, engine: bool = False) -> None:
    """A checkpoint (exit 4) or engine (exit 5) file argument must be a regular file: a FIFO or
    device would block. A missing file is left to its loader to report."""
    from asap_deploy.app.options import check_checkpoint_file

    check_checkpoint_file(option, path, folder_ok=folder_ok, engine=engine)


@app.command()
@cli_errors
def inspect(
    path: Path = typer.Argument(..., metavar="PATH", help="A checkpoint (our .pt or the authors' latest_net_G.pth), "
                                "a bundle folder (manifest.json), any ONNX file, a TensorRT engine (with its .json "
                                "sidecar) or a compiled kernel folder (index.json)."),
    preset: Optional[str] = preset_option(),
    config: Optional[Path] = config_option(" Checkpoints only."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="Engines: the bundle folder they were built from, "
                                          "when it is not the engine's folder (to check the source ONNX)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Show what an artifact holds (like polygraphy inspect model): a checkpoint's config and parameters; a bundle's
    manifest and each file verified (ok / mismatch / missing); an ONNX file's opset, I/O, custom nodes, op histogram
    and weights; an engine's sidecar (TensorRT, SMs, precision, profile, plugin) and whether its source ONNX still
    matches; a kernel folder's kernels, each verified. Reports damage instead of refusing; runs no code from a file
    and never deserializes an engine (no TensorRT needed)."""
    from asap_deploy.app.inspect import inspect_path

    given = _load_config(preset, config)  # also refuses --preset with --config
    info = inspect_path(path, config=None if preset else given, preset=preset, bundle=bundle)
    if as_json:
        console.print_json(json.dumps(info))
        return
    {"checkpoint": _print_checkpoint, "bundle": _print_bundle, "onnx": _print_onnx, "engine": _print_engine,
     "kernels": _print_kernels}[info["kind"]](path, info)


# ---- asap inspect: one printer per artifact kind (values from files are shown as text, never as markup) ----
_STATUS_COLOUR = {"ok": "green", "unknown": "yellow", "unlisted": "yellow", "missing": "red", "mismatch": "red",
                  "refused": "red", "invalid": "red", "damaged": "red"}


def _text(value, style: str = ""):
    from rich.text import Text

    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v) for v in value)
    elif isinstance(value, dict):
        value = ", ".join(f"{k} {v}" for k, v in value.items())
    return Text("-" if value is None else str(value), style=style)


def _status(value):
    return _text(value, f"bold {_STATUS_COLOUR.get(str(value), 'red')}")


def _kv_table(title: str, rows) -> Table:
    table = Table(title=_text(title), show_header=False)
    table.add_column()
    table.add_column(overflow="fold")
    for k, v in rows:
        table.add_row(_text(k), _text(v) if not hasattr(v, "__rich_console__") else v)
    return table


def _shape(shape) -> str:
    return "?" if shape is None else "x".join(str(d) for d in shape) or "scalar"


def _print_checkpoint(path: Path, info: dict) -> None:
    table = Table(title=f"{path.name} ({info['format']}, config {info['config_source']})", show_header=False)
    for k, v in info["config"].items():
        table.add_row(k, str(v))
    for k, v in info["derived"].items():
        table.add_row(f"[dim]{k}[/]", str(v))
    n_lr = info["parameters"]["lowres_stream"]
    table.add_row("low-res stream parameters", f"{n_lr:,} ({n_lr * 4 / 2**20:.1f} MiB fp32)")
    table.add_row("pixelwise stream parameters", "0 (all predicted per tile)")
    table.add_row("label ids", info["labels"]["ids"])
    table.add_row("don't care", info["labels"]["dontcare"])
    console.print(table)


def _print_bundle(path: Path, info: dict) -> None:
    labels, op = info["labels"], info["custom_op"]
    rows = [("schema", info["schema"]), *info["config"].items(), ("S (tile size)", info["S"]),
            ("label ids", f"{labels.get('ids')} ({labels.get('dtype')}), don't care id {labels.get('dontcare_id')}"),
            ("precisions", info["precisions"]),
            ("custom op", f"{op.get('domain')}::{op.get('op_type')}"), ("opset", info["opset"]),
            ("source", info["source"]), ("versions", info["versions"])]
    rows += [(f"graph {g}", "; ".join(f"{'in' if k == 'inputs' else 'out'} {t.get('name')} {t.get('dtype')} "
                                      f"{_shape(t.get('shape'))}" for k in ("inputs", "outputs") for t in io.get(k, [])))
             for g, io in info["graphs"].items()]
    console.print(_kv_table(f"{info['path']} (bundle)", rows))
    files = Table(title="files against manifest.json")
    for col in ("file", "bytes", "sha256", "status", "detail"):
        files.add_column(col, overflow="fold")
    for r in info["files"]:
        files.add_row(_text(r["file"]), _text(r["bytes"]), _text(str(r["sha256"])[:16] + "..."), _status(r["status"]),
                      _text(r.get("detail", "")))
    console.print(files)
    if info["other_files"]:
        console.print(_text("not in the manifest: " + ", ".join(info["other_files"])))
    bad = {k: v for k, v in info["status_counts"].items() if k != "ok"}
    console.print(_text("VERIFIED: every file matches the manifest" if info["verified"] else
                        "NOT VERIFIED: " + ", ".join(f"{v} {k}" for k, v in bad.items()),
                        "bold green" if info["verified"] else "bold red"))


def _print_onnx(path: Path, info: dict) -> None:
    inits = info["initializers"]
    rows = [("bytes", f"{info['bytes']:,}"), ("sha256", info["sha256"]), ("ir_version", info["ir_version"]),
            ("producer", info["producer"] or "-"), ("opset", ", ".join(f"{d} {v}" for d, v in info["opset"].items())),
            ("nodes", f"{info['nodes']} ({info['subgraphs']} subgraphs)"),
            ("initializers", f"{inits['count']}, {inits['bytes']:,} bytes ("
             + ", ".join(f"{d} {b:,}" for d, b in inits["bytes_by_dtype"].items()) + ")"),
            ("external data", f"{len(info['external_data'])} tensor(s) (not read)" if info["external_data"] else "none")]
    if "bundle" in info:
        rows.append(("in bundle", _status(info["bundle"]["status"])))
    rows += [(f"metadata {k}", v) for k, v in info["metadata"].items()]
    console.print(_kv_table(f"{info['file']} (ONNX)", rows))
    io = Table(title="inputs and outputs")
    for col in ("", "name", "dtype", "shape"):
        io.add_column(col)
    for kind in ("inputs", "outputs"):
        for t in info[kind]:
            io.add_row(kind[:-1], _text(t["name"]), _text(t["dtype"]), _text(_shape(t["shape"])))
    console.print(io)
    if info["custom_nodes"]:
        custom = Table(title="custom nodes")
        for col in ("op", "count", "function body", "attributes"):
            custom.add_column(col, overflow="fold")
        for c in info["custom_nodes"]:
            custom.add_row(_text(f"{c['domain']}::{c['op_type']}"), _text(c["count"]),
                           _text("yes" if c["function_body"] else "no"),
                           _text(", ".join(f"{k}={v}" for k, v in c["attributes"].items())))
        console.print(custom)
    for f in info["functions"]:
        console.print(_text(f"function {f['domain']}::{f['name']}: {f['nodes']} nodes"))
    console.print(_text("ops: " + ", ".join(f"{k} {v}" for k, v in info["ops"].items())))


def _print_engine(path: Path, info: dict) -> None:
    rows = [("bytes", f"{info['bytes']:,}"), ("sha256", info["sha256"]), ("sidecar", _status(info["sidecar"]))]
    if info["sidecar"] != "ok":
        rows.append(("detail", info.get("detail")))
        console.print(_kv_table(f"{info['file']} (engine)", rows))
        return
    t, pl, src = info["tensorrt"], info["plugin"], info["source_onnx"]
    prof = info["profile"].get("labels_NHW", {}) if isinstance(info["profile"], dict) else {}
    rows += [("engine vs sidecar", _status(info["engine_matches_sidecar"])),
             ("graph / precision", f"{info['graph']} / {info['precision']}"
              + (f" ({info['fp16_method']})" if info.get("fp16_method") else "")),
             ("TensorRT", f"{t['module']} {t['version']} ({t['flavor']})"),
             ("targets", ", ".join(f"sm_{s}" for s in info["targets"]["sm"] or [])
              + (f" ({info['targets']['gpu']})" if info["targets"].get("gpu") else "")),
             ("profile labels NxHxW", "; ".join(f"{k} {_shape(prof.get(k))}" for k in ("min", "opt", "max")) if prof else "-"),
             ("plugin", "none" if pl is None else f"{pl['name']} v{pl['version']}"
              + ("" if pl["current"] else f" (this asap-deploy has v{pl['this_asap_version']}: rebuild)")
              + f", kernels for {pl['kernel_archs']}, Triton {pl['triton_version']}"),
             ("source ONNX", f"{src.get('file')} sha256 {str(src.get('sha256'))[:16]}..."),
             ("source still matches", _status(src["status"])),
             ("", src.get("detail")),
             ("built from bundle", info["built_from"]["bundle_path"])]
    console.print(_kv_table(f"{info['file']} (engine)", [r for r in rows if r[0] or r[1]]))


def _print_kernels(path: Path, info: dict) -> None:
    if info["index"] != "ok":
        console.print(_text(f"{info['path']}: {info['detail']}", "bold yellow"))
        return
    table = Table(title=_text(f"{info['path']} (kernels, Triton {info['triton_version']}; here {info['triton_here']})"))
    for col in ("arch", "kernel", "variant", "shared B", "warps", "cubin B", "status", "detail"):
        table.add_column(col, overflow="fold")
    for k in info["kernels"]:
        what = (f"S={k.get('S')} params {k.get('params_dtype')} out {k.get('out_dtype')}" if k["kind"] == "spatial_mlp"
                else f"{k.get('src_dtype')} -> {k.get('dst_dtype')}")
        table.add_row(_text(k["arch"]), _text(k.get("kernel_name", k["kind"])), _text(what), _text(k.get("shared")),
                      _text(k.get("num_warps")), _text(k.get("cubin_bytes")), _status(k["status"]),
                      _text(k.get("detail", "")))
    console.print(table)
    console.print(_text("VERIFIED: every kernel matches its hashes" if info["verified"] else "NOT VERIFIED",
                        "bold green" if info["verified"] else "bold red"))


@app.command()
@cli_errors
def export(
    checkpoint: Path = typer.Argument(..., help="Our checkpoint (.pt) or the authors' latest_net_G.pth."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Bundle folder to write (written atomically); "
                                       "not needed when CHECKPOINT is a bundle folder and --triton-repo is given."),
    preset: Optional[str] = preset_option(),
    config: Optional[Path] = config_option(),
    fp16: Optional[bool] = typer.Option(None, "--fp16/--no-fp16", help="Also write the *.fp16.onnx variants (the "
                                        "default); with --engine, --fp16 also builds fp16 engines from them."),
    engine: Optional[str] = typer.Option(None, "--engine", help="Then build TensorRT engines into the bundle and "
                                         "validate: rtx (TensorRT-RTX, builds without a GPU) or tensorrt (full "
                                         "TensorRT, on the GPU it targets). Prints the commands to run next."),
    arch: Optional[str] = typer.Option(None, "--arch", help="With --engine rtx: target architectures, e.g. "
                                       "sm_86,sm_89 (default sm_75,sm_80,sm_86,sm_89,sm_120)."),
    stage: Optional[str] = typer.Option(None, "--stage", help="With --engine: predictor, pixelwise, end-to-end or "
                                        "all (default)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bundle folder (and --triton-repo)."),
    triton_repo: Optional[Path] = typer.Option(None, "--triton-repo", help="Also write a Triton Inference Server model "
                                               "repository here (start: tritonserver --model-repository DIR)."),
    triton_max_batch: int = typer.Option(8, "--triton-max-batch", help="Repository: max_batch_size of the models "
                                         "(1..256)."),
    triton_delay_ms: float = typer.Option(2.0, "--triton-max-delay-ms", help="Repository: dynamic batcher queue delay "
                                          "(0..10000 ms)."),
    triton_instances: int = typer.Option(1, "--triton-instances", help="Repository: model instances per device (1..64)."),
    triton_kind: str = typer.Option("cpu", "--triton-kind", help="Repository: cpu or gpu for the ONNX Runtime model."),
) -> None:
    """Export a checkpoint to an ONNX bundle: predictor, pixelwise and end-to-end graphs (+ fp16) and manifest.json."""
    import time

    from asap_deploy.errors import UsageError
    from asap_deploy.app.pipeline import engine_request, export_only
    from asap_deploy.app.triton_repo import check_repo_args, is_bundle

    req = engine_request(engine, fp16=fp16 is True, arch=arch, stage=stage)  # before any work
    if triton_repo is not None:  # checked before the export, not after it
        check_repo_args(triton_max_batch, triton_delay_ms, triton_instances)
    _checkpoint_arg("CHECKPOINT", checkpoint, folder_ok=True)
    from asap_deploy.app.paths import check_checkpoint_arg

    if not checkpoint.is_dir() or not (checkpoint / "manifest.json").exists():  # a bundle: --triton-repo from it
        check_checkpoint_arg("CHECKPOINT", checkpoint, bundle_option=None)

    def write_repo(bundle_path: Path) -> None:
        from asap_deploy.app.triton_repo import RepoOptions, write_repo_for

        rep = write_repo_for(bundle_path, triton_repo, RepoOptions(
            max_batch=triton_max_batch, max_delay_ms=triton_delay_ms, instances=triton_instances, kind=triton_kind,
            overwrite=overwrite))
        for note in rep.notes:
            console.print(f"[dim]note: {note}[/]", highlight=False)
        console.print(f"Triton model repository {rep.path}: models {', '.join(rep.models)} (configs checked against "
                      f"Triton's ModelConfig); start it with: tritonserver --model-repository {rep.path}", highlight=False)

    if triton_repo is not None and req is None and is_bundle(checkpoint):
        if out is not None:
            raise UsageError(f"{checkpoint} is already a bundle: drop -o/--out (only --triton-repo is written)")
        write_repo(checkpoint)
        return
    if out is None:
        raise UsageError("give -o/--out BUNDLE (the folder to export to)")
    t0 = time.perf_counter()
    with console.status("exporting") as status:
        if req is None:
            res = export_only(checkpoint, out, config=_load_config(preset, config), fp16=fp16 is not False,
                              overwrite=overwrite, progress=lambda msg: status.update(msg))
        else:
            pipe = _export_and_build(checkpoint, out, req, config=_load_config(preset, config),
                                     fp16_export=fp16 is not False, overwrite=overwrite,
                                     progress=lambda msg: status.update(msg))
            res = pipe.export
    m = res.manifest
    table = Table(title=f"{res.path}: S={m['S']}, opset {m['opset']['ai.onnx']}")
    for col in ("file", "precision", "MiB", "sha256"):
        table.add_column(col)
    for name, f in sorted(m["files"].items()):
        table.add_row(name, f["precision"], f"{f['bytes'] / 2**20:.1f}", f["sha256"][:16])
    console.print(table)
    console.print(f"config: {m['source'].get('config_source', 'given')}; labels {m['labels']['ids']}"
                  + (" + 255 (don't care)" if m["labels"]["dontcare_id"] is not None else "")
                  + (f"; exported in {time.perf_counter() - t0:.1f} s" if req is None else ""))
    if req is not None:
        _print_pipeline(pipe, checkpoint, res.path, t0)
    if triton_repo is not None:
        write_repo(res.path)
    if req is not None and not pipe.passed:
        from asap_deploy.errors import ValidationFailed

        raise ValidationFailed(f"{', '.join(n for n, b in pipe.validation.backends.items() if not b['passed'])} "
                               f"outside the {req.precision} thresholds (see {pipe.validation.report_dir}/report.json); "
                               f"the bundle and engine(s) are written")


def _export_and_build(checkpoint: Path, out: Path, req, **kw):
    """`asap export --engine` (asap_deploy/app/pipeline.py); TensorRT-RTX's parser library fix may
    need a restart, which happens before any work."""
    from asap_deploy.app.build import with_rtx_restart
    from asap_deploy.app.pipeline import export_and_build

    return with_rtx_restart(lambda: export_and_build(checkpoint, out, req, **kw), _restart_note)


def _restart_note(message: str) -> None:
    err_console.print(f"[yellow]note:[/] {message}; restarting with it", highlight=False)


def _print_pipeline(pipe, checkpoint: Path, bundle: Path, t0: float) -> None:
    """The engines, whether they run here, the validation verdict per backend and the next commands."""
    import time

    from rich.markup import escape

    for b in pipe.engines:
        sc = b.sidecar
        t = sc["tensorrt"]
        console.print(f"engine {b.path} ({sc['engine']['bytes'] / 2**20:.1f} MiB, {t['module']} {t['version']}, "
                      f"{sc['precision']}, targets {','.join(f'sm_{s}' for s in sc['targets']['sm'])}; sidecar "
                      f"{b.path.name}.json) built in {b.seconds:.1f} s", highlight=False)
    console.print(f"[{'green' if pipe.engine_runnable else 'yellow'}]engine: {escape(pipe.engine_note)}[/]",
                  highlight=False)
    rep = pipe.validation
    th = rep.thresholds
    for name, b in rep.backends.items():
        e2e, pred = b["stages"]["end_to_end"], b["stages"]["predictor"]
        console.print(f"validation {name} vs the PyTorch fp32 reference ({rep.precision}, {pipe.samples} sample "
                      f"batch(es)): {'[green]PASSED[/]' if b['passed'] else '[red]FAILED[/]'} | end-to-end PSNR "
                      f"{e2e['psnr_db']:.1f} dB (>= {th['psnr_db']:g}), max {e2e['max_levels']} 8-bit level(s); "
                      f"parameter cosine {pred['cosine']:.6f} (>= {th['params_cosine']:g})", highlight=False)
        for f in b["failures"]:
            err_console.print(f"[red]{name}: {escape(f)}[/]", highlight=False)
    console.print(f"report: {rep.report_dir}", highlight=False)
    console.print("next:", highlight=False)
    for cmd in pipe.next_commands:
        console.print(f"  {escape(cmd)}", highlight=False, soft_wrap=True)
    verdict = "[bold green]PASSED[/]" if pipe.passed else "[bold red]FAILED[/]"
    console.print(f"{verdict} | {len(pipe.engines)} engine(s) | {time.perf_counter() - t0:.1f} s | asap export "
                  f"{checkpoint} -o {bundle} {pipe.request.options()}", highlight=False)


@app.command()
@cli_errors
def validate(
    bundle_dir: Path = typer.Argument(..., help="Bundle folder written by `asap export`."),
    backend: list[str] = typer.Option([], "--backend", "-b", help="Backend(s) to check (repeatable): "
                                      f"{', '.join(ENGINE_NAMES)}; each must run --precision (default: onnxruntime "
                                      "where it runs the precision, else every backend usable here that does)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Folder of label PNGs (+ instance maps; at most "
                                          "1000 maps, its sub-folders are not read)."),
    random: Optional[int] = typer.Option(None, "--random", help="Number of random blob label maps (1..1000, "
                                         "default 4)."),
    precision: str = typer.Option("fp32", "--precision", help=f"Precision to check, with the backends that run it: "
                                  f"{precision_choices()} ({PRECISION_NOTE}); thresholds per precision in the "
                                  "report."),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="Reference from this checkpoint (must be the exported one) instead of the "
        "bundle's own weights."),
    report: Optional[Path] = typer.Option(None, "--report", help="Report folder (default: BUNDLE_DIR-validation)."),
    seed: int = seed_option("Seed of the random label maps"),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON report instead of tables."),
) -> None:
    """Compare a bundle's backends with the PyTorch reference (fp32, CPU); exit non-zero on failure."""
    import time

    from asap_deploy.app.validate import run_validate
    from asap_deploy.errors import ValidationFailed

    t0 = time.perf_counter()
    with console.status("validating") as status:
        rep, names, n_samples = run_validate(bundle_dir, backend, labels=labels, random=random, precision=precision,
                                             checkpoint=checkpoint, report=report, seed=seed,
                                             progress=lambda msg: status.update(msg))
    if as_json:
        console.print_json(json.dumps(rep.to_dict()))
    else:
        t = rep.thresholds
        table = Table(title=f"{bundle_dir} vs PyTorch fp32 CPU reference, {precision}, {n_samples} sample batch(es)")
        for col in ("backend", "stage", "max abs", "mean abs", "PSNR dB", "differing", "> 8 levels", "max levels",
                    "cosine", "ok"):
            table.add_column(col)
        lim = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        table.add_row("[dim]threshold[/]", "", f"<= {lim(t['max_abs'], '.0e')}", f"<= {lim(t['mean_abs'], '.2g')}",
                      f">= {t['psnr_db']:.0f}", f"<= {lim(t['differing_share'], '.1%')}",
                      f"<= {lim(t.get('share_over_8_levels'), '.1%')}", f"<= {lim(t['max_levels'], 'd')}",
                      f">= {t['params_cosine']}", "")
        for name, b in rep.backends.items():
            for stage, m in b["stages"].items():
                ok = "[green]ok[/]" if not m["failures"] else "[red]FAIL[/]"
                if stage == "predictor":
                    table.add_row(name, stage, f"{m['max_abs']:.2e}", f"{m['mean_abs']:.2e}", "", "", "", "",
                                  f"{m['cosine']:.7f}", ok)
                else:
                    table.add_row(name, stage, f"{m['max_abs']:.2e}", f"{m['mean_abs']:.2e}", f"{m['psnr_db']:.1f}",
                                  f"{m['differing_share']:.2%}", f"{m['share_over_8_levels']:.2%}",
                                  str(m["max_levels"]), "", ok)
        console.print(table)
        for name, b in rep.backends.items():
            for f in b["failures"]:
                err_console.print(f"[red]{name}: {f}[/]", highlight=False)
        console.print(f"report: {rep.report_dir}")
    verdict = "PASSED" if rep.passed else "FAILED"
    colour = "green" if rep.passed else "red"
    console.print(f"[bold {colour}]{verdict}[/] | {time.perf_counter() - t0:.1f} s | asap validate {bundle_dir} "
                  f"--precision {precision} --backend {' --backend '.join(names)}", highlight=False)
    if not rep.passed:
        raise ValidationFailed(f"{', '.join(n for n, b in rep.backends.items() if not b['passed'])} outside the "
                               f"{precision} thresholds (see {rep.report_dir}/report.json)")



@app.command()
@cli_errors
def quantize(
    bundle_dir: Path = typer.Argument(..., help="Bundle folder written by `asap export` (the int8 graphs are added to it)."),
    more_maps: Optional[list[str]] = typer.Argument(None, metavar="MAPS", help="More calibration maps (files, "
                                                    "folders, globs): a shell-expanded --calib maps/*.png lands here."),
    calib: list[str] = typer.Option([], "--calib", help="Calibration label maps: PNG files, folders of PNGs or globs, "
                                    "read as `asap infer` reads them (ids or palette colours; sizes padded to "
                                    "multiples of S). Repeatable."),
    method: str = typer.Option("ort", "--method", help="ort (= ort-minmax), ort-entropy, ort-percentile: ONNX "
                               "Runtime's QDQ quantizer with that calibration; nncf: OpenVINO's NNCF (the openvino "
                               "extra; its graphs run int8 in OpenVINO, ONNX Runtime runs their Convs in fp32)."),
    samples: int = typer.Option(8, "--samples", help="Calibration maps (1..256): a deterministic subset (--seed) of "
                                "the maps given."),
    holdout: int = typer.Option(4, "--holdout", help="Further maps the fidelity gate runs on (0..64; with none left "
                                "over, it runs on the calibration maps and says so)."),
    layers: str = typer.Option("heavy", "--layers", help="heavy: the largest Convs holding >= 90% of the predictor's "
                               "work (the narrow early ones stay fp32); all: every Conv."),
    keep_float: list[str] = typer.Option(["auto"], "--keep-float", help="A Conv node of the predictor (or 'pixelwise') "
                                         "to keep in fp32, e.g. one the sensitivity scan names. Repeatable. auto (the "
                                         "default): when the gate fails, keep in fp32 the layer the scan finds recovers "
                                         "most, check again, up to 4 layers (each >= 0.5 dB); names alone turn auto "
                                         "off, 'auto' with names adds it; none: keep nothing."),
    pixelwise: str = typer.Option("fp32", "--pixelwise", help="The pixelwise MLP's MatMuls: fp32 (measured no slower "
                                  "than int8 on CPU), int8, or auto (int8 unless that stage alone fails the gate)."),
    activations: str = typer.Option("uint8", "--activations", help="ONNX Runtime methods: uint8 (asymmetric, the "
                                    "best fidelity) or int8 (symmetric: the graphs TensorRT builds, asap build-engine "
                                    "--int8)."),
    instances: Optional[Path] = typer.Option(None, "--instances", help="Folder of instance maps (models with instance "
                                             "edges), matched by name as `asap infer` does."),
    palette: Optional[str] = typer.Option(None, "--palette", help="Palette of colour label maps (default: the "
                                          "bundle's)."),
    sensitivity: bool = typer.Option(False, "--sensitivity", help="Run the per-layer sensitivity scan even when the "
                                     "gate passes (it always runs when the gate fails)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the int8 graphs of a bundle quantized before "
                                   "(every other file is kept byte-identical)."),
    force: bool = typer.Option(False, "--force", help="Write the int8 graphs even when they fail the fidelity gate "
                               "(the manifest records the failure)."),
    seed: int = seed_option("Seed of the calibration subset"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Calibrate on your label maps, write int8 (QDQ) graphs into the bundle, gated on fidelity vs fp32."""
    import time

    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from asap_deploy.app.infer import interrupt_on_sigterm
    from asap_deploy.app.quantize import QuantizeRequest, run_quantize
    from asap_deploy.errors import ValidationFailed

    t0 = time.perf_counter()
    req = QuantizeRequest(calib=[*calib, *(more_maps or [])], method=method, samples=samples, holdout=holdout,
                          layers=layers, keep_float=tuple(keep_float), pixelwise=pixelwise, activations=activations,
                          overwrite=overwrite,
                          force=force, seed=seed, palette=palette, instances=instances,
                          sensitivity="always" if sensitivity else "on-failure")
    req.check()
    interrupt_on_sigterm()
    # bound to the stream now: the quantizers' own chatter is silenced while they run
    bar_console = Console(file=sys.stderr if as_json else sys.stdout, width=console.width if not as_json else None)
    bar = Progress(TextColumn("[bold]quantize[/]"), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=bar_console, transient=True)
    state: dict = {}

    def on_step(step: str, done: int, total: int) -> None:
        if state.get("step") != step:
            state["step"] = step
            if "task" in state:
                bar.remove_task(state["task"])
            state["task"] = bar.add_task(step, total=total or None)
        bar.update(state["task"], completed=done, total=total or None)

    with bar:
        summary = run_quantize(bundle_dir, req, progress=on_step)
    res, g = summary.result, summary.result.gate
    if as_json:
        console.print_json(json.dumps(summary.to_dict()))
    else:
        d = res.description
        for note in summary.notes:
            console.print(f"[dim]note: {escape(note)}[/]", highlight=False)
        console.print(f"calibrated on {len(summary.calibration)} map(s), gate on {len(summary.evaluation) or len(summary.calibration)} "
                      f"({escape(d['evaluated_on'])}); method {d['method']} ({d['tool']['name']} {d['tool']['version']})",
                      highlight=False)
        console.print(f"int8: {len(res.int8_convs)} Conv(s) ({d['int8_conv_work_share']:.0%} of the predictor's work); "
                      f"fp32: {', '.join(res.float_convs) or 'none'}; pixelwise {escape(res.pixelwise)}", highlight=False)
        for k in d.get("kept_in_fp32", []):
            console.print(f"kept in fp32: {escape(k['name'])} ({escape(k['reason'])})", highlight=False)
        if d.get("keep_float_auto") and not res.kept_auto and g.passed:
            console.print("auto keep-float: nothing kept (the gate passed as quantized)", highlight=False)
        t = g.thresholds
        table = Table(title=f"{bundle_dir}: int8 vs the bundle's fp32 graphs (ONNX Runtime), worst of {g.maps} map(s)")
        for col in ("stage", "PSNR dB", "mean abs", "> 8 levels", "max levels", "cosine", "ok"):
            table.add_column(col)
        lim = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        table.add_row("[dim]threshold[/]", f">= {t['psnr_db']:g}", f"<= {lim(t['mean_abs'], 'g')}",
                      f"<= {lim(t.get('share_over_8_levels'), '.0%')}", "", f">= {t['params_cosine']}", "")
        for stage, m in g.stages.items():
            ok = "[green]ok[/]" if not m["failures"] else "[red]FAIL[/]"
            if stage == "predictor":
                table.add_row(stage, "", f"{m['mean_abs']:.2e}", "", "", f"{m['cosine']:.5f}", ok)
            else:
                table.add_row(stage, f"{m['psnr_db']:.1f}", f"{m['mean_abs']:.2e}", f"{m['share_over_8_levels']:.2%}",
                              str(m["max_levels"]), "", ok)
        console.print(table)
        for f in g.failures:
            err_console.print(f"[red]{escape(f)}[/]", highlight=False)
        if res.sensitivity is not None:
            s = res.sensitivity
            st = Table(title=f"kept in fp32, one at a time: end-to-end PSNR (quantized as is: {s.base_psnr_db:.1f} dB, "
                             f"mean of {s.maps} map(s))")
            for col in ("layer", "op", "PSNR dB", "recovers dB"):
                st.add_column(col)
            for r in s.rows[:req.top]:
                st.add_row(r.keep_float, r.op_type, f"{r.psnr_db:.1f}", f"{r.gain_db:+.1f}")
            console.print(st)
            if s.top and s.top_together_psnr_db is not None:
                flags = " ".join(f"--keep-float {n}" for n in s.top)
                console.print(f"the top {len(s.top)} together in fp32: {s.top_together_psnr_db:.1f} dB "
                              f"(asap quantize ... {escape(flags)})", highlight=False)
    out = err_console if as_json else console  # --json: stdout holds the JSON alone
    if summary.written:
        verdict = "PASSED" if g.passed else "FORCED"
        colour = "green" if g.passed else "yellow"
        out.print(f"[bold {colour}]{verdict}[/] | {time.perf_counter() - t0:.1f} s | wrote predictor.int8.onnx, "
                  f"pixelwise.int8.onnx, asap.int8.onnx into {bundle_dir} | run them: asap infer ... --bundle "
                  f"{bundle_dir} --precision int8", highlight=False)
    else:
        out.print(f"[bold red]FAILED[/] | {time.perf_counter() - t0:.1f} s | asap quantize {bundle_dir} "
                  f"--method {method}: nothing written", highlight=False)
        raise ValidationFailed(f"the int8 graphs fail the int8 fidelity thresholds ({'; '.join(res.gate.failures)}); "
                               f"{bundle_dir} is unchanged. Keep the layers above in fp32 (--keep-float), calibrate on "
                               "more or other maps, or pass --force to write them anyway")


@app.command("compile-kernels")
@cli_errors
def compile_kernels(
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for the cubin/PTX files, their JSON and index.json."),
    arch: str = typer.Option("sm_80,sm_86,sm_89,sm_90", "--arch", help="Comma-separated CUDA architectures."),
    preset: list[str] = typer.Option(["facades", "cityscapes"], "--preset",
                                     help="Preset(s) whose kernel shapes (S, widths) to compile."),
    config: Optional[Path] = config_option(" Replaces --preset."),
    params_dtype: str = typer.Option("fp16", "--params-dtype",
                                     help="Parameter-grid dtypes: fp16, fp32 (the re-pack pre-pass gives fp16)."),
    out_dtype: str = typer.Option("fp32,fp16", "--out-dtype", help="Output dtypes: fp32, fp16, u8."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the kernels of a folder that already holds an index.json."),
) -> None:
    """Compile the fused kernel ahead of time for GPUs (no GPU needed): cubin + PTX + JSON metadata."""
    import time

    from asap_deploy.app.kernels import ROW_COLUMNS, compile_for

    t0 = time.perf_counter()
    with console.status("compiling") as status:
        res = compile_for(out_dir, arch, preset, config, params_dtype, out_dtype, overwrite=overwrite,
                          progress=lambda msg: status.update(f"compiling {msg}"))
    table = Table(title=f"{out_dir} (Triton {res.triton_version})")
    for col in ROW_COLUMNS:
        table.add_column(col)
    for row in res.rows():
        table.add_row(*row)
    console.print(table)
    console.print(f"[bold green]PASSED[/] | {res.count} kernels | {time.perf_counter() - t0:.1f} s | "
                  f"asap compile-kernels --arch {res.arch_option()} -o {out_dir}", highlight=False)


@app.command("build-engine")
@cli_errors
def build_engine(
    bundle_dir: Path = typer.Argument(..., help="Bundle folder written by `asap export`."),
    fp16: bool = typer.Option(False, "--fp16", help="FP16 engine (from the bundle's fp16 ONNX; TensorRT 10 without "
                              "fp16 graphs: the FP16 builder flag)."),
    int8: bool = typer.Option(False, "--int8", help="INT8 engine from the bundle's int8 QDQ graphs (asap quantize "
                              "--activations int8: TensorRT takes symmetric int8 only)."),
    flavor: Optional[str] = typer.Option(None, "--flavor", help="tensorrt (full TensorRT, needs a GPU) or rtx "
                                         "(TensorRT-RTX, builds ahead of time without a GPU). Default: tensorrt if "
                                         "installed, else rtx."),
    stage: str = typer.Option("all", "--stage", help="predictor, pixelwise, end-to-end or all."),
    min_shape: Optional[str] = typer.Option(None, "--min", help="Smallest NxHxW (default 1xSxS; N 1..256, H and W "
                                            "1..65536, N*H*W at most 2^30)."),
    opt_shape: Optional[str] = typer.Option(None, "--opt", help="NxHxW TensorRT optimizes for (default 1x1024x1024; "
                                            "same ranges)."),
    max_shape: Optional[str] = typer.Option(None, "--max", help="Largest NxHxW (default 4x2048x2048; same ranges)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Target architectures, e.g. sm_86,sm_89 (rtx; default "
                                       "sm_75,sm_80,sm_86,sm_89,sm_120). tensorrt: the GPU it runs on."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the engines (default: the bundle)."),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="Timing cache file, full TensorRT (default: "
                                                "BUNDLE_DIR/timing.<flavor>.cache)."),
    as_json: bool = typer.Option(False, "--json", help="Print the sidecars as JSON."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace engines that already exist (checked before building any)."),
) -> None:
    """Build TensorRT engines (+ JSON sidecars) from a bundle; the SpatialMLP node becomes the asap plugin."""
    import time

    from asap_deploy.app.build import ENGINE_COLUMNS, build_engine as run_build, check_build_args, with_rtx_restart

    check_build_args(bundle_dir, flavor=flavor, fp16=fp16, arch=arch, stage=stage, min_shape=min_shape,
                     opt_shape=opt_shape, max_shape=max_shape, timing_cache=timing_cache, int8=int8)
    t0 = time.perf_counter()

    def build():
        with console.status("building") as status:
            return run_build(bundle_dir, flavor=flavor, stage=stage, fp16=fp16, arch=arch, min_shape=min_shape,
                             opt_shape=opt_shape, max_shape=max_shape, out=out, timing_cache=timing_cache,
                             overwrite=overwrite, progress=lambda msg: status.update(msg), int8=int8)

    # TensorRT-RTX's parser needs libtensorrt_rtx.so on LD_LIBRARY_PATH at process start: restart once
    res = with_rtx_restart(build, _restart_note)
    flavor, built = res.flavor, res.built
    if as_json:
        console.print_json(json.dumps(res.sidecars()))
    else:
        table = Table(title=f"{built[0].path.parent}: {flavor} engines ({'int8' if int8 else 'fp16' if fp16 else 'fp32'})")
        for col in ENGINE_COLUMNS:
            table.add_column(col)
        for row in res.rows():
            table.add_row(*row)
        console.print(table)
        if fp16:
            console.print(f"fp16: {built[0].sidecar['fp16_method']}")
    console.print(f"[bold green]PASSED[/] | {len(built)} engine(s) | {time.perf_counter() - t0:.1f} s | asap build-engine "
                  f"{bundle_dir} --flavor {flavor} --stage {stage}{' --fp16' if fp16 else ''}{' --int8' if int8 else ''}",
                  highlight=False)


@app.command("make-data")
@cli_errors
def make_data(
    out: Path = typer.Argument(..., help="Folder to write the data set to (facades layout: train/val)."),
    n: int = typer.Option(200, "--n", help="Training pairs (1..100000)."),
    n_val: Optional[int] = typer.Option(None, "--n-val", help="Held-out pairs (1..100000; default: n/4)."),
    size: int = typer.Option(64, help="Image side in pixels (a multiple of 16 in 32..4096)."),
    classes: int = typer.Option(6, help="Number of label classes (2..255)."),
    seed: int = seed_option("Random seed: the same seed writes the same files"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the data set in a folder that is not empty."),
) -> None:
    """Write a synthetic paired data set whose textures depend on class AND pixel position."""
    from asap_deploy.app.train import make_data as run_make_data

    info = run_make_data(out, n, n_val, size, classes, seed, overwrite=overwrite)
    console.print(f"wrote {info['train']} training and {info['val']} held-out pairs ({size}x{size}, "
                  f"{classes} classes, seed {seed}) to {out}/ (facades layout; dataset.json describes it)")


# The data check before training shows a progress bar from this many pairs on (small sets finish at once).
CHECK_BAR_MIN = 200


def _data_check_progress():
    """(on_check(done, total), stop()): a transient 'checking data' bar, started only for large sets."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    state: dict = {}

    def on_check(done: int, total: int) -> None:
        if total < CHECK_BAR_MIN:
            return
        if "bar" not in state:
            state["bar"] = Progress(TextColumn("[bold]checking data[/]"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), console=console, transient=True)
            state["bar"].start()
            state["task"] = state["bar"].add_task("check", total=total)
        state["bar"].update(state["task"], completed=done)
        if done >= total:
            stop()

    def stop() -> None:
        bar = state.pop("bar", None)
        if bar is not None:
            bar.stop()

    return on_check, stop


def _progress_bar(total: Optional[int], minutes: Optional[float]):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn() if total else TextColumn("{task.completed} steps"),
                    TimeElapsedColumn(), TextColumn("{task.fields[losses]}"), console=console, transient=False)


@app.command()
@cli_errors
def train(
    out: Path = typer.Option(..., "--out", help="Run folder: model.pt, train_state.pt, losses.jsonl, loss_curve.png."),
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset folder (facades, cityscapes or pix2pixHD layout, auto-detected)."),
    label_dir: Optional[Path] = typer.Option(None, "--label-dir", help="Custom layout: folder of label maps."),
    image_dir: Optional[Path] = typer.Option(None, "--image-dir", help="Custom layout: folder of target photos."),
    instance_dir: Optional[Path] = typer.Option(None, "--instance-dir", help="Custom layout: folder of instance maps."),
    preset: Optional[str] = preset_option(),
    config: Optional[Path] = config_option(),
    set_: list[str] = typer.Option([], "--set", help="Override a config field, e.g. --set label_nc=6 (repeatable)."),
    steps: Optional[int] = typer.Option(None, help="Total steps of the run (resumes included; 1..1000000000)."),
    minutes: Optional[float] = typer.Option(None, help="Wall-clock budget of this invocation (with --steps: whichever "
                                            "ends first; (0, 525600], a year)."),
    batch_size: int = typer.Option(1, "--batch-size", help="GLOBAL batch size (split across torchrun processes; 1..256)."),
    seed: int = seed_option("Seed: init, sample order and crops are functions of (seed, step)"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its train_state.pt."),
    lr_g: float = typer.Option(1e-4, "--lr-g", help="Generator learning rate (TTUR; (0, 1])."),
    lr_d: float = typer.Option(4e-4, "--lr-d", help="Discriminator learning rate (TTUR; (0, 1])."),
    decay_steps: Optional[int] = typer.Option(None, "--decay-steps", help="Linear LR decay to 0 over the last N steps (default steps/3; none with --minutes only; 0..1000000000)."),
    gan_weight: float = typer.Option(1.0, "--gan-weight", help="Hinge GAN loss weight (0 and --feat-weight 0: no discriminator; 0..1000000)."),
    feat_weight: float = typer.Option(10.0, "--feat-weight", help="Feature-matching loss weight (divided by the number of scales; 0..1000000)."),
    l1_weight: float = typer.Option(0.0, "--l1-weight", help="L1-to-target loss weight (the authors' --L1_loss used 100). Off by default; "
                                    "speeds up convergence on small CPU runs and synthetic data (0..1000000)."),
    vgg_weights: Optional[Path] = typer.Option(None, "--vgg-weights", help="LOCAL torchvision VGG19 weights file (a regular file): enables the perceptual loss (never downloaded)."),
    vgg_weight: float = typer.Option(10.0, "--vgg-weight", help="Perceptual loss weight (0..1000000)."),
    ndf: int = typer.Option(64, help="Discriminator base filters (1..1024)."),
    num_d: int = typer.Option(2, "--num-d", help="Discriminator scales (1..8)."),
    load_size: Optional[int] = typer.Option(None, "--load-size", help="Resize images to this width before cropping (16..16384)."),
    flip: bool = typer.Option(False, "--flip/--no-flip", help="Random horizontal flips (off: synthetic textures depend on position)."),
    save_every: int = typer.Option(500, "--save-every", help="Checkpoint every N steps (and at the end; 1..1000000000)."),
    log_every: int = typer.Option(10, "--log-every", help="Log losses every N steps (1..1000000000)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda (torchrun: one GPU per process)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads per process (default: torch's choice; 1..4 x the "
                                          "cores here)."),
) -> None:
    """Train ASAP-Net (SPADE recipe: multiscale PatchGAN, hinge + feature matching [+ VGG] [+ L1], TTUR Adam).

    Data parallel: torchrun --nproc-per-node=2 --no-python asap train ... (gloo on CPU, NCCL on GPUs).

    Before step 1 (and again on --resume) every training pair is read once: files pair up, sizes match and
    fit the crop, label ids are within label_nc. All problems are reported together (exit 5). This decodes
    the whole set once: about 1 ms per 256x256 pair and 30 ms per 2048x1024 pair on one core, on up to 8
    threads (Cityscapes' 2,975 pairs: under a minute); sets of 200+ pairs show a progress bar.
    """
    from asap_deploy.app.train import check_train_args, run_training, train_config, train_options
    from asap_deploy.errors import require_module, require_torch

    check_train_args(steps=steps, minutes=minutes, batch_size=batch_size, seed=seed, lr_g=lr_g, lr_d=lr_d,
                     decay_steps=decay_steps, weights={"--gan-weight": gan_weight, "--feat-weight": feat_weight,
                                                       "--l1-weight": l1_weight, "--vgg-weight": vgg_weight},
                     ndf=ndf, num_d=num_d, load_size=load_size, save_every=save_every, log_every=log_every,
                     threads=threads, vgg_weights=vgg_weights)
    require_torch("asap train")
    require_module("matplotlib", "asap train (its loss_curve.png)")  # checked before training, not at the first save
    cfg = train_config(preset, config, set_, data, resume)
    opts = train_options(steps=steps, minutes=minutes, batch_size=batch_size, seed=seed, lr_g=lr_g, lr_d=lr_d,
                         decay_steps=decay_steps, lambda_gan=gan_weight, lambda_feat=feat_weight, lambda_l1=l1_weight,
                         vgg_weights=str(vgg_weights) if vgg_weights else None, lambda_vgg=vgg_weight, ndf=ndf,
                         num_d=num_d, load_size=load_size, flip=flip, save_every=save_every, log_every=log_every)
    main_proc = int(os.environ.get("RANK", "0")) == 0
    bar = _progress_bar(steps, minutes) if main_proc else None
    state = {}

    def on_start(trainer):
        if bar is not None:
            bar.start()
            state["task"] = bar.add_task("train", total=trainer.opts.steps, completed=trainer.step, losses="")

    def on_step(step, total, losses):
        if bar is not None:
            text = " ".join(f"{k}={v:.3f}" for k, v in losses.items())
            bar.update(state["task"], completed=step, losses=text)

    on_check, stop_check = _data_check_progress() if main_proc else (None, lambda: None)
    try:
        summary, interrupted = run_training(None if (resume and cfg is None) else cfg, opts, out, data=data,
                                            label_dir=label_dir, image_dir=image_dir, instance_dir=instance_dir,
                                            resume=resume, device=device, on_step=on_step, on_start=on_start,
                                            threads=threads, on_check=on_check)
    finally:
        stop_check()
        if bar is not None:
            bar.stop()
    if interrupted is not None:
        if main_proc:
            from rich.markup import escape

            again = " ".join(f"{flag} {value}" for flag, value in (
                ("--data", data), ("--label-dir", label_dir), ("--image-dir", image_dir),
                ("--instance-dir", instance_dir), ("--steps", steps), ("--minutes", minutes)) if value is not None)
            if interrupted.step is None:
                text = "interrupted before the first checkpoint: nothing was saved; start the run again"
            else:
                text = (f"interrupted: step {interrupted.step} is saved in {interrupted.state_path}; continue with: "
                        f"asap train --out {out} --resume{' ' + again if again else ''}")
            err_console.print(f"[yellow]{escape(text)}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(130)
    if main_proc:
        console.print(f"trained {summary['steps_this_run']} steps (total {summary['steps']}) in {summary['seconds']:.0f} s "
                      f"on {summary['world_size']} process(es), {summary['device']}; {summary['samples']} training pairs")
        for k, v in summary["paths"].items():
            console.print(f"  {k:9s} {v}")


@app.command()
@cli_errors
def demo(
    out: Path = typer.Option(Path("asap_demo"), "--out", help="Folder for the data set, the run and the pictures."),
    minutes: float = typer.Option(2.0, help="Training time budget ((0, 1440] minutes)."),
    steps: Optional[int] = typer.Option(None, help="Stop after this many steps instead (or earlier, at --minutes; "
                                        "1..1000000)."),
    seed: int = seed_option("Seed of the data set and the training run"),
    threads: int = typer.Option(1, help="CPU threads of training (1..4 x the cores here; 1: the small model gains "
                                "little from more, and suffers badly when the cores are shared). The bench step "
                                "uses `asap bench`'s settings (and says them)."),
    bench_size: int = typer.Option(1024, "--bench-size", help="Side of the square label map the bench step times "
                                   "(a multiple of 16 in 16..4096)."),
    bench_duration: Optional[float] = typer.Option(None, "--bench-duration", help="Minimum timed seconds per bench "
                                                   "row (0..600; default: `asap bench`'s --duration)."),
) -> None:
    """The whole pipeline on a CPU in a few minutes: synthetic data, train a small ASAP-Net, export, validate ONNX
    Runtime against PyTorch, infer (also at --scale 2 and 4), a short bench at 1024x1024; one folder + index.html."""
    from asap_deploy.app.demo import check_demo_args, run_demo

    check_demo_args(minutes=minutes, steps=steps, seed=seed, threads=threads, bench_size=bench_size,
                    bench_duration=bench_duration)

    bar = _progress_bar(steps, minutes)
    state = {}

    def on_event(kind, **kw):
        if kind == "stage":
            console.print(f"[bold]{kw['text']}[/]")
        elif kind == "note":
            console.print(f"  [dim]{kw['text']}[/]", highlight=False)
        elif kind == "train_start":
            bar.start()
            state["task"] = bar.add_task("train", total=kw.get("total"), completed=0, losses="")
        elif kind == "step":
            bar.update(state["task"], completed=kw["step"],
                       losses=" ".join(f"{k}={v:.3f}" for k, v in kw["losses"].items()))
        elif kind == "train_end":
            bar.stop()

    try:
        result = run_demo(out, minutes=minutes, steps=steps, seed=seed, on_event=on_event, threads=threads,
                          bench_size=bench_size, bench_seconds=bench_duration)
    finally:
        bar.stop()
    q = result["quality"]
    console.print(f"held-out PSNR: model {q['psnr_model']:.2f} dB | per-class mean colour {q['psnr_class_mean']:.2f} dB | "
                  f"constant mean colour {q['psnr_constant_mean']:.2f} dB ({result['steps']} steps)")
    v = result["validation"]
    console.print(f"ONNX Runtime vs PyTorch: {'[green]PASSED[/]' if v['passed'] else '[red]FAILED[/]'} ({v['report']})")
    table = Table(title=f"latency at {bench_size}x{bench_size} (median ms; speed-up vs the authors' forward)")
    for col in ("backend", "stage", "median ms", "speed-up"):
        table.add_column(col)
    for r in result["bench"]:
        table.add_row(r["backend"], r["stage"], "-" if r["median_ms"] is None else f"{r['median_ms']:.1f}",
                      "-" if r["speedup_vs_authors"] is None else f"{r['speedup_vs_authors']:.2f}x")
    console.print(table)
    from rich.markup import escape

    console.print(f"bench settings (those of `asap bench --size {bench_size}`): {escape(result['bench_settings'])}",
                  highlight=False)
    for w in result["bench_warnings"]:
        console.print("[yellow]warning:[/] " + escape(w), highlight=False)
    console.print("wrote:")
    groups: dict = {}
    for path in map(Path, result["files"]):
        if path.parent.name == "results":  # one line per kind of picture
            groups.setdefault((path.parent, path.name.split("_")[0]), []).append(path.name)
        else:
            console.print(f"  {path}")
    what = {"label": "label maps (ids)", "compare": "label | generated | target"}
    for (folder, kind), names in groups.items():
        span = names[0] if len(names) == 1 else f"{names[0].rsplit('.', 1)[0]}..{names[-1].split('_')[-1]}"
        console.print(f"  {folder}/{span} ({len(names)} {what.get(kind, kind)})")
    console.print(f"[bold]open {(out / 'index.html').resolve()}[/] to see it all on one page")
    if not v["passed"]:
        from asap_deploy.errors import ValidationFailed

        raise ValidationFailed(f"the demo's bundle failed validation (see {v['report']}/report.json)")


def _infer_on_ray(inputs, source, opts, backend: str, address: str, actors: int, as_json: bool) -> None:
    """`asap infer --ray`: the same per-file results and exit code as local infer (asap_deploy/app/ray_infer.py)."""
    from rich.markup import escape

    from asap_deploy.app.ray_infer import RayOptions, ray_infer

    with console.status(f"translating on Ray ({address}, {actors} actor(s))"):
        summary = ray_infer(inputs, source, opts, backend, RayOptions(address=address, actors=actors))
    if not as_json:
        for r in summary.failed:
            console.print(f"[red]failed:[/] {escape(r.error)}", highlight=False)
    _infer_verdict(summary, opts.out_dir, as_json, f" on Ray ({address})")


def _infer_verdict(summary, out_dir: Path, as_json: bool, where: str = "") -> None:
    """The end of `asap infer`, local or --ray: the JSON summary or the PASSED/FAILED line; InputError
    naming the first failed inputs if any failed."""
    from rich.markup import escape

    from asap_deploy.errors import InputError

    if as_json:
        console.print_json(json.dumps(summary.to_dict()))
    n_ok, n_skip, n_bad = len(summary.written), len(summary.skipped_files), len(summary.failed)
    line = (f"{n_ok} image(s) written to {out_dir}, {n_skip} skipped, {n_bad} failed | {summary.seconds:.2f} s | "
            f"{summary.images_per_s:.2f} images/s | backend {summary.backend}{where}")
    if not as_json:
        console.print(f"[bold {'green' if not n_bad else 'red'}]{'PASSED' if not n_bad else 'FAILED'}[/] | {escape(line)}",
                      highlight=False)
    if summary.stopped_early:
        err_console.print("[yellow]stopped at the first failure (--fail-fast)[/]")
    if n_bad:
        raise InputError(f"{n_bad} of {n_bad + n_ok + n_skip} input(s) failed: "
                         + "; ".join(str(r.input) for r in summary.failed[:5]) + (" ..." if n_bad > 5 else ""))


@app.command()
@cli_errors
def infer(
    inputs: list[str] = typer.Argument(..., help="Label maps: PNG files, folders, globs (8/16-bit ids, palette PNGs, "
                                       "or colour PNGs in --palette)."),
    model: Optional[Path] = typer.Option(None, "--model", help="Checkpoint (.pt, a regular file): runs on torch."),
    bundle_dir: Optional[Path] = typer.Option(None, "--bundle", help="Bundle folder written by `asap export`."),
    engine_file: Optional[Path] = typer.Option(None, "--engine", help="TensorRT engine written by `asap build-engine`."),
    backend: str = typer.Option("auto", "--backend", "-b", help=f"auto, {', '.join(ENGINE_NAMES)} (auto: the first "
                                f"usable backend that runs --precision, fastest first: {auto_order_text()})."),
    out: Path = typer.Option(Path("asap_out"), "-o", "--out", help="Output folder: one PNG per input, same base name."),
    palette: Optional[str] = typer.Option(None, "--palette", help="Colour label maps: cityscapes, facades, ade20k or "
                                          "FILE.json (default: the bundle's palette)."),
    instances: Optional[Path] = typer.Option(None, "--instances", help="Instance map file or folder (matched by name)."),
    scale: Optional[float] = typer.Option(None, "--scale", help="Render K times larger (K a real number in 1..1024; "
                                          "each output, ceil(H*K) x ceil(W*K), at most --max-pixels, checked from "
                                          "the input's header): the MLP on a denser pixel grid, the parameter grid "
                                          "from the input's own resolution."),
    hires_labels: Optional[Path] = typer.Option(None, "--hires-labels", help="With --scale: label maps at the output "
                                                "resolution (file or folder, matched by name)."),
    side_by_side: bool = typer.Option(False, "--side-by-side", help="Write label | output pairs."),
    batch: int = typer.Option(4, "--batch", help="Inputs of the same size per engine call (1..256)."),
    precision: str = typer.Option("fp32", "--precision", help=f"Graphs/engines at: {precision_choices()} "
                                  f"({PRECISION_NOTE})."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop at the first bad input."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files (default: such an "
                                   "input fails and the others go on)."),
    skip_existing: bool = typer.Option(False, "--skip-existing", help="Resume: skip inputs whose output asap already "
                                       "wrote (reported as skipped; a file asap did not write still fails)."),
    max_pixels: int = typer.Option(64 * 1024 * 1024, "--max-pixels", help="Refuse label maps whose header declares "
                                   "more pixels than this, before decoding them, and outputs (--scale, "
                                   "--side-by-side) larger than this (1..1073741824; default 64 Mpx)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead of the progress display."),
    ray_address: Optional[str] = typer.Option(None, "--ray", help="Run on Ray Data: local (a Ray instance on this "
                                              "machine), auto (this machine's cluster) or ray://HOST:PORT."),
    ray_actors: int = typer.Option(2, "--ray-actors", help="With --ray: actors in the pool, one engine each (1..1024)."),
    threads: Optional[int] = engine_threads_option("; with --ray: per actor, default the 1 CPU Ray reserves for each"),
) -> None:
    """Translate label maps to photos: one PNG per input (written atomically); non-zero exit if any input failed."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from asap_deploy.app.infer import (InferOptions, Source, check_skip_existing, check_threads, choose_backend,
                                       infer as run_infer, open_engine)

    from asap_deploy.app.infer import interrupt_on_sigterm
    from asap_deploy.app.options import MAX_BATCH, check_max_pixels, check_range
    from asap_deploy.app.scale import check_scale

    check_range("--batch", batch, 1, MAX_BATCH)
    check_max_pixels("--max-pixels", max_pixels)
    if scale is not None:
        check_scale(scale, max_pixels)
    check_range("--ray-actors", ray_actors, 1, 1024)
    check_threads(threads)
    _source_kinds(model, bundle_dir, engine_file)  # a hint for a path of the wrong kind comes first
    _checkpoint_arg("--model", model)
    _checkpoint_arg("--engine", engine_file, engine=True)
    interrupt_on_sigterm()
    source = Source(model=model, bundle=bundle_dir, engine=engine_file)
    opts = InferOptions(out_dir=out, palette=palette, instances=instances, hires_labels=hires_labels, scale=scale,
                        side_by_side=side_by_side, batch_size=batch, fail_fast=fail_fast, precision=precision,
                        overwrite=overwrite, skip_existing=skip_existing, max_pixels=max_pixels, cpu_threads=threads)
    check_skip_existing(opts)  # a usage error before the backend is chosen
    check_threads(threads)
    choice = choose_backend(backend, source, precision, scale)
    if not as_json:
        console.print(f"backend: [bold]{choice.backend}[/] ({escape(choice.reason)})", highlight=False)
        for s in choice.skipped:
            console.print(f"  [dim]skipped {escape(s)}[/]", highlight=False)
    if ray_address is not None:
        return _infer_on_ray(inputs, source, opts, backend, ray_address, ray_actors, as_json)
    with console.status("loading the model"):
        engine, _ = open_engine(choice, source, precision, threads)
    bar = Progress(TextColumn("[bold]infer[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[name]}"), console=err_console if as_json else console, transient=as_json)

    def on_file(done, total, r):
        if "task" not in state:
            state["task"] = bar.add_task("infer", total=total, name="")
        bar.update(state["task"], completed=done, name=r.input.name)
        if as_json:
            return
        if r.error:
            bar.console.print(f"[red]failed:[/] {escape(r.error)}", highlight=False)
        elif r.note:
            bar.console.print(f"[dim]note: {escape(str(r.input))}: {escape(r.note)}[/]", highlight=False)

    state: dict = {}
    try:
        with bar:
            summary = run_infer(inputs, source, opts, backend, progress=on_file, engine=engine, choice=choice)
    finally:
        engine.close()
    _infer_verdict(summary, out, as_json)


@app.command()
@cli_errors
def bench(
    model: Optional[Path] = typer.Option(None, "--model", help="Checkpoint (.pt): exported to a temporary bundle first."),
    bundle_dir: Optional[Path] = typer.Option(None, "--bundle", help="Bundle folder written by `asap export`."),
    engine_file: Optional[Path] = typer.Option(None, "--engine", help="A TensorRT engine (its folder is the bundle)."),
    backends: list[str] = typer.Option([], "--backends", "-b", help=f"{', '.join(BACKEND_NAMES)} "
                                       "(repeat or comma-separate; default: all usable here). The authors' forward is "
                                       "always included as the baseline."),
    size: list[str] = typer.Option(["1024x1024"], "--size", help="HxW or N (repeatable; sides 1..65536, multiples "
                                   "of the model's S; batch x H x W at most --max-pixels)."),
    batch: list[int] = typer.Option([1], "--batch", help="Batch size(s) (repeatable; 1..256)."),
    precision: list[str] = typer.Option(["fp32"], "--precision", help=f"{', '.join(PRECISIONS)} and/or all "
                                        "(repeat or comma-separate; all: every precision each backend runs, skipping "
                                        f"with the reason those the bundle has no graphs for): {precision_choices()}. "
                                        "The authors' baseline is fp32, measured once; every row's ratio is to it."),
    warmup: float = typer.Option(0.2, "--warmup", help="Warm-up seconds per row (0..60; at least one call)."),
    iterations: int = typer.Option(3, "--iterations", help="Minimum timed calls per row (1..100000)."),
    duration: float = typer.Option(2.0, "--duration", help="Minimum timed seconds per row (0..600): a longer "
                                   "duration buys more samples."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads of every CPU backend (torch, the "
                                          "authors' forward, ONNX Runtime, OpenVINO); each row records it (1..4 x the "
                                          "cores "
                                          "here; default: the cores this process may use)."),
    max_pixels: int = typer.Option(64 * 1024 * 1024, "--max-pixels", help="Largest batch x H x W of a row "
                                   "(1..1073741824; default 64 Mpx), checked before any work."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Folder for report.json, report.md, latency.png "
                                       "(default: a new folder per run, asap_bench, asap_bench2, ...; with "
                                       "--overwrite: asap_bench)."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Also write the JSON report here (its folder must "
                                             "exist)."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Measure peak memory per row."),
    sgemm: bool = typer.Option(True, "--sgemm/--no-sgemm", help="Measure the machine's fp32 GEMM rate first (about "
                               "2 s) and give each pixelwise CPU row its ratio to the stage's sgemm floor."),
    seed: int = seed_option("Seed of the random model (no model given) and the label maps"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace report.json/report.md/latency.png (and --json) if they exist (checked before measuring)."),
) -> None:
    """Latency per backend, precision, size and stage (min/mean/median/p90/p95/p99, cv, throughput, memory) vs the
    authors' fp32 forward (speed-ups on medians and on best times), with each row's output checked against the torch
    fp32 reference (PSNR, max abs) and each pixelwise CPU row's ratio to the machine's sgemm floor. One line per
    finished row (a progress bar on a terminal); exit 13 if a row failed (the reports are still written)."""
    from rich.markup import escape

    from asap_deploy.app.bench import (TERMINAL_COLUMNS, bench_options, check_outputs, check_source, failure_lines,
                                       footnotes, machine_text, settings_text, sgemm_text, skipped_lines, table_rows,
                                       write_reports)

    check_source(model, bundle_dir, engine_file)
    names = [b.strip() for item in backends for b in item.split(",") if b.strip()]
    precisions = list(dict.fromkeys(p for item in precision for p in item.split(",") if p))
    opts = bench_options(names, size, batch, precisions, warmup=warmup, iterations=iterations, duration=duration,
                         memory=memory, seed=seed, max_pixels=max_pixels, threads=threads, sgemm=sgemm)
    _source_kinds(model, bundle_dir, engine_file)  # a hint for a path of the wrong kind comes first
    _checkpoint_arg("--model", model)
    _checkpoint_arg("--engine", engine_file, engine=True)
    out, numbered = check_outputs(out, json_file, overwrite, [v for v in (bundle_dir, model, engine_file) if v is not None])
    rep = _bench_with_progress(opts, names, precisions, model, bundle_dir, engine_file, seed)

    table = Table(title=f"asap bench: {rep['model'].get('description', '')}")
    for col in TERMINAL_COLUMNS:
        table.add_column(col, overflow="fold")
    for row in table_rows(rep, TERMINAL_COLUMNS, short_status=True):
        style = "bold" if row[0] == "authors" else None
        table.add_row(*[escape(c) for c in row], style=style)
    console.print(table)
    for note in footnotes(rep):
        console.print(escape(note), highlight=False)
    for line in failure_lines(rep):  # whole, wrapped to the terminal
        console.print("[red]failed:[/] " + escape(line), highlight=False)
    for line in skipped_lines(rep):
        console.print("[dim]skipped:[/] " + escape(line), highlight=False)
    for w in rep["warnings"]:
        console.print("[yellow]warning:[/] " + escape(w), highlight=False)
    console.print("machine: " + escape(machine_text(rep)), highlight=False)
    if sgemm_text(rep):
        console.print(escape(sgemm_text(rep)), highlight=False)
    console.print(f"[dim]{escape(rep['timing'])}; settings: {escape(settings_text(rep))}; cv = std / mean, "
                  f"noisy above {rep['noisy_cv']:.0%}; PSNR / max abs (8-bit levels; cos / parameter units for the "
                  "predictor) vs the torch fp32 reference[/]", highlight=False)
    paths = write_reports(rep, out, json_file, numbered=numbered)
    console.print("wrote " + ", ".join(str(p) for p in paths.values() if p), highlight=False)
    failed = [r for r in rep["rows"] if r["status"] != "ok"]
    console.print(f"[bold {'green' if not failed else 'red'}]{'PASSED' if not failed else 'FAILED'}[/] | "
                  f"{len(rep['rows']) - len(failed)} ok, {len(failed)} failed row(s), {len(rep['warnings'])} "
                  f"warning(s) | {rep['seconds']:.1f} s", highlight=False)
    if failed:
        from asap_deploy.errors import BenchRowsFailed

        raise BenchRowsFailed(f"{len(failed)} of {len(rep['rows'])} row(s) failed (reasons above; the reports "
                              f"were written to {paths['json'].parent})")


def _bench_with_progress(opts, names, precisions, model, bundle_dir, engine_file, seed) -> dict:
    """Run `asap bench`'s rows with progress: on a terminal a rich progress bar (finished rows printed
    above it); otherwise (piped, redirected) one plain line per step and per finished row."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from asap_deploy.app.bench import row_line, run_rows

    live = console.is_terminal
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=console, transient=True) if live else None
    task = None

    def say(msg: str) -> None:
        if live:
            bar.update(task, description=escape(msg))
        else:
            console.print(escape(msg), highlight=False, soft_wrap=True)

    def on_row(row: dict, done: int, total: int) -> None:
        line = row_line(row, done, total)
        colour = "red" if row["status"] != "ok" else ("yellow" if row.get("noisy") else None)
        console.print(f"[{colour}]{escape(line)}[/]" if colour else escape(line), highlight=False,
                      soft_wrap=not live)
        if live:
            bar.update(task, completed=done, total=total)

    if live:
        bar.start()
        task = bar.add_task("benchmarking", total=None)
    try:
        return run_rows(opts, not names, precisions, model, bundle_dir, engine_file, seed, say=say,
                        planned=(lambda n: bar.update(task, total=n)) if live else None,
                        progress=lambda msg: say(f"benchmarking {msg}") if live else None, on_row=on_row)
    finally:
        if live:
            bar.stop()


@app.command()
@cli_errors
def doctor(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    kernel_cache: Optional[Path] = typer.Option(None, "--kernel-cache", help="AOT kernel cache folder to inspect "
                                                "(default: $ASAP_KERNEL_CACHE or ~/.cache/asap-deploy/kernels)."),
) -> None:
    """What is installed and usable here (torch, ONNX Runtime providers, CUDA, TensorRT, Triton, AOT kernels), and what to install."""
    from rich.markup import escape

    from asap_deploy.app.doctor import machine_info, machine_line, run_checks, usable_backends

    checks = run_checks(kernel_cache)
    backends = usable_backends(checks)
    if as_json:
        console.print_json(json.dumps({"machine": machine_info(), "checks": [c.to_dict() for c in checks],
                                       "backends": backends}))
        return
    table = Table(title="asap doctor")
    for col in ("component", "status", "version", "detail", "to fix"):
        table.add_column(col, overflow="fold")
    colour = {"ok": "green", "missing": "red", "warn": "yellow"}
    for c in checks:
        table.add_row(c.name, f"[{colour[c.status]}]{c.status}[/]", escape(c.version), escape(c.detail), escape(c.fix))
    console.print(table)
    console.print("machine: " + escape(machine_line(machine_info())), highlight=False)
    console.print("backends usable here: " + escape(", ".join(f"{k}: {v}" for k, v in backends.items())), highlight=False)


@app.command()
@cli_errors
def serve(
    source: Path = typer.Argument(..., help="Bundle folder (asap export) or TensorRT engine file (asap build-engine)."),
    backend: str = typer.Option("auto", "--backend", "-b", help=f"auto, {', '.join(ENGINE_NAMES)} (auto: as in "
                                "asap infer)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default loopback only; 0.0.0.0 for all)."),
    port: int = typer.Option(8000, "--port", help="HTTP port (1..65535; gRPC: --grpc-port, metrics: --metrics-port)."),
    grpc_port: int = typer.Option(8001, "--grpc-port", help="gRPC port (1..65535)."),
    metrics_port: int = typer.Option(8002, "--metrics-port", help="Prometheus metrics at /metrics (port 1..65535)."),
    max_batch: int = typer.Option(8, "--max-batch", help="Largest batch the dynamic batcher forms (same-size "
                                  "requests; 1..256)."),
    max_delay_ms: float = typer.Option(2.0, "--max-delay-ms", help="How long a request may wait for others of its "
                                       "size (0..10000 ms)."),
    precision: str = typer.Option("fp32", "--precision", help=f"Graphs/engines at: {precision_choices()} "
                                  f"({PRECISION_NOTE})."),
    threads: Optional[int] = engine_threads_option(),
    max_pixels: int = typer.Option(64 * 1024 * 1024, "--max-pixels", help="Refuse requests whose label maps hold "
                                   "more pixels than this (1..1073741824; default 64 Mpx)."),
) -> None:
    """Serve the model as `asap` on NVIDIA Triton Inference Server (PyTriton) until Ctrl-C / SIGTERM."""
    from rich.markup import escape

    from asap_deploy.app.infer import Source, check_threads, choose_backend, open_engine
    from asap_deploy.app.serve import ServeOptions, check_serve_dependencies, serve as run_serve
    from asap_deploy.app.options import MAX_BATCH, check_max_pixels, check_range

    check_range("--max-batch", max_batch, 1, MAX_BATCH)
    check_range("--max-delay-ms", max_delay_ms, 0.0, 10_000.0, unit="ms")
    check_max_pixels("--max-pixels", max_pixels)
    opts = ServeOptions(host=host, port=port, grpc_port=grpc_port, metrics_port=metrics_port, max_batch=max_batch,
                        max_delay_ms=max_delay_ms, max_pixels=max_pixels)
    opts.check()
    check_threads(threads)
    if source.exists() and not source.is_dir():
        _checkpoint_arg("SOURCE", source, engine=True)  # an engine file: never a FIFO or device
    check_serve_dependencies()
    src = Source(engine=source) if source.is_file() else Source(bundle=source)
    choice = choose_backend(backend, src, precision)
    console.print(f"backend: [bold]{choice.backend}[/] ({escape(choice.reason)})", highlight=False)
    with console.status("loading the model"):
        engine, _ = open_engine(choice, src, precision, threads)

    def ready(ep) -> None:
        d = ep.to_dict()
        console.print(f"[bold green]serving[/] model [bold]{d['model']}[/]: HTTP {d['http']}  gRPC {d['grpc']}  "
                      f"metrics {d['metrics']}  health {d['health']}  (Ctrl-C or SIGTERM stops it)", highlight=False)

    console.print("starting Triton Inference Server ...")
    try:
        run_serve(engine, opts, on_ready=ready)
    finally:
        engine.close()
    console.print("server stopped")


@app.command()
@cli_errors
def loadtest(
    url: str = typer.Argument("http://127.0.0.1:8000", help="http://HOST:PORT or grpc://HOST:PORT of a Triton server."),
    concurrency: int = typer.Option(1, "--concurrency", "-c", help="Requests in flight at once (1..1024)."),
    requests: Optional[int] = typer.Option(None, "--requests", "-n", help="Requests to send (1..1000000; default 100 "
                                           "unless --duration is given)."),
    duration: Optional[float] = typer.Option(None, "--duration", help="Stop after this many seconds ((0, 3600])."),
    size: list[str] = typer.Option(["256x256"], "--size", help="WxH of the label maps (repeat for a mix, at most 16; "
                                   "sides 1..65536; all sizes together at most --max-pixels)."),
    model: str = typer.Option("asap", "--model", help="Model name on the server."),
    label_nc: Optional[int] = typer.Option(None, "--label-nc", help="Draw ids from 0..N-1 (N in 1..65536; default: "
                                           "from the model config's parameters, else 0 only)."),
    timeout: float = typer.Option(60.0, "--timeout", help="Per-request timeout in seconds ((0, 3600])."),
    max_pixels: int = typer.Option(64 * 1024 * 1024, "--max-pixels", help="Largest total pixels of the --size label "
                                   "maps, which are held in memory (1..1073741824; default 64 Mpx)."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON to this file (its "
                                             "folder must exist)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the --json file if an earlier loadtest wrote it."),
) -> None:
    """Load a served `asap` model: throughput, latency min/median/p90/p99, errors (bounded in count and time)."""
    from asap_deploy.app.loadtest import LoadOptions, check_report_file, parse_wxh, run_loadtest, write_report

    sizes = [parse_wxh(s) for s in size]
    opts = LoadOptions(url=url, model=model, concurrency=concurrency,
                       requests=requests if requests is not None or duration is not None else 100,
                       duration_s=duration, sizes=sizes, label_nc=label_nc, timeout_s=timeout, max_pixels=max_pixels)
    opts.check()  # every option, before connecting
    if json_file is not None:
        check_report_file(json_file, overwrite)  # before connecting
    with console.status(f"load test on {url}"):
        rep = run_loadtest(opts).to_dict()
    table = Table(title=f"asap loadtest {url} (model {model}, concurrency {concurrency}, sizes {', '.join(rep['sizes'])})")
    for col in ("requests ok", "errors", "wall s", "req/s", "Mpx/s", "min ms", "median ms", "p90 ms", "p99 ms"):
        table.add_column(col)
    lat = rep["latency_ms"]
    f = (lambda k: f"{lat[k]:.1f}" if k in lat else "-")
    table.add_row(str(rep["requests_ok"]), str(rep["errors"]), f"{rep['wall_s']:.2f}", f"{rep['throughput_rps']:.2f}",
                  f"{rep['megapixels_per_s']:.2f}", f("min"), f("median"), f("p90"), f("p99"))
    console.print(table)
    for msg, n in rep["error_messages"].items():
        err_console.print(f"[red]{n} x[/] {msg}", highlight=False, markup=False)
    if json_file is not None:
        write_report(json_file, rep)  # ours to replace next time
        console.print(f"report: {json_file}")


if __name__ == "__main__":
    app()
