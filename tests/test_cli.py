"""The `asap` command line: help without torch, inspect, errors as one line + exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

from asap_deploy.checkpoints import save_generator
from asap_deploy.cli import app
from asap_deploy.config import ModelConfig
from asap_deploy.model import ASAPNetGenerator
from conftest import authors_fixture_dir

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_help_works_without_torch():
    """`asap --help` and every command's --help in an install where torch cannot be imported."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from typer.testing import CliRunner\n"
        "from asap_deploy.cli import app\n"
        "r = CliRunner().invoke(app, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "names = [c.name or c.callback.__name__.replace('_', '-') for c in app.registered_commands]\n"
        "for name in names:\n"
        "    r = CliRunner().invoke(app, [name, '--help'])\n"
        "    assert r.exit_code == 0, (name, r.output)\n"
        "print(len(names))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) >= 1


def test_python_cli_py_from_checkout():
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--help"], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and "inspect" in out.stdout


def test_inspect_our_checkpoint_json(tmp_path):
    cfg = ModelConfig(label_nc=4, crop_size=64, learned_ds_factor=4, lr_width=8, lr_max_width=8, lr_depth=1)
    torch.manual_seed(0)
    model = ASAPNetGenerator(cfg)
    save_generator(model, tmp_path / "m.pt")
    r = runner.invoke(app, ["inspect", str(tmp_path / "m.pt"), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["config"] == cfg.to_dict() and info["config_source"] == "checkpoint"
    assert info["parameters"]["lowres_stream"] == sum(p.numel() for p in model.parameters())
    assert info["derived"]["params_per_tile"] == cfg.num_params


def test_inspect_authors_checkpoint_table():
    d = authors_fixture_dir("facades_s64")
    r = runner.invoke(app, ["inspect", str(d / "latest_net_G.pth")])
    assert r.exit_code == 0, r.output
    assert "inferred" in r.output and "15107" in r.output and "unknown" in r.output


def test_errors_are_one_line_with_exit_code(tmp_path):
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a checkpoint")
    r = runner.invoke(app, ["inspect", str(bad)])
    assert r.exit_code == 4 and "junk.pt" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["inspect", str(bad), "--preset", "facades", "--config", str(bad)])
    assert r.exit_code == 3 and "either --preset or --config" in r.output


def _help(*args: str) -> str:
    r = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    return r.output


def test_help_shows_plain_flags_and_capital_argument_names():
    """Issue 14, help text: flags without a '<bool>' type, arguments as NAME (not '{name}'), and list
    options as their element type, in every command's --help."""
    names = [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]
    for name in names:
        out = _help(name)
        assert "<bool>" not in out and "list[" not in out, (name, out)
        usage = next(line for line in out.splitlines() if "Usage:" in line)
        assert "{" not in usage and usage.split(name, 1)[1].strip() == usage.split(name, 1)[1].strip().upper() \
            .replace("[OPTIONS]", "[OPTIONS]"), usage
    assert "INPUTS..." in _help("infer") and "CHECKPOINT" in _help("export")


def test_validate_help_lists_every_backend_of_the_registry():
    """Issue 14, item 5: --backend's help is read from the registry (tensorrt was missing)."""
    from asap_deploy.engines.registry import ENGINE_NAMES

    out = " ".join(_help("validate").replace("│", " ").split())
    assert all(name in out for name in ENGINE_NAMES) and "tensorrt" in out


def test_export_title_names_the_bundle_once(tmp_path, monkeypatch):
    """Issue 14, item 5: `asap export m.pt -o bundle` printed 'bundle bundle (S=..)'."""
    cfg = ModelConfig(label_nc=4, crop_size=64, learned_ds_factor=4, lr_width=8, lr_max_width=8, lr_depth=1)
    torch.manual_seed(0)
    save_generator(ASAPNetGenerator(cfg), tmp_path / "m.pt")
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["export", "m.pt", "-o", "bundle", "--no-fp16"])
    assert r.exit_code == 0, r.output
    assert "bundle bundle" not in r.output and "bundle: S=4, opset" in r.output
