"""Run configuration: dataclasses for model, data, optimizer and training, loaded from YAML and
overridden from the command line. The defaults are the main job's model, data and schedule (`lowmem
train` with no arguments, which trains them with SCALE, each update inside backward: lowmem.cli.MAIN_JOB);
the papers' protocol is configs/paper-60m.yaml and the CPU protocol configs/cpu-protocol.yaml.

A config is plain data (strings, numbers, lists, dicts) so it round-trips through YAML and is stored
in every run directory and checkpoint. `results_affecting_differences` says which changes alter a
run's results, which is what a resume refuses.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lowmem.errors import ConfigError, check_choice

SCHEDULES = ("cosine", "wsd")  # the lr schedules (lowmem.interventions.schedule_factor)

PRECISIONS = ("fp32", "bf16-autocast", "bf16-pure")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading floats as people write them: YAML 1.1 wants a dot in `1.0e-3`,
    so without this `1e-3` and `1E+4` would be strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """YAML as lowmem reads it everywhere (config files, grids, command-line values): the safe
    loader, with `1e-3` a number."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
SEQ_MODES = ("pad", "pack")
DISTRIBUTED_MODES = ("ddp", "fsdp2")


@dataclass
class DataConfig:
    source: str = "builtin"  # builtin | c4 | a path, directory or glob of json/jsonl(.gz)/txt/parquet
    text_field: str = "text"
    tokenizer: str = "bpe"  # bpe (trained here, cached) | a Hugging Face name or path, e.g. t5-base
    vocab_size: int = 8192  # for the trained BPE; a named tokenizer brings its own
    seq_len: int = 128
    # pad: one document per sequence (the papers'); pack: documents joined by EOS. The default is
    # pack because the main job's built-in text is mostly short docstrings, which padding would waste.
    seq_mode: str = "pack"
    cache_dir: str | None = None


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float | None = None  # None: the method's preset or default for this model size
    hparams: dict[str, Any] = field(default_factory=dict)  # further method hyperparameters
    # Periodic interventions, e.g. [{"name": "momentum-reset", "every": 200}].
    interventions: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16  # sequences per optimizer step, over all ranks and micro-batches
    micro_batch_size: int = 16  # sequences per forward pass on one rank
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.1
    # The lr after warmup (lowmem.interventions.schedule_factor): cosine to min_lr_ratio (the papers'),
    # or wsd, warmup-stable-decay: constant, then linear to min_lr_ratio over the last decay_ratio of the steps.
    schedule: str = "cosine"
    decay_ratio: float = 0.2
    clip_grad_norm: float = 0.0  # 0: no clipping (the papers' protocol below 7B)
    precision: str = "fp32"
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    distributed: str = "ddp"  # used only under torchrun: ddp | fsdp2
    eval_every: int = 100  # 0: only at the end
    eval_tokens: int = 50_000  # non-pad validation tokens per evaluation (papers: 10M)
    legacy_perplexity: bool = False  # also report the papers' (sum of batch means)/(batches+1) figure
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end (and on SIGTERM/SIGINT)
    keep_checkpoints: int = 2
    skip_nonfinite: int = 0  # how many non-finite-loss steps may be skipped before stopping
    output_dir: str | None = None  # None: runs/<model>-<optimizer>-<date>-<time>
    progress: bool = True
    # A Hugging Face LlamaForCausalLM directory (or cached Hub name) whose safetensors weights start the run.
    init_from: str | None = None
    # A checkpoint (or run directory: its newest) whose weights, optimizer state, data position and RNG
    # start this new run, which has its own steps and schedule (lowmem.train.continued).
    continue_from: str | None = None
    log_to: list[str] = field(default_factory=list)  # extra metric sinks: tensorboard, wandb
    # What the blocks keep for backward: none | block | selective (lowmem.models.llama.CHECKPOINTING_MODES).
    activation_checkpointing: str = "none"
    # The loss through the head in chunks of loss_chunk tokens, never holding the full logits:
    # on | off | auto (on when one micro-batch's fp32 logits reach 256 MiB; lowmem.models.chunked_loss).
    chunked_loss: str = "auto"
    loss_chunk: int = 1024
    # Each parameter's update inside backward, as soon as its gradient is complete, which is then freed:
    # the gradients held at once are the largest one, not all of them (lowmem.train.step.InBackward).
    # Needs one micro-batch per step on one process, no clipping; the same weights bit for bit.
    gradient_release: bool = False
    # torch.compile each transformer block and the loss (lowmem.models.llama.Llama.compile_blocks): the first steps
    # pay the compilation (the summary reports it apart), later ones run the fused kernels.
    compile: bool = False


