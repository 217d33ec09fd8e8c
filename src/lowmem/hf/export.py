"""`lowmem export RUN --to hf DIR`: a trained run as a Hugging Face `LlamaForCausalLM` directory.

DIR then loads offline with `LlamaForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`:

  config.json, generation_config.json   transformers.LlamaConfig from the run's model (lowmem.models.hf)
  model.safetensors                     the weights (safetensors, no pickle); a structured model is
                                        merged to dense nn.Linear weights first (Structure.merge)
  tokenizer.json, tokenizer_config.json, special_tokens_map.json
                                        the run's trained BPE (as a PreTrainedTokenizerFast with pad
                                        <pad> and eos </s>) or its named Hugging Face tokenizer
  README.md                             model, data, tokens, optimizer, final perplexity (summary.json)

The directory is written under a temporary name and renamed when whole; an existing non-empty DIR
is refused. transformers and safetensors are optional dependencies (`pip install 'lowmem[hf]'`).

One difference in tokenization: lowmem encodes a literal "</s>" or "<pad>" inside a document as
plain text, Hugging Face tokenizers as the special token (that setting is not stored in
tokenizer.json); text without those strings encodes to the same ids.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import torch

import lowmem
from lowmem.errors import ConfigError, check_choice
from lowmem.models.hf import WEIGHTS_FILE, hf_config_fields, to_hf_state_dict
from lowmem.train.trained import TrainedModel, load_trained

FORMATS = ("hf",)


def require_transformers():
    try:
        import transformers
    except ImportError as err:
        raise ConfigError(f"exporting to Hugging Face needs transformers ({err}); pip install 'lowmem[hf]'") from None
    return transformers


def _check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            f"export directory {out} exists and is not empty; choose a new directory (or empty this one yourself): "
            "lowmem does not overwrite files it did not write"
        )


def dense_model(trained: TrainedModel) -> torch.nn.Module:
    """The trained model with every structured module merged into a dense nn.Linear, checked to
    have exactly the dense preset's tensors."""
    model = trained.model
    if trained.structure is not None:
        trained.structure.merge(model)
    if trained.structure is not None:
        with torch.device("meta"):
            expected = {name: p.shape for name, p in type(model)(model.config).state_dict().items()}
        got = {name: t.shape for name, t in model.state_dict().items()}
        if got != expected:
            stray = sorted(set(got) ^ set(expected))[:4]
            raise ConfigError(
                f"structure {trained.config.structure.get('name')!r} does not merge into dense weights (left {stray}); "
                "its modules need a dense_weight() method to be exported"
            )
    return model


def _save_tokenizer(trained: TrainedModel, directory: Path, transformers) -> int | None:
    """Write the run's tokenizer into `directory`; return its bos id (None when it has none)."""
    tok = trained.tokenizer
    spec = trained.config.data.tokenizer
    if tok.path is None:  # a Hugging Face tokenizer: saved as it is, with its own class and settings
        hf_tok = transformers.AutoTokenizer.from_pretrained(os.path.expanduser(spec))
    else:
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_file(str(tok.path))
        pad = backend.id_to_token(tok.pad_id)
        eos = backend.id_to_token(tok.eos_id)
        hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=pad, eos_token=eos,
                                                      model_max_length=trained.model.config.max_seq_len)
    hf_tok.save_pretrained(str(directory))
    return hf_tok.bos_token_id


def _readme(trained: TrainedModel, n_params: int) -> str:
    c, s = trained.config, trained.summary or {}
    optimizer = c.optim.name + (f" (lr {c.optim.lr})" if c.optim.lr is not None else "")
    if c.optim.hparams:
        optimizer += ", " + ", ".join(f"{k}={v}" for k, v in sorted(c.optim.hparams.items()))
    rows = [
        ("model", f"lowmem {c.model} (LLaMA), {n_params:,} parameters" + (
            f"; trained with structure {c.structure} and merged to dense weights" if c.structure else "")),
        ("data", f"{c.data.source} (tokenizer {c.data.tokenizer}, sequence length {c.data.seq_len}, {c.data.seq_mode})"),
        ("tokens trained", f"{s.get('tokens', trained.tokens):,} in {s.get('steps', trained.step):,} steps"),
        ("optimizer", optimizer),
    ]
    if s.get("val_perplexity") is not None:
        rows.append(("final validation perplexity", f"{s['val_perplexity']:.3f} (token-weighted, {s.get('val_tokens', 0):,} tokens)"))
    else:
        rows.append(("final validation perplexity", "not recorded (the run has no summary.json: it did not finish)"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""# {c.model} trained with lowmem

Exported by lowmem {lowmem.__version__} from `{trained.checkpoint}` (step {trained.step}).

| | |
|---|---|
{table}

```python
from transformers import AutoTokenizer, LlamaForCausalLM

model = LlamaForCausalLM.from_pretrained("path/to/this/directory")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")
```

Continue pretraining it with `lowmem train --model {c.model} --init-from path/to/this/directory`.
"""


def export_hf(path: str | Path, out_dir: str | Path, tokenizer: str | None = None) -> Path:
    """Export the checkpoint at `path` (a run directory: its newest) to the new directory `out_dir`."""
    out = Path(out_dir)
    _check_target(out)
    transformers = require_transformers()
    try:
        from safetensors.torch import save_file
    except ImportError as err:
        raise ConfigError(f"exporting needs safetensors ({err}); pip install 'lowmem[hf]'") from None
    trained = load_trained(path, tokenizer)
    model = dense_model(trained)
    staging = out.with_name(f".{out.name}.export-tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        bos_id = _save_tokenizer(trained, staging, transformers)
        tok = trained.tokenizer
        dtype = next(model.parameters()).dtype
        fields = hf_config_fields(model.config, bos_id=bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
        hf_config = transformers.LlamaConfig(**fields, architectures=["LlamaForCausalLM"])
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        setattr(hf_config, "dtype" if (major, minor) >= (4, 56) else "torch_dtype", str(dtype).removeprefix("torch."))
        hf_config.save_pretrained(str(staging))
        transformers.GenerationConfig(bos_token_id=bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id).save_pretrained(str(staging))
        save_file(to_hf_state_dict(model), str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / "README.md").write_text(_readme(trained, sum(p.numel() for p in model.parameters())))
        # safetensors writes its file 0600; give it the mode every other file got (0666 less the umask).
        os.chmod(staging / WEIGHTS_FILE, stat.S_IMODE((staging / "README.md").stat().st_mode))
        if out.exists():  # an empty directory (checked above)
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def describe_export(out: Path) -> str:
    config = json.loads((out / "config.json").read_text())
    size = (out / WEIGHTS_FILE).stat().st_size
    return (f"wrote {out}: LlamaForCausalLM ({config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
            f"vocabulary {config['vocab_size']}), {WEIGHTS_FILE} {size / 2**20:.1f} MiB, tokenizer, README.md")


def export(path: str | Path, to: str, out_dir: str | Path, tokenizer: str | None = None) -> Path:
    check_choice("export format (--to)", to, FORMATS, ConfigError)
    return export_hf(path, out_dir, tokenizer)


__all__: list[Any] = ["FORMATS", "dense_model", "describe_export", "export", "export_hf", "require_transformers"]
