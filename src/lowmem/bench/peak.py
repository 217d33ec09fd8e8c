"""Peak memory measured in fresh processes, one per configuration.

A process's CPU peak (ru_maxrss) cannot be reset, and one configuration's allocator cache would hide
in the next one's figure, so a benchmark measures each configuration in its own child: the parent
reruns its script with one more option naming the configuration (`run_child`), the child builds and
steps the run, reads the peak through lowmem.memory, and prints its record as JSON on its last stdout
line (`report_to_parent`). The child's `baseline_bytes` is read before the run is built: on CUDA after
resetting the peak counter, on CPU the RSS the interpreter and libraries already hold, so the run's
own figure is the peak minus it. A CPU child can run under glibc's MALLOC_MMAP_THRESHOLD_
(`mmap_threshold_env`): blocks above it are mmapped and given back when freed, so the peak RSS follows
the tensors instead of glibc's heap, which otherwise keeps freed blocks.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any


def run_child(argv: Sequence[str], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run `python *argv` in a fresh process (with `env` added to this one's environment) and return
    the JSON object its last stdout line holds; a failing child raises with the end of its stderr."""
    command = [sys.executable, *argv]
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env} if env else None)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {proc.returncode}:\n{proc.stderr.strip()[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report_to_parent(record: Mapping[str, Any]) -> None:
    """The child's side of `run_child`: its record, as the last line of stdout."""
    print(json.dumps(record), flush=True)


def mmap_threshold_env(threshold: int) -> dict[str, str]:
    """The environment that makes glibc mmap (and return when freed) blocks above `threshold` bytes;
    0: glibc's default."""
    return {"MALLOC_MMAP_THRESHOLD_": str(threshold)} if threshold else {}


def baseline_bytes(device: Any) -> int:
    """In a child, before the measured run is built: on CUDA the peak counter is reset (0 after it),
    on CPU the peak RSS so far (interpreter, torch, lowmem)."""
    import torch

    from lowmem.memory import peak_memory, reset_peak_memory

    if torch.device(device).type == "cuda":
        torch.cuda.init()
        reset_peak_memory()
    return peak_memory()["peak_bytes"]


def rss_bytes() -> int:
    """This process's resident set size now (not its peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def default_device() -> str:
    """'cuda' where a GPU is visible, else 'cpu': the benchmarks' --device default."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
