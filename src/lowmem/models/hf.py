"""lowmem's LLaMA and Hugging Face's `LlamaForCausalLM`: config mapping and weights, both ways.

lowmem's parameter names are `LlamaForCausalLM`'s without the `model.` prefix of the decoder
(`embed_tokens.weight` is HF's `model.embed_tokens.weight`; `lm_head.weight` is the same in both), so
moving weights is a rename, never a reshape. Weights travel as safetensors (no pickle):

    hf_config_fields(model.config, bos_id=None, eos_id=1, pad_id=0)   # kwargs of transformers.LlamaConfig
    to_hf_state_dict(model) / from_hf_state_dict(tensors)              # the rename
    load_pretrained(model, "export-dir")                               # `lowmem train --init-from`

`load_pretrained` needs only `safetensors`; `transformers` is not imported here except to find a
Hub name in the local Hugging Face cache (offline: nothing is downloaded).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowmem.errors import CheckpointError, ConfigError

HF_DECODER_PREFIX = "model."
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


def hf_config_fields(config: Any, bos_id: int | None, eos_id: int | None, pad_id: int | None) -> dict[str, Any]:
    """The keyword arguments of `transformers.LlamaConfig` that describe lowmem model `config` exactly."""
    return {
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_heads,
        "head_dim": config.head_dim, "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
        "initializer_range": config.init_std, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
    }


def _hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else HF_DECODER_PREFIX + name


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s persistent tensors under `LlamaForCausalLM`'s names, contiguous (safetensors needs it)."""
    return {_hf_name(name): tensor.detach().contiguous() for name, tensor in model.state_dict().items()}


def from_hf_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`LlamaForCausalLM` tensor names back to lowmem's; a tied checkpoint without `lm_head.weight`
    gets the embedding as its head (lowmem's head is untied: the two then train apart)."""
    out = {name.removeprefix(HF_DECODER_PREFIX): tensor for name, tensor in tensors.items()}
    if "lm_head.weight" not in out and "embed_tokens.weight" in out:
        out["lm_head.weight"] = out["embed_tokens.weight"].clone()
    return out


def resolve_pretrained(name_or_dir: str | Path) -> Path:
    """The local directory of a Hugging Face checkpoint: the path itself, or a Hub name already in
    the local cache (nothing is downloaded)."""
    path = Path(os.path.expanduser(str(name_or_dir)))
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(f"--init-from {name_or_dir}: {path} is a file; pass the directory holding config.json and {WEIGHTS_FILE}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        snapshot_download = None
    if snapshot_download is not None and str(name_or_dir).count("/") <= 1 and not str(name_or_dir).startswith((".", "/", "~")):
        try:
            return Path(snapshot_download(str(name_or_dir), local_files_only=True,
                                          allow_patterns=["*.json", "*.safetensors"]))
        except Exception:  # noqa: BLE001 - any failure means: not in the local cache
            pass
    raise ConfigError(
        f"--init-from {name_or_dir}: no such directory, and no Hugging Face model of that name in the local cache. "
        f"Pass a directory written by `lowmem export RUN --to hf DIR` (or any LlamaForCausalLM save_pretrained "
        f"directory with {WEIGHTS_FILE}); lowmem does not download."
    )


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a save_pretrained directory: model.safetensors, or the shards its index lists."""
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise ConfigError("reading Hugging Face weights needs safetensors: pip install 'lowmem[hf]'") from err
    single, index = directory / WEIGHTS_FILE, directory / WEIGHTS_INDEX_FILE
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = [directory / shard for shard in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        found = sorted(p.name for p in directory.iterdir())[:8]
        raise CheckpointError(
            f"{directory} holds no {WEIGHTS_FILE} (nor {WEIGHTS_INDEX_FILE}); it has {found}. Save the model with "
            "save_pretrained(..., safe_serialization=True) or `lowmem export`; pickled .bin weights are not read"
        )
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except Exception as err:  # noqa: BLE001 - a bad file is reported with its name
            raise CheckpointError(f"{file} is not a readable safetensors file ({err}); export it again") from None
    return tensors


def _config_value(hf: dict[str, Any], key: str) -> Any:
    if key == "rope_theta" and key not in hf:
        return (hf.get("rope_parameters") or hf.get("rope_scaling") or {}).get("rope_theta")
    return hf.get(key)


def check_hf_config(hf: dict[str, Any], config: Any, where: Path) -> None:
    """Refuse a Hugging Face config.json whose model computes differently from lowmem model `config`
    with the same tensor shapes (head count, rotary base, norm eps, activation, biases, rope scaling)."""
    if hf.get("model_type") not in (None, "llama"):
        raise ConfigError(f"{where}/config.json is a {hf.get('model_type')!r} model; --init-from takes LlamaForCausalLM weights")
    expected = {"num_attention_heads": config.num_heads, "rope_theta": config.rope_theta,
                "rms_norm_eps": config.rms_norm_eps, "hidden_act": "silu"}
    kv_heads = hf.get("num_key_value_heads")
    if kv_heads is not None:
        expected["num_key_value_heads"] = config.num_heads
    for key, want in expected.items():
        got = _config_value(hf, key) if key != "num_key_value_heads" else kv_heads
        if got is None:
            continue
        if (isinstance(want, float) and abs(float(got) - want) > 1e-12 * max(1.0, abs(want))) or (not isinstance(want, float) and got != want):
            raise ConfigError(
                f"--init-from {where}: its config.json has {key}={got!r}, the run's model has {want!r}; choose the "
                "--model preset the weights were trained with (lowmem's LLaMA has no setting for this difference)"
            )
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else "default"
    if rope_type not in ("default", None):
        raise ConfigError(f"--init-from {where}: rope scaling {rope_type!r} is not lowmem's plain rotary embedding")


def load_pretrained(model: nn.Module, name_or_dir: str | Path) -> Path:
    """Copy a `LlamaForCausalLM` safetensors checkpoint into lowmem LLaMA `model` in place (bitwise);
    return the directory read. Names and shapes must fit exactly; the error names the first misfit."""
    directory = resolve_pretrained(name_or_dir)
    saved = from_hf_state_dict(read_safetensors(directory))
    current = model.state_dict()
    for name, tensor in current.items():
        if name not in saved:
            raise ConfigError(
                f"--init-from {directory}: it has no tensor {_hf_name(name)} for the model's {name}; "
                "these weights are not a LlamaForCausalLM of this shape (a structured model? load into the "
                "dense preset, structures are applied after loading)"
            )
        if tuple(saved[name].shape) != tuple(tensor.shape):
            raise ConfigError(
                f"--init-from {directory}: {_hf_name(name)} has shape {tuple(saved[name].shape)}, the model's "
                f"{name} is {tuple(tensor.shape)}; choose the --model preset (and tokenizer, for the vocabulary) "
                "the weights were trained with"
            )
    unexpected = sorted(set(saved) - set(current))
    if unexpected:
        raise ConfigError(f"--init-from {directory}: tensors the model has no place for: {unexpected[:5]}; "
                          "they come from a different architecture")
    # Shapes first (the likeliest misfit, named exactly), then what shapes do not show.
    config_file = directory / "config.json"
    if config_file.is_file():
        check_hf_config(json.loads(config_file.read_text()), model.config, directory)
    with torch.no_grad():
        for name, tensor in current.items():
            tensor.copy_(saved[name].to(tensor.dtype))
    return directory
