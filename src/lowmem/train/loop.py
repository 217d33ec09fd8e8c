"""Where `train` lived before the Trainer (lowmem.train.trainer); kept so `from lowmem.train.loop
import train` keeps working."""

from lowmem.train.trainer import train

__all__ = ["train"]
