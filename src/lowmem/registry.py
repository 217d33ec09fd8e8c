"""One registry mechanism for everything a config names: optimizers, structures, interventions.

    OPTIMIZERS.register("adamw", Method(...))            # in the module that defines the entry
    STRUCTURES.get("lowrank")                            # loads the built-in modules first
    INTERVENTIONS.names()

This module sits at the bottom of lowmem's import graph: it imports nothing of lowmem but its errors.
Each registry knows the built-in modules that register into it (by name, imported on first lookup),
so importing a registry never imports every method, and an entry is registered in exactly one
place: the module that defines it. Code outside lowmem (a test, a user's file) registers its own
entries the same way, before the run is built.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
from pathlib import Path
from typing import Any, Generic, Iterable, Iterator, TypeVar

from lowmem.errors import ConfigError, check_choice

T = TypeVar("T")
_MISSING = object()


class Registry(Generic[T]):
    """Name -> entry, for one kind of component (`what` names it in error messages)."""

    def __init__(self, what: str, builtin_modules: tuple[str, ...] = ()) -> None:
        self.what = what
        self._builtin_modules = builtin_modules
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str, entry: T) -> T:
        self._entries[name] = entry
        return entry

    def _load_builtins(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module in self._builtin_modules:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as err:  # a built-in module not present in this install
                if err.name != module:
                    raise

    def get(self, name: str, default: Any = _MISSING) -> T:
        """The entry `name`; unknown names raise ConfigError listing the choices (or return `default`)."""
        self._load_builtins()
        known = isinstance(name, str) and name in self._entries
        if not known and default is not _MISSING:
            return default
        check_choice(self.what, name, self.names(), ConfigError)
        return self._entries[name]

    def build(self, name: str, **settings: Any) -> Any:
        """The entry `name` called with `settings` (a class or factory); a setting it does not take
        or refuses (TypeError/ValueError) becomes a ConfigError naming the entry."""
        factory = self.get(name)
        try:
            return factory(**settings)
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{self.what} {name!r}: {err}") from None

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._entries

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __setitem__(self, name: str, entry: T) -> None:
        self.register(name, entry)

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load_builtins()
        return len(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return [(name, self._entries[name]) for name in self.names()]


def load_plugins(plugins: Iterable[str | Path]) -> None:
    """Import each plugin -- a path to a .py file, or a module name -- so that it registers its entries
    (`lowmem train --plugin`; every process of a run loads them itself, as spawned test workers do).

    A file is imported as module `lowmem_plugin_<stem>` (once: loading it again is a no-op), so a
    Method target written `f"{__name__}:Class"` in it resolves in every process that loaded it.
    """
    for plugin in map(str, plugins):
        path = Path(plugin)
        if plugin.endswith(".py"):
            if not path.is_file():
                raise ConfigError(f"--plugin {plugin}: no such file; pass a Python file or an importable module name")
            name = f"lowmem_plugin_{path.stem}"
            if name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException as err:
                del sys.modules[name]  # a failed plugin is not half-registered for the next try
                if not isinstance(err, Exception):
                    raise
                raise ConfigError(_plugin_failure(plugin, path, err)) from None
        else:
            try:
                importlib.import_module(plugin)
            except ModuleNotFoundError as err:
                raise ConfigError(f"--plugin {plugin}: {err}; pass a Python file or an importable module name") from None
            except Exception as err:
                raise ConfigError(_plugin_failure(plugin, None, err)) from None


def _plugin_failure(plugin: str, path: Path | None, err: Exception) -> str:
    """The plugin's own error, with the line of the plugin that raised it (its deepest frame in the
    file), so a user fixes their file instead of reading lowmem's traceback."""
    frames = traceback.extract_tb(err.__traceback__)
    if path is not None:
        own = [f for f in frames if Path(f.filename).resolve() == path.resolve()]
        frames = own or frames
    where = f"{frames[-1].filename}, line {frames[-1].lineno}" if frames else plugin
    if isinstance(err, SyntaxError) and err.lineno:
        where = f"{err.filename}, line {err.lineno}"
    return (f"--plugin {plugin} failed while importing ({where}): {type(err).__name__}: {err}. "
            "Fix the plugin file; nothing was trained")


def resolve_target(target: str) -> Any:
    """The object named by "module:attribute", imported on demand."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


OPTIMIZERS: Registry[Any] = Registry("optimizer", (
    "lowmem.optim",  # registers adamw
    "lowmem.optim.scale",
    "lowmem.optim.galore",
    "lowmem.optim.apollo",
    "lowmem.optim.muon",
    "lowmem.optim.adam_mini",
    "lowmem.optim.stable_spam",
    "lowmem.optim.smet",
))
STRUCTURES: Registry[Any] = Registry("structure", (
    "lowmem.structure.lowrank",
    "lowmem.structure.lora",
    "lowmem.structure.sltrain",
    "lowmem.structure.sparse",
))
INTERVENTIONS: Registry[Any] = Registry("intervention", (
    "lowmem.optim.reset",
    "lowmem.structure.lora",  # lora-merge (ReLoRA)
    "lowmem.structure.refactor",  # refactor, restarts
    "lowmem.structure.sparse",  # topology
))
