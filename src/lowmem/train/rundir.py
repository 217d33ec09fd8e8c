"""A run's directory: named, claimed, locked, checked writable, and refused when it would be misused.

    with open_run_dir(config, info, resume) as run_dir:   # run_dir.path, run_dir.resume_body
        ...                                              # the lock is held until the block ends

A new run without --output-dir gets `runs/<model>-<optimizer>-<date>-<time>-<microseconds>-<pid>`,
claimed by creating it (mkdir fails if another run made it first). The directory is locked
(`RunLock`, an flock on <run>/.lock) for the run's lifetime, so two runs never share one, and
probed for writing before anything is trained. A new run refuses a directory that already holds
checkpoints; a resume loads its checkpoint and refuses a config that would change results, listing
the differences. Under several processes the main process decides and every rank agrees.
A bare --resume continues `latest_run_dir()`.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

from lowmem.config import RunConfig, results_affecting_differences, save_config
from lowmem.distributed import DistInfo, any_rank, broadcast_object
from lowmem.errors import CheckpointError, ConfigError
from lowmem.train import checkpoint

RUNS_ROOT = "runs"


def default_run_dir(config: RunConfig) -> str:
    """runs/<model>-<optimizer>-<date>-<time>-<microseconds>-<pid>: a new name per run, so no run
    overwrites another (the run that creates the directory claims it; see _claim_default_dir)."""
    now = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f"-{int(now % 1 * 1e6):06d}-{os.getpid()}"
    return str(Path(RUNS_ROOT) / f"{config.model}-{config.optim.name}-{stamp}")


def _claim_default_dir(config: RunConfig) -> str:
    """Create a new default run directory (mkdir fails if it exists, then a suffix is tried)."""
    base = default_run_dir(config)
    Path(base).parent.mkdir(parents=True, exist_ok=True)
    for suffix in range(100):
        name = base if suffix == 0 else f"{base}-{suffix}"
        try:
            Path(name).mkdir()
            return name
        except FileExistsError:
            continue
    raise ConfigError(f"could not create a new run directory next to {base}; pass --output-dir")


def _default_dir_for_all_ranks(config: RunConfig, info: DistInfo) -> str:
    return broadcast_object(_claim_default_dir(config) if info.is_main else None, info)


def latest_run_dir(root: str | Path | None = None) -> Path:
    """The run under `root` (default runs/) for a bare --resume: the one with the newest checkpoint
    (a run that failed at start-up has a config but nothing to resume); without any checkpoint, the
    newest config."""
    root = Path(root or RUNS_ROOT)
    candidates = [p.parent for p in root.glob("*/config.yaml")] if root.is_dir() else []
    if not candidates:
        raise CheckpointError(f"no run to resume under {root}/; pass --resume with a run directory")
    checkpointed = {p: checkpoint.list_checkpoints(p) for p in candidates}
    with_checkpoints = [p for p in candidates if checkpointed[p]]
    if with_checkpoints:
        return max(with_checkpoints, key=lambda p: checkpointed[p][-1].stat().st_mtime)
    return max(candidates, key=lambda p: (p / "config.yaml").stat().st_mtime)


class RunLock:
    """An exclusive lock (fcntl.flock) on <run>/.lock for the run's lifetime; the file names its pid."""

    NAME = ".lock"

    def __init__(self, run_dir: Path) -> None:
        import fcntl

        self.path = run_dir / self.NAME
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise ConfigError(
                f"{run_dir} is in use by another lowmem run (pid {holder}); two runs in one directory would mix "
                "their metrics and checkpoints. Wait for it to finish, or choose another --output-dir"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        self._file.close()  # closing drops the flock; the file stays (removing it would race a new run)


def check_writable(directory: Path) -> None:
    """Refuse a directory the run could not write its checkpoints and logs to, before training."""
    probe = directory / f".write-test-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"lowmem")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"cannot write to {directory} ({err.strerror or err}); the run could not save its checkpoints there. "
            "Choose a writable --output-dir (nothing was trained)"
        ) from None


def _lock_main(run_dir: Path, info: DistInfo) -> RunLock | None:
    """On the main process: create, lock and probe the directory; every rank raises if that failed."""
    lock, refusal = None, None
    if info.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunLock(run_dir)
            check_writable(run_dir)
            check_writable(run_dir / checkpoint.CHECKPOINT_DIR)
        except ConfigError as err:
            refusal = err
        except OSError as err:
            refusal = ConfigError(f"cannot create or lock the run directory {run_dir} ({err.strerror or err}); "
                                  "choose a writable --output-dir")
    if any_rank(refusal is not None, info):
        if lock:
            lock.release()
        raise refusal or ConfigError(f"the main process refused the run directory {run_dir}; see its message")
    return lock


def _resume_body(config: RunConfig, info: DistInfo, resume: str | Path | None, run_dir: Path) -> dict[str, Any] | None:
    """This rank's part of the checkpoint to resume from (None for a new run), after the refusals."""
    if resume is None and checkpoint.list_checkpoints(run_dir):
        raise ConfigError(
            f"{run_dir} already holds a run with checkpoints; continue it with --resume {run_dir}, or "
            "choose another --output-dir (nothing was changed)"
        )
    if resume is None:
        return None
    body = checkpoint.load(checkpoint.resolve(resume), info.rank, info.world_size)
    differences = results_affecting_differences(body["config"], config.to_dict())
    if differences:
        raise CheckpointError(
            "cannot resume: these settings differ from the checkpoint's and would change results:\n  "
            + "\n  ".join(differences)
            + "\nresume with the original settings, or start a new run in another --output-dir (to train longer "
            f"from here with its own steps and schedule: --continue-from {resume})"
        )
    return body


class RunDirectory:
    """A claimed, locked run directory (`path`) and the checkpoint body to resume from (`resume_body`,
    None for a new run); a context manager that releases the lock."""

    def __init__(self, path: Path, resume_body: dict[str, Any] | None, lock: RunLock | None) -> None:
        self.path, self.resume_body, self._lock = path, resume_body, lock

    def release(self) -> None:
        if self._lock:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def open_run_dir(config: RunConfig, info: DistInfo, resume: str | Path | None) -> RunDirectory:
    """The run directory of `config` (train.output_dir, or a new default one, set in the config):
    created, locked, checked writable, refused or resumed as the module docstring says, with the
    config written to it."""
    if config.train.output_dir is None:
        config.train.output_dir = _default_dir_for_all_ranks(config, info)
    path = Path(config.train.output_dir)
    lock = _lock_main(path, info)
    try:
        body = _resume_body(config, info, resume, path)
        if info.is_main:
            save_config(config, path / "config.yaml")
    except BaseException:
        if lock:
            lock.release()
        raise
    return RunDirectory(path, body, lock)
