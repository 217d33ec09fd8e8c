"""The LLaMA family: the papers' parameter counts, equality with Hugging Face's LlamaForCausalLM."""

import pytest
import torch

from lowmem.errors import ConfigError
from lowmem.models import PRESETS, LlamaConfig, build_model, count_parameters
from lowmem.optim import named_roles

PAPER_COUNTS_MILLIONS = {
    "llama-60m": 58.07,
    "llama-130m": 134.11,
    "llama-350m": 367.97,
    "llama-1b": 1339.08,
    "llama-7b": 6738.42,
}


@pytest.mark.parametrize("preset,millions", PAPER_COUNTS_MILLIONS.items())
def test_paper_presets_have_the_papers_parameter_counts_on_meta(preset, millions):
    model = build_model(preset, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert round(count_parameters(model) / 1e6, 2) == millions


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.startswith("cpu-")])
def test_cpu_tiers_take_the_vocabulary_from_the_tokenizer(preset):
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(preset, device="meta")
    model = build_model(preset, vocab_size=4096, device="meta")
    assert model.lm_head.weight.shape[0] == 4096 == model.embed_tokens.num_embeddings


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="llama-60m"):
        build_model("llama-3b")


def test_model_declares_embedding_and_head_for_roles():
    model = build_model("cpu-tiny", vocab_size=128)
    roles = named_roles(model)
    assert roles["embed_tokens.weight"] == "embedding"
    assert roles["lm_head.weight"] == "head"
    assert roles["norm.weight"] == "vector"
    assert roles["layers.0.self_attn.q_proj.weight"] == "hidden"
    assert sorted(set(roles.values())) == ["embedding", "head", "hidden", "vector"]


def test_init_is_normal_002_and_norms_are_one():
    torch.manual_seed(0)
    model = build_model("cpu-small", vocab_size=4096)
    std = model.layers[0].mlp.up_proj.weight.std().item()
    assert abs(std - 0.02) < 0.001
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))


def test_sequence_longer_than_the_maximum_is_refused():
    model = build_model(LlamaConfig(32, 64, 2, 1, vocab_size=50, max_seq_len=8))
    with pytest.raises(ValueError, match="maximum 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_logits_equal_transformers_llama():
    transformers = pytest.importorskip("transformers")
    config = LlamaConfig(hidden_size=64, intermediate_size=176, num_heads=4, num_layers=3, vocab_size=300, max_seq_len=64)
    torch.manual_seed(0)
    ours = build_model(config).eval()
    hf_config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=4,
        num_hidden_layers=3, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu",
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    missing, unexpected = hf.model.load_state_dict(
        {k: v for k, v in ours.state_dict().items() if not k.startswith("lm_head")}, strict=False
    )
    assert not unexpected and not [k for k in missing if "rotary" not in k]
    hf.lm_head.weight.data.copy_(ours.lm_head.weight.data)
    tokens = torch.randint(0, 300, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    assert (got - expected).abs().max().item() <= 1e-5


def test_bf16_forward_runs_and_keeps_norms_in_fp32():
    model = build_model("cpu-tiny", vocab_size=64).to(torch.bfloat16)
    logits = model(torch.randint(0, 64, (2, 16)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    # The norm's statistics in fp32, rounded to bf16 once at the end, not a norm computed in bf16.
    torch.manual_seed(0)
    x = (torch.randn(4, model.norm.weight.numel()) * 3 + 1).to(torch.bfloat16)
    with torch.no_grad():
        model.norm.weight.copy_(torch.rand_like(model.norm.weight) + 0.5)
        got = model.norm(x)
        wide = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + model.norm.eps)
        expected = model.norm.weight * wide.to(torch.bfloat16)
        narrow = model.norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + model.norm.eps))
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)
    assert not torch.equal(got, narrow)