@dataclass
class RunConfig:
    # The model section: a preset name (`model: llama-60m`), or a mapping naming the preset and the
    # structure applied to its hidden matrices (`model: {preset: llama-60m, structure: {name:
    # lowrank, rank: 128}}`). `model` keeps the preset name; `structure` the structure's settings.
    model: str = "cpu-tiny"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    structure: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data; a dense model keeps the string form, so configs and checkpoints written
        before structures existed compare equal to today's."""
        out = dataclasses.asdict(self)
        structure = out.pop("structure")
        if structure:
            out["model"] = {"preset": self.model, "structure": structure}
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RunConfig":
        raw = _plain(dict(raw or {}))
        sections = {"data": DataConfig, "optim": OptimConfig, "train": TrainConfig}
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            if key == "model":
                kwargs["model"], kwargs["structure"] = _model_section(value)
            elif key in sections:
                kwargs[key] = _build_section(sections[key], value or {}, key)
            else:
                raise ConfigError(f"unknown config section {key!r}; sections are: model, data, optim, train")
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        """Refuse wrong types and out-of-range values with ConfigError naming the field, the value and
        what is accepted (an int where a float is wanted is accepted; a bool is not a number)."""
        if not isinstance(self.model, str):
            raise ConfigError(f"model must be a preset name (a string), got {self.model!r}")
        for section in ("data", "optim", "train"):
            value = getattr(self, section)
            for f in dataclasses.fields(value):
                _check_type(f"{section}.{f.name}", getattr(value, f.name), f.type)
        t, d = self.train, self.data
        check_choice("precision", t.precision, PRECISIONS, ConfigError)
        check_choice("sequence mode", d.seq_mode, SEQ_MODES, ConfigError)
        check_choice("distributed mode", t.distributed, DISTRIBUTED_MODES, ConfigError)
        for name in ("steps", "batch_size", "micro_batch_size", "log_every", "keep_checkpoints", "eval_tokens"):
            if getattr(t, name) < 1:
                raise ConfigError(f"train.{name} must be a positive integer, got {getattr(t, name)!r}")
        for name, zero in (("eval_every", "only at the end"), ("checkpoint_every", "only at the end"),
                           ("skip_nonfinite", "stop at the first"), ("seed", None)):
            if getattr(t, name) < 0:
                meaning = f" (0: {zero})" if zero else ""
                raise ConfigError(f"train.{name} must be an integer >= 0{meaning}, got {getattr(t, name)!r}")
        for name in ("seq_len", "vocab_size"):
            if getattr(d, name) < 1:
                raise ConfigError(f"data.{name} must be a positive integer, got {getattr(d, name)!r}")
        check_choice("schedule", t.schedule, SCHEDULES, ConfigError)
        for name in ("warmup_ratio", "min_lr_ratio", "decay_ratio"):
            if not 0 <= getattr(t, name) <= 1:
                raise ConfigError(f"train.{name} must lie in [0, 1], got {getattr(t, name)!r}")
        if not t.clip_grad_norm >= 0:
            raise ConfigError(f"train.clip_grad_norm must be a finite number >= 0 (0: no clipping), got {t.clip_grad_norm!r}")
        if self.optim.lr is not None and not self.optim.lr >= 0:
            raise ConfigError(f"optim.lr must be a finite number >= 0, got {self.optim.lr!r}")
        for index, spec in enumerate(self.optim.interventions):
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                raise ConfigError(
                    f"optim.interventions[{index}] must be a mapping with a 'name', e.g. {{name: momentum-reset, "
                    f"every: 200}}; got {spec!r}"
                )
        if self.structure is not None and not isinstance(self.structure, dict):
            raise ConfigError(f"model.structure must be a mapping with a 'name', got {self.structure!r}")


# What a config field's annotation accepts, as (check, words for the message).
_FIELD_TYPES: dict[str, tuple[Any, str]] = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a finite number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "dict": (lambda v: isinstance(v, dict), "a mapping of key: value"),
    "list": (lambda v: isinstance(v, list), "a list"),
}


def _check_type(name: str, value: Any, annotation: Any) -> None:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    optional = text.endswith("| None")
    base = text.removesuffix("| None").strip().split("[")[0]
    if value is None and optional:
        return
    check, words = _FIELD_TYPES[base]
    if not check(value):
        accepted = words + (" or null" if optional else "")
        raise ConfigError(f"{name} must be {accepted}, got {value!r} ({type(value).__name__})")


