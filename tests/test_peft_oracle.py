"""lowmem's LoRA structure against peft's LoRA layers (the test oracle): the same function, the same
gradients for every trained parameter, the same AdamW trajectory, and the same merged dense model."""

from __future__ import annotations

import pytest
import torch

from lowmem.assembly import build_model
from lowmem.models.llama import LlamaConfig
from lowmem.structure import build_structure

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CONFIG = LlamaConfig(hidden_size=64, intermediate_size=176, num_heads=4, num_layers=2, vocab_size=300, max_seq_len=64)
RANK, ALPHA = 8, 16
HIDDEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_key(name: str) -> str:
    """lowmem's parameter name → the same parameter's name in a peft-wrapped LlamaForCausalLM."""
    if name.endswith(".lora_A") or name.endswith(".lora_B"):
        name = name + ".default.weight"
    elif name.rsplit(".", 2)[-2] in HIDDEN:  # W0
        name = name.replace(".weight", ".base_layer.weight")
    return "base_model.model." + (name if name.startswith("lm_head") else "model." + name)


def _twins() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    # lora_dropout 0 on both sides (lowmem's default is ReLoRA's 0.1): the masks would be different draws
    ours = build_model(CONFIG, structure={"name": "lora", "rank": RANK, "alpha": ALPHA, "dropout": 0.0}).double()
    with torch.no_grad():  # B = 0 at the start in both; give it values so the update path is tested from step 0
        for name, p in ours.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=4,
        num_hidden_layers=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu")).double()
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none",
                                                     target_modules=HIDDEN))
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            target = theirs_params[_peft_key(name)]
            assert target.shape == p.shape, name
            target.copy_(p)
            # pretraining with LoRA trains embedding, norms and head in full; peft freezes them by default
            target.requires_grad_(p.requires_grad)
    return ours, theirs


def _tokens(step: int) -> torch.Tensor:
    return torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(step))


def _losses(model: torch.nn.Module, tokens: torch.Tensor, hf: bool) -> torch.Tensor:
    logits = model(tokens).logits if hf else model(tokens)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 300), tokens[:, 1:].reshape(-1))


def test_lora_forward_and_every_gradient_equal_peft():
    ours, theirs = _twins()
    assert {_peft_key(n) for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert sum(not p.requires_grad for p in ours.parameters()) == 7 * CONFIG.num_layers  # W0 frozen
    tokens = _tokens(0)
    # fp64 throughout, but both models take RMSNorm's and RoPE's statistics in fp32 (HF casts to
    # float32; lowmem keeps norms in fp32), so agreement is at fp32's level, as in test_models
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, rtol=0, atol=1e-6)
    _losses(ours, tokens, hf=False).backward()
    _losses(theirs, tokens, hf=True).backward()
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            theirs_grad = theirs_params[_peft_key(name)].grad
            assert ((p.grad - theirs_grad).norm() / theirs_grad.norm()).item() <= 1e-5, name


def test_twenty_adamw_steps_follow_peft():
    ours, theirs = _twins()
    initial = {n: p.detach().clone() for n, p in ours.named_parameters()}
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=3e-3)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=3e-3)
    for step in range(20):
        for model, opt, hf in ((ours, opt_ours, False), (theirs, opt_theirs, True)):
            opt.zero_grad()
            _losses(model, _tokens(step), hf).backward()
            opt.step()
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        moved = (theirs_params[_peft_key(name)] - initial[name]).norm()
        if not p.requires_grad:
            assert moved == 0 and torch.equal(p, initial[name]), name
            continue
        assert moved > 0, name
        assert ((p - theirs_params[_peft_key(name)]).norm() / moved).item() <= 1e-4, name


def test_the_merged_dense_model_equals_peft_merge_and_unload():
    ours, theirs = _twins()
    w0 = ours.layers[0].self_attn.q_proj.weight.detach().clone()
    dense = build_structure({"name": "lora", "rank": RANK, "alpha": ALPHA}).merge(ours)
    merged = theirs.merge_and_unload().state_dict()
    for name, w in dense.state_dict().items():
        theirs_w = merged[name if name.startswith("lm_head") else "model." + name]
        torch.testing.assert_close(w, theirs_w, rtol=0, atol=1e-15, msg=name)
    assert not torch.equal(dense.state_dict()["layers.0.self_attn.q_proj.weight"], w0)  # B != 0, so the merge moved W0
