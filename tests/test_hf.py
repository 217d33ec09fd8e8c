"""lowmem's optimizers on Hugging Face causal LMs built locally from small random configs: roles and
orientation per architecture, SCALE/Muon/Adam-mini on GPT-2's [in, out] Conv1D weights, and
`transformers.Trainer` training, saving and resuming with lowmem's optimizer state."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import lowmem.optim
from lowmem.errors import ConfigError
from lowmem.optim import param_groups
from lowmem.optim.adam_mini import AdamMini, adam_mini_param_groups
from lowmem.optim.muon import Muon
from lowmem.optim.roles import group_input_dim
from lowmem.optim.scale import normalized_dim

transformers = pytest.importorskip("transformers")

VOCAB = 64


def _quiet(build):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build()


def llama(tied: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    return _quiet(lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=32, tie_word_embeddings=tied, bos_token_id=None,
        eos_token_id=1, pad_token_id=0)))


def gpt2(seed: int = 0):
    torch.manual_seed(seed)
    return _quiet(lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=1,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)))


def qwen2(seed: int = 0):
    torch.manual_seed(seed)
    return _quiet(lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)))


def mistral(seed: int = 0):
    torch.manual_seed(seed)
    return _quiet(lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)))


def roles_and_dims(model: nn.Module) -> dict[str, tuple[str, int | None]]:
    """name -> (role, the dim SCALE's column normalization reduces over; None for vectors)."""
    names = {id(p): n for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = param_groups(model)
    out = {}
    for group in groups:
        for p in group["params"]:
            dim = normalized_dim(group["role"], "column", group_input_dim(group, p)) if p.dim() >= 2 else None
            out[names[id(p)]] = (group["role"], dim)
    return out


# The oracle: what each parameter is, by its (Hugging Face) name; lowmem decides from module types.
def expected_llama_like(name: str, tied: bool) -> tuple[str, int | None]:
    if name == "model.embed_tokens.weight":
        return ("head", 1) if tied else ("embedding", 0)  # a tied weight is the head (see roles.py)
    if name == "lm_head.weight":
        return ("head", 1)
    if name.endswith("norm.weight") or name.endswith(".bias"):
        return ("vector", None)
    assert name.endswith("_proj.weight"), name
    return ("hidden", 1)  # nn.Linear [out, in]: normalized over the inputs, dim 1


def expected_gpt2(name: str) -> tuple[str, int | None]:
    if name == "transformer.wte.weight":
        return ("head", 1)  # tied to lm_head: [vocab, hidden], normalized per vocabulary row
    if name == "transformer.wpe.weight":
        return ("embedding", 0)  # the position table is an embedding, not a hidden matrix
    if name.endswith(".bias") or ".ln_" in name:
        return ("vector", None)
    assert name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")), name
    return ("hidden", 0)  # Conv1D [in, out]: the inputs are dim 0


@pytest.mark.parametrize("arch,build,expected", [
    ("llama", lambda: llama(False), lambda n: expected_llama_like(n, False)),
    ("llama-tied", lambda: llama(True), lambda n: expected_llama_like(n, True)),
    ("qwen2", qwen2, lambda n: expected_llama_like(n, False)),
    ("mistral", mistral, lambda n: expected_llama_like(n, False)),
    ("gpt2", gpt2, expected_gpt2),
])
def test_roles_and_normalized_dims_of_every_parameter(arch, build, expected):
    model = build()
    got = roles_and_dims(model)
    names = [n for n, p in model.named_parameters()]
    assert sorted(got) == sorted(names)  # every trainable parameter, once
    assert {n: got[n] for n in names} == {n: expected(n) for n in names}
    if arch == "qwen2":
        assert got["model.layers.0.self_attn.q_proj.bias"] == ("vector", None)
    if arch == "llama-tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_tied_weight_is_the_head_with_a_warning_and_keeps_scales_momentum():
    model = gpt2()
    with pytest.warns(UserWarning, match="tied to its input embedding; the shared weight gets the head role"):
        opt = lowmem.optim.build("scale", model, lr=1e-2)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    opt.step()
    assert set(opt.state[model.transformer.wte.weight]) == {"momentum_buffer"}


def _rms(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.pow(2).mean(dim, keepdim=True).sqrt()


def test_a_scale_step_on_gpt2_equals_a_per_tensor_reference():
    model = gpt2()
    lr, adam_lr, beta = 1e-2, 3e-3, 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = lowmem.optim.build("scale", model, lr=lr, adam_lr=adam_lr, momentum=beta)
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids).loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        w, g = before[name], grads[name]
        if name == "transformer.wte.weight":  # head: EMA momentum from zero, rows over the hidden dim
            m = (1 - beta) * g
            expected = w - lr * m / _rms(m, 1).clamp_min(1e-8)
        elif name == "transformer.wpe.weight":  # embedding: each hidden unit's column over the positions
            expected = w - lr * g / _rms(g, 0).clamp_min(1e-8)
        elif p.dim() == 2:  # Conv1D [in, out]: each output unit's vector over its inputs is column 0..in
            expected = w - lr * g / _rms(g, 0).clamp_min(1e-8)
        else:  # the released Adam form's first step: eps on the uncorrected sqrt(v) = sqrt(1-beta2)|g|
            expected = w - adam_lr * g / (g.abs() + 1e-8 / math.sqrt(1 - 0.999))
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7, msg=name)


def _conv_and_linear(shape=(16, 64), seed=0):
    """A Conv1D-oriented weight [in, out] and the same map as a Linear weight [out, in], with gradients."""
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Parameter(torch.randn(*shape, generator=gen))
    conv.grad = torch.randn(*shape, generator=gen)
    linear = nn.Parameter(conv.detach().t().clone())
    linear.grad = conv.grad.t().clone()
    return conv, linear


def test_muon_follows_the_true_orientation_of_conv1d():
    conv, linear = _conv_and_linear()  # 16 inputs, 64 outputs: shape factor sqrt(64/16) = 2
    for p, extra in ((conv, {"input_dim": 0}), (linear, {})):
        Muon([{"params": [p], "role": "hidden", **extra}], lr=0.1, ns_dtype="float32").step()
    torch.testing.assert_close(conv.detach().t(), linear.detach(), rtol=1e-5, atol=1e-6)
    gpt = gpt2()
    opt = _quiet(lambda: lowmem.optim.build("muon", gpt, lr=0.02))
    assert {g.get("input_dim") for g in opt.param_groups if g["role"] == "hidden"} == {0}


def test_adam_mini_blocks_follow_output_neurons_of_conv1d():
    conv, linear = _conv_and_linear(seed=1)
    opt_c = AdamMini([{"params": [conv], "role": "hidden", "input_dim": 0}], lr=0.1)
    opt_l = AdamMini([{"params": [linear], "role": "hidden"}], lr=0.1)
    for _ in range(2):
        opt_c.step()
        opt_l.step()
    assert opt_c.state[conv]["exp_avg_sq"].shape == (64,)  # one block per output neuron
    torch.testing.assert_close(opt_c.state[conv]["exp_avg_sq"], opt_l.state[linear]["exp_avg_sq"])
    torch.testing.assert_close(conv.detach().t(), linear.detach())
    gpt = gpt2()
    groups = _quiet(lambda: adam_mini_param_groups(gpt))
    c_fc = gpt.transformer.h[0].mlp.c_fc.weight
    opt = AdamMini(groups, lr=1e-3)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    gpt(ids, labels=ids).loss.backward()
    opt.step()
    assert opt.state[c_fc]["exp_avg_sq"].shape == (c_fc.shape[1],)


def test_an_unknown_module_type_is_named_with_the_role_it_gets():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(8, 8))

    class Declared(nn.Module):
        weight_input_dim = 0

        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 8))

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.odd, self.declared, self.head = nn.Embedding(20, 8), Odd(), Declared(), nn.Linear(8, 20)

        def get_input_embeddings(self):
            return self.embed

        def get_output_embeddings(self):
            return self.head

    model = LM()
    with pytest.warns(UserWarning, match=r"module type Odd \(at odd\) is not one lowmem knows.*role 'hidden'") as caught:
        groups = param_groups(model)
    assert not [w for w in caught if "Declared" in str(w.message)]
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(model.odd.kernel)]["role"] == "hidden" and "input_dim" not in by_param[id(model.odd.kernel)]
    assert by_param[id(model.declared.weight)].get("input_dim") == 0


