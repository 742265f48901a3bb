"""Training: discriminator, losses, the training loop and data-parallel runs.

`train_run()` is what `asap train` and `asap demo` call; the pieces live in the submodules.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from ..config import ModelConfig
from ..errors import ConfigError, DatasetError


def small_config(label_nc: int, size: int = 64) -> ModelConfig:
    """A small ASAP-Net that trains in minutes on a CPU: S = size/16, 4 learned downsamplings
    (S2=4 at 64 px), narrow low-res stream, 32-wide pixelwise MLP."""
    s = size // 16
    return ModelConfig(label_nc=label_nc, crop_size=size, learned_ds_factor=min(4, s), lr_width=16,
                       lr_max_width=64, lr_depth=2, hr_width=32, hr_depth=5)


def synthetic_info(data: str | Path | None) -> dict[str, Any] | None:
    """The dataset.json that `asap make-data` writes, or None."""
    if data is None:
        return None
    p = Path(data) / "dataset.json"
    if not p.is_file():
        return None
    try:
        info = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{p}: unreadable dataset description: {exc}") from exc
    return info if isinstance(info, dict) else None


def default_config_for(data: str | Path | None) -> ModelConfig:
    """The config to use when none is given: only synthetic sets (dataset.json) suggest one."""
    info = synthetic_info(data)
    if not info or "suggested_config" not in info:
        raise ConfigError("give --preset or --config (only a data set made by `asap make-data` suggests a model)")
    sc = info["suggested_config"]
    return small_config(int(sc["label_nc"]), int(sc["crop_size"]))


def dataset_factory(data=None, label_dir=None, image_dir=None, instance_dir=None, split: str = "train",
                    augment: bool = True) -> Callable:
    """A function (cfg, opts) -> PairedDataset for the Trainer."""
    def make(cfg: ModelConfig, opts):
        from ..data import PairedDataset, find_samples

        problems: list = []  # files without a partner: reported with the rest by PairedDataset.check
        layout, samples = find_samples(data, split, label_dir, image_dir, instance_dir, problems=problems)
        return PairedDataset(samples, cfg, load_size=opts.load_size if opts else None, crop=True,
                             augment=augment, flip=bool(opts and opts.flip), problems=problems,
                             name=f"the {'training' if split == 'train' else split} set "
                                  f"({layout.label_dir if layout.name == 'custom' else layout.label_dir.parent})")
    return make


def train_run(cfg: ModelConfig | None, opts, out_dir, *, data=None, label_dir=None, image_dir=None,
              instance_dir=None, resume: bool = False, device: str = "auto",
              on_step: Callable | None = None, on_start: Callable | None = None,
              threads: int | None = None, on_check: Callable | None = None) -> dict[str, Any]:
    """Train (single process, or one process of a torchrun job) and return the summary. The data set is
    checked in full before step 1 (build_trainer); `on_check(done, total)` reports that check's progress."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    from .distributed import cleanup, setup_from_env
    from .trainer import build_trainer

    ctx = setup_from_env(device)
    try:
        trainer = build_trainer(cfg, opts, dataset_factory(data, label_dir, image_dir, instance_dir), out_dir,
                                ctx, resume=resume, on_check=on_check)
        if on_start is not None:
            on_start(trainer)
        summary = trainer.run(on_step=on_step)
        summary.update(rank=ctx.rank, world_size=ctx.world_size, device=ctx.device,
                       config=trainer.cfg.to_dict(), samples=len(trainer.dataset))
        return summary
    finally:
        cleanup(ctx)
