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

from asap_deploy.errors import AsapError

app = typer.Typer(
    name="asap",
    help="Deploy ASAP-Net (label map -> photo) from PyTorch to ONNX and TensorRT, and prove the fast engine "
    "still computes the same model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def cli_errors(fn):
    """Turn library errors into one red line and the error's exit code (traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AsapError as exc:
            if os.environ.get("ASAP_DEBUG"):
                raise
            err_console.print(f"[bold red]error:[/] {exc.message}", highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    if debug:
        os.environ["ASAP_DEBUG"] = "1"


def _load_config(preset: Optional[str], config: Optional[Path]):
    from asap_deploy.config import ModelConfig, preset as make_preset
    from asap_deploy.errors import ConfigError

    if preset and config:
        raise ConfigError("give either --preset or --config, not both")
    if config:
        try:
            text = config.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{config}: cannot read the config file: {exc.strerror}") from exc
        try:
            return ModelConfig.from_json(text)
        except ConfigError as exc:
            raise ConfigError(f"{config}: {exc.message}") from exc
    return make_preset(preset) if preset else None


PRESET_HELP = "Model preset: facades, cityscapes, ade20k or coco."
CONFIG_HELP = "Model config JSON file (fields of ModelConfig)."


@app.command()
@cli_errors
def inspect(
    checkpoint: Path = typer.Argument(..., help="Our checkpoint (.pt) or the authors' latest_net_G.pth."),
    preset: Optional[str] = typer.Option(None, help=PRESET_HELP),
    config: Optional[Path] = typer.Option(None, help=CONFIG_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Print a checkpoint's (inferred) config, parameter counts per stream and label set."""
    from asap_deploy.checkpoints import load_generator

    given = _load_config(preset, config)  # also refuses --preset with --config
    model, ck = load_generator(checkpoint, None if preset else given, preset=preset)
    cfg = ck.config
    n_lr = sum(v.numel() for v in model.lowres_stream.state_dict().values())
    dontcare = {True: "yes (id 255 -> last channel)", False: "no",
                None: "unknown: the checkpoint cannot tell; id 255 maps to the last channel"}[cfg.contain_dontcare_label]
    info = {
        "file": str(ck.path), "format": ck.kind, "config_source": ck.config_source,
        "config": cfg.to_dict(), "derived": cfg.describe(),
        "parameters": {"lowres_stream": n_lr, "pixelwise_stream": 0,
                       "predicted_per_tile": cfg.num_params},
        "labels": {"ids": f"0..{cfg.n_label_channels - 1}", "dontcare": dontcare,
                   "instance_edges": cfg.instance_edges},
    }
    if as_json:
        console.print_json(json.dumps(info))
        return
    table = Table(title=f"{checkpoint.name} ({ck.kind}, config {ck.config_source})", show_header=False)
    for k, v in cfg.to_dict().items():
        table.add_row(k, str(v))
    for k, v in cfg.describe().items():
        table.add_row(f"[dim]{k}[/]", str(v))
    table.add_row("low-res stream parameters", f"{n_lr:,} ({n_lr * 4 / 2**20:.1f} MiB fp32)")
    table.add_row("pixelwise stream parameters", "0 (all predicted per tile)")
    table.add_row("label ids", info["labels"]["ids"])
    table.add_row("don't care", dontcare)
    console.print(table)


if __name__ == "__main__":
    app()