def _plain(value: Any) -> Any:
    """Tuples (a command-line `(0.9, 0.95)`) as lists, so a config is the same in YAML and checkpoints."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _model_section(value: Any) -> tuple[str, dict[str, Any] | None]:
    """(preset, structure) from the model section's string or mapping form."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, dict):
        unknown = set(value) - {"preset", "structure"}
        if unknown or not isinstance(value.get("preset"), str):
            raise ConfigError(
                f"the model section must be a preset name or a mapping {{preset: NAME, structure: {{name: ..., ...}}}}; "
                f"got {value!r}"
            )
        structure = value.get("structure")
        if structure is not None and (not isinstance(structure, dict) or not isinstance(structure.get("name"), str)):
            raise ConfigError(f"model.structure must be a mapping with a 'name', e.g. {{name: lowrank, rank: 128}}; got {structure!r}")
        return value["preset"], dict(structure) if structure else None
    raise ConfigError(f"the model section must be a preset name or a mapping with 'preset'; got {value!r}")


def _build_section(cls: type, values: dict[str, Any], section: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config section {section!r} must be a mapping of key: value, got {values!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(
            f"unknown key(s) {sorted(unknown)} in section {section!r}; valid keys: {', '.join(sorted(names))}"
        )
    return cls(**values)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML config (or start from defaults) and apply dotted overrides like {"train.steps": 10}."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
        try:
            raw = load_yaml(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if raw is None:
            raise ConfigError(
                f"config file {path} is empty; it must hold a mapping with sections model/data/optim/train "
                "(to train with every default, leave out --config)"
            )
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping with sections model/data/optim/train")
    merged = RunConfig.from_dict(raw).to_dict()
    for dotted, value in (overrides or {}).items():
        _set_dotted(merged, dotted, value)
    return RunConfig.from_dict(merged)


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    if keys[0] == "model" and len(keys) > 1 and isinstance(target.get("model"), str):
        target["model"] = {"preset": target["model"]}  # model.preset / model.structure on the string form
    node = target
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            raise ConfigError(f"cannot set {dotted!r}: {key!r} is not a config section")
        node = node[key]
    node[keys[-1]] = value


def parse_value(text: str) -> Any:
    """A value as written on the command line: YAML scalars and lists (`128`, `true`, `[0.9, 0.99]`),
    else the text itself (a mode name)."""
    stripped = text.strip()
    if stripped.startswith("(") and stripped.endswith(")"):  # a Python tuple, as in betas=(0.9,0.95)
        try:
            value = load_yaml("[" + stripped[1:-1] + "]")
        except yaml.YAMLError:
            return text
        return tuple(value) if isinstance(value, list) else value
    try:
        return load_yaml(stripped)
    except yaml.YAMLError:
        return text


def parse_key_values(items: list[str], what: str) -> dict[str, Any]:
    """{"key": value} from ["key=value", ...]; dashes in keys become underscores."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{what} {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = parse_value(value)
    return out


def parse_spec(spec: str, what: str = "setting") -> dict[str, Any]:
    """{"name": NAME, key: value, ...} from "NAME:key=value,key=value" (a structure or intervention)."""
    name, _, rest = spec.partition(":")
    if not name.strip():
        raise ConfigError(f"{what} {spec!r} has no name; write NAME:key=value,...")
    # Commas inside [...] or (...) belong to a list value (betas=[0.9,0.95]), not between settings.
    items = [kv for kv in re.split(r",(?![^\[(]*[\])])", rest) if kv.strip()]
    return {"name": name.strip(), **parse_key_values(items, f"{what} setting")}


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


# Settings that change only how a run is watched, never what it computes: a resume may change them.
HARMLESS = {
    "train.eval_every", "train.log_every", "train.progress", "train.checkpoint_every",
    "train.keep_checkpoints", "train.output_dir", "train.skip_nonfinite", "data.cache_dir",
    "train.legacy_perplexity", "train.log_to",
    "train.activation_checkpointing",  # recomputes the same ops: bitwise the same gradients
    "train.gradient_release",  # the same updates, applied in backward: bitwise the same weights
}


def results_affecting_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Lines 'key: old -> new' for every difference between two config dicts that alters results."""
    before, after = _flatten(old), _flatten(new)
    # A key the old config lacks was added later: the old run had its default.
    defaults = _flatten(RunConfig().to_dict())
    before.update({key: defaults[key] for key in after if key not in before and key in defaults})
    differences = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a != b and key not in HARMLESS:
            differences.append(f"{key}: {a!r} -> {b!r}")
    return differences


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "hparams":
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out
