"""The layer contract (DESIGN.md): cli -> app -> engines -> export -> plugins -> core, checked by
import-linter on the package as a wheel installs it.

In a checkout, export/, engines/ and plugins/ sit at the top level and become asap_deploy.export
etc. only through setuptools' package-dir mapping, which import-linter's static graph cannot see.
So the test lays the package out as the wheel does (asap_deploy/export/... in a temporary folder)
and runs `lint-imports` with the contracts of pyproject.toml there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("cli", "app", "engines", "export", "plugins")
MAPPED = {"export": "export", "engines": "engines", "plugins": "plugins"}  # package-dir of pyproject.toml

pytest.importorskip("importlinter", reason="import-linter is in the [test] extra: pip install -e '.[test]'")


def _contracts() -> dict[str, dict]:
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in conf["contracts"]}


def wheel_layout(dest: Path) -> Path:
    """Copy the package's Python files into `dest` as a wheel lays them out; returns dest."""
    pkg = dest / "asap_deploy"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "asap_deploy", pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "cli.py"))
    shutil.copy(ROOT / "cli.py", pkg / "cli.py")  # asap_deploy/cli.py is a link to it in a checkout
    for name, folder in MAPPED.items():
        shutil.copytree(ROOT / folder, pkg / name, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def lint(dest: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(dest)}
    return subprocess.run([str(exe), "pyproject.toml", "--no-cache"], cwd=dest, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_contracts_cover_every_module():
    """The core list is every top-level module of asap_deploy that is not a layer; export may read
    only plugins/spec.py: a new module cannot slip past the contract."""
    c = _contracts()
    assert c["layers"]["layers"] == [f"asap_deploy.{n}" for n in LAYERS]
    core = {p.stem if p.is_file() else p.name for p in (ROOT / "asap_deploy").iterdir()
            if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").is_file())}
    core -= set(LAYERS)
    assert set(c["core"]["source_modules"]) == {f"asap_deploy.{n}" for n in core}
    plugins = {p.stem for p in (ROOT / "plugins").glob("*.py")} - {"__init__", "spec"}
    assert set(c["export-spec"]["forbidden_modules"]) == {f"asap_deploy.plugins.{n}" for n in plugins}
    # cli imports the app and the errors, nothing else of ours (it reaches the rest through the app)
    assert set(c["cli"]["source_modules"]) == {"asap_deploy.cli"}
    assert set(c["cli"]["forbidden_modules"]) == ({f"asap_deploy.{n}" for n in core - {"errors"}}
                                                  | {f"asap_deploy.{n}" for n in LAYERS[2:]})
    assert c["cli"]["allow_indirect_imports"] is True


def test_layer_contract_holds(tmp_path):
    r = lint(wheel_layout(tmp_path))
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "Contracts: " in r.stdout and " broken" in r.stdout


@pytest.mark.parametrize("module,line,contract", [
    ("model.py", "from asap_deploy.engines import base as _x  # noqa", "the core imports nothing of ours"),
    ("engines/base.py", "from asap_deploy.app import infer as _x  # noqa", "cli > app > engines"),
    ("export/bundle.py", "from asap_deploy.plugins import kernel as _x  # noqa", "export reads only"),
    ("cli.py", "from asap_deploy.engines import base as _x  # noqa", "cli imports only the app and the errors"),
    ("cli.py", "from asap_deploy.limits import check_range as _x  # noqa", "cli imports only the app and the errors"),
])
def test_a_forbidden_import_breaks_the_contract(tmp_path, module, line, contract):
    dest = wheel_layout(tmp_path)
    f = dest / "asap_deploy" / module
    f.write_text(f.read_text() + "\n" + line + "\n")
    r = lint(dest)
    assert r.returncode != 0 and "BROKEN" in r.stdout and contract in r.stdout, r.stdout[-3000:]