def test_a_model_whose_head_cannot_be_found_is_refused():
    with pytest.raises(ConfigError, match="found no output head in Sequential.*get_output_embeddings"):
        lowmem.optim.build("scale", nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 5)))

    class Headless(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.out = nn.Embedding(20, 8), nn.Linear(8, 20)

        def get_input_embeddings(self):
            return self.embed

        def get_output_embeddings(self):
            return None

    # A model that declares it has no head (Hugging Face's base LlamaModel) is taken at its word, aloud.
    with pytest.warns(UserWarning, match=r"Headless.get_output_embeddings\(\) gives no head.*no momentum"):
        groups = param_groups(Headless())
    assert "head" not in {g["role"] for g in groups}
    with pytest.warns(UserWarning, match="LlamaModel.get_output_embeddings"):
        assert {g["role"] for g in param_groups(llama().model)} == {"embedding", "hidden", "vector"}


# ----------------------------------------------------------------------------------------------------
# transformers.Trainer with lowmem's optimizers.

class _Sequences(torch.utils.data.Dataset):
    """Learnable sequences: arithmetic progressions modulo the vocabulary."""

    def __init__(self, n: int = 32, length: int = 16) -> None:
        self.rows = [torch.tensor([(2 + i + (1 + i % 3) * k) % VOCAB for k in range(length)]) for i in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def _trainer(model, optimizer, out, max_steps: int = 20):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, logging_steps=1, save_steps=10,
        save_strategy="steps", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
        lr_scheduler_type="cosine", warmup_steps=2)
    return transformers.Trainer(model=model, args=args, train_dataset=_Sequences(), optimizers=(optimizer, None))


METHODS = {"scale": {"lr": 2e-2, "adam_lr": 1e-2}, "galore": {"lr": 1e-2, "rank": 4, "update_proj_gap": 5}}


@pytest.mark.parametrize("name", list(METHODS))
def test_trainer_trains_saves_and_resumes_bitwise(name, tmp_path):
    pytest.importorskip("accelerate")
    straight = llama(seed=0)
    trainer = _trainer(straight, _quiet(lambda: lowmem.optim.build(name, straight, **METHODS[name])), tmp_path / "a")
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses
    assert (tmp_path / "a" / "checkpoint-10" / "optimizer.pt").is_file()
    resumed = llama(seed=1)  # other weights: all of them must come from the checkpoint
    trainer = _trainer(resumed, _quiet(lambda: lowmem.optim.build(name, resumed, **METHODS[name])), tmp_path / "b")
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-10"))
    ours, theirs = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    resumed_losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert resumed_losses[-10:] == losses[-10:]


def test_trainer_trains_gpt2_with_scale(tmp_path):
    pytest.importorskip("accelerate")
    model = gpt2()
    trainer = _trainer(model, _quiet(lambda: lowmem.optim.build("scale", model, lr=2e-2, adam_lr=1e-2)), tmp_path)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses
