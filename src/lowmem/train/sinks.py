"""Metric sinks beside metrics.jsonl: TensorBoard and Weights & Biases (`--log-to tensorboard,wandb`).

Each receives exactly the records metrics.jsonl gets (training steps: loss, lr, tokens/s, memory;
evaluations: val_loss, val_perplexity), every numeric field as a scalar named as in the JSON, at
the record's `step`. Both are optional dependencies, imported only when asked for:

  tensorboard  `torch.utils.tensorboard.SummaryWriter` into <run>/tensorboard (pip install tensorboard);
               on resume, events after the checkpoint's step are purged, as metrics.jsonl drops its lines
  wandb        `wandb.init(dir=<run>, project=$WANDB_PROJECT or "lowmem", id derived from the run
               directory, resume="allow")`; WANDB_MODE=offline works without the network (pip install wandb)
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

from lowmem.errors import ConfigError

SINKS = ("tensorboard", "wandb")


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


class TensorBoardSink:
    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ConfigError(f"--log-to tensorboard needs the tensorboard package ({err}); pip install tensorboard") from None
        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict[str, Any]) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, global_step=int(record["step"]))
        self.writer.flush()  # tools read the file while the run goes on

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, run_dir: Path, config: dict[str, Any], resume_step: int | None = None) -> None:
        try:
            import wandb
        except ImportError as err:
            raise ConfigError(f"--log-to wandb needs the wandb package ({err}); pip install wandb") from None
        run_dir = Path(run_dir)
        run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lowmem"), name=run_dir.name, id=run_id,
                              dir=str(run_dir), config=config, resume="allow", reinit="finish_previous")

    def write(self, record: dict[str, Any]) -> None:
        self.run.log(_scalars(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


def _names(names: list[str] | str) -> list[str]:
    return [n.strip() for n in names.split(",") if n.strip()] if isinstance(names, str) else list(names)


def check_sinks(names: list[str] | str) -> None:
    unknown = [name for name in _names(names) if name not in SINKS]
    if unknown:
        raise ConfigError(f"unknown --log-to {', '.join(unknown)}; choose from: {', '.join(SINKS)} (metrics.jsonl is always written)")


def open_sinks(names: list[str] | str, run_dir: Path, config: dict[str, Any], resume_step: int | None = None) -> list[Any]:
    """The sinks `names` asks for (a list, or "tensorboard,wandb"), opened for the run at `run_dir`."""
    check_sinks(names)
    sinks: list[Any] = []
    for name in dict.fromkeys(_names(names)):
        sinks.append(TensorBoardSink(run_dir, resume_step) if name == "tensorboard" else WandbSink(run_dir, config, resume_step))
    return sinks
