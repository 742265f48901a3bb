"""`asap make-data` and `asap train`'s use cases: the option ranges, the model config a run trains
(a preset or config file, --set overrides, else the data set's default), the training options,
and the run itself (asap_deploy/train/ does the training)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..limits import check_file_arg, check_optional, check_range, check_seed, check_threads

BIG = 1_000_000_000  # the largest step count an option takes


def make_data(out: Path, n: int, n_val: int | None, size: int, classes: int, seed: int, *,
              overwrite: bool = False) -> dict[str, Any]:
    """Check the options, then write the synthetic data set; {'train': pairs, 'val': pairs, ...}."""
    check_range("--n", n, 1, 100_000)
    check_optional("--n-val", n_val, 1, 100_000)
    check_range("--size", size, 32, 4096)
    if size % 16:
        raise UsageError(f"--size must be a multiple of 16 in 32..4096 (got {size})")
    check_range("--classes", classes, 2, 255)
    check_seed("--seed", seed)
    from ..synthetic_dataset import make_dataset

    return make_dataset(out, n, n_val, size, classes, seed, overwrite=overwrite)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE items: VALUE as JSON if it parses, else the text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(val)
        except json.JSONDecodeError:
            out[key.strip()] = val
    return out


def check_train_args(*, steps: int | None, minutes: float | None, batch_size: int, seed: int, lr_g: float,
                     lr_d: float, decay_steps: int | None, weights: dict[str, float], ndf: int, num_d: int,
                     load_size: int | None, save_every: int, log_every: int, threads: int | None,
                     vgg_weights: Path | None) -> None:
    """Every number of `asap train` in its range (weights: {option: value}), and the VGG file."""
    check_optional("--steps", steps, 1, BIG)
    check_optional("--minutes", minutes, 0.0, 525_600.0, lo_open=True)
    check_range("--batch-size", batch_size, 1, 256)
    check_seed("--seed", seed)
    check_range("--lr-g", lr_g, 0.0, 1.0, lo_open=True)
    check_range("--lr-d", lr_d, 0.0, 1.0, lo_open=True)
    check_optional("--decay-steps", decay_steps, 0, BIG)
    for option, value in weights.items():
        check_range(option, value, 0.0, 1e6)
    check_range("--ndf", ndf, 1, 1024)
    check_range("--num-d", num_d, 1, 8)
    check_optional("--load-size", load_size, 16, 16384)
    check_range("--save-every", save_every, 1, BIG)
    check_range("--log-every", log_every, 1, BIG)
    check_threads("--threads", threads)
    if vgg_weights is not None:
        check_file_arg("--vgg-weights", vgg_weights, "VGG19 weights file")


def train_config(preset: str | None, config: Path | None, set_items: list[str], data: Path | None,
                 resume: bool):
    """The ModelConfig to train: --preset / --config with the --set KEY=VALUE overrides, else the
    data set's default; None when resuming without either (the run's config is in train_state.pt)."""
    from ..config import ModelConfig, config_from
    from ..train import default_config_for

    cfg = config_from(preset, config)
    overrides = parse_overrides(set_items)
    if cfg is None and not resume:
        cfg = default_config_for(data)
    if resume and overrides:
        raise UsageError("--set cannot change the model of a resumed run (its config is in train_state.pt)")
    if cfg is not None and overrides:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), **overrides})
    return cfg


def train_options(**kw):
    """TrainOptions (asap_deploy/train/trainer.py) from keyword arguments, validated."""
    from ..train.trainer import TrainOptions

    opts = TrainOptions(**kw)
    opts.validate()
    return opts


def run_training(cfg, opts, out: Path, **kw) -> tuple[dict[str, Any] | None, Exception | None]:
    """Train (asap_deploy/train/): (the run summary, None), or (None, the TrainingInterrupted) when
    Ctrl-C / SIGTERM stopped the run (its .step and .state_path say what was saved)."""
    from ..train import train_run
    from ..train.trainer import TrainingInterrupted

    try:
        return train_run(cfg, opts, out, **kw), None
    except TrainingInterrupted as exc:
        return None, exc
