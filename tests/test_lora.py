"""LoRA (nanogpt2/lora.py): adapters move both ways between nanogpt2 and peft + transformers with identical
logits, merging changes nothing a user can measure, and bad input fails naming the bad value."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from nanogpt2 import GPT2LMHeadModel
from nanogpt2.lora import LoRALinear, apply_lora, has_lora, load_adapter, merge_lora, save_adapter

from conftest import hf_quiet

TARGETS = ["c_attn", "c_proj", "c_fc"]


def randomize_lora(model, seed=1):
    """Nonzero B (init leaves B = 0, which would make every comparison below trivially pass)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.2)
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)


def lora_model(path, r, alpha, target_modules=TARGETS):
    """The checkpoint at `path` with LoRA adapters whose B is nonzero (randomize_lora)."""
    model = apply_lora(GPT2LMHeadModel.from_pretrained(path), r=r, alpha=alpha, target_modules=target_modules)
    randomize_lora(model)
    return model


def test_apply_freezes_base_and_starts_at_the_base_model(hf_checkpoint):
    path, _ = hf_checkpoint()
    model = GPT2LMHeadModel.from_pretrained(path)
    ids = torch.randint(0, 101, (2, 9))
    before = model(ids).logits
    apply_lora(model, r=4, alpha=8, target_modules=("c_attn", "c_proj"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # 2 layers x (attn.c_attn, attn.c_proj, mlp.c_proj: suffix matching) x (A, B)
    assert len(trainable) == 2 * 3 * 2 and all(".lora_" in n for n in trainable), trainable
    assert sum(".mlp.c_proj." in n for n in trainable) == 4 and not any(".c_fc." in n for n in trainable)
    torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)  # B = 0: exactly the base model
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert model.transformer.h[0].attn.c_attn.lora_A.weight.grad is not None


def test_our_adapter_loads_in_peft_with_identical_logits(hf_checkpoint, tmp_path):
    import peft
    transformers = hf_quiet()
    path, _ = hf_checkpoint()
    ours = lora_model(path, r=4, alpha=12)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=path)
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert keys["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 32)  # (r, in)
    assert keys["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 4)  # (out, r)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["peft_type"] == "LORA"

    ids = torch.randint(0, 101, (2, 11))
    base = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    base_logits = base(ids).logits
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()  # injects into `base`
    expected = theirs(ids).logits
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # the adapter does change the model
    torch.testing.assert_close(ours(ids).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_loads_into_nanogpt2_with_identical_logits(hf_checkpoint, tmp_path, use_rslora):
    import peft
    hf_quiet()
    path, hf = hf_checkpoint()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, fan_in_fan_out=True, use_rslora=use_rslora,
                             init_lora_weights=False, task_type="CAUSAL_LM")  # random, nonzero B
    torch.manual_seed(3)
    theirs = peft.get_peft_model(hf, config).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(GPT2LMHeadModel.from_pretrained(path), str(tmp_path / "peft"))
    scaling = ours.transformer.h[0].attn.c_attn.scaling
    assert scaling == pytest.approx(8 / 2 if use_rslora else 8 / 4)  # alpha/sqrt(r) vs alpha/r
    ids = torch.randint(0, 101, (3, 8))
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)


def test_merge_keeps_logits_and_transformers_loads_the_merged_checkpoint(hf_checkpoint, tmp_path):
    transformers = hf_quiet()
    path, base = hf_checkpoint()
    model = lora_model(path, r=2, alpha=4)
    ids = torch.randint(0, 101, (2, 10))
    unmerged = model(ids).logits
    assert not torch.allclose(unmerged, base(ids).logits, atol=1e-3)  # the adapter does change the model
    merge_lora(model)
    assert not has_lora(model)
    torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path / "merged")
    assert sorted(os.listdir(tmp_path / "merged")) == ["config.json", "model.safetensors"]
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(theirs(ids).logits, unmerged, atol=1e-5, rtol=0)


def test_resave_round_trip_is_exact(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint()
    a = lora_model(path, r=3, alpha=6, target_modules=("mlp.c_proj",))
    save_adapter(a, tmp_path)
    b = load_adapter(GPT2LMHeadModel.from_pretrained(path), str(tmp_path))
    assert list(b.transformer.h[0].mlp.c_proj.lora_A.weight.shape) == [3, 128]
    assert not isinstance(b.transformer.h[0].attn.c_proj, LoRALinear)  # "mlp.c_proj" spares attn.c_proj
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_bad_input_names_the_value(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint()
    model = GPT2LMHeadModel.from_pretrained(path)
    with pytest.raises(ValueError, match=r"unknown LoRA target module 'q_proj'.*valid names: c_attn.*c_proj.*c_fc"):
        apply_lora(model, r=4, alpha=8, target_modules=("c_attn", "q_proj"))
    for r in (0, -2):
        with pytest.raises(ValueError, match=f"positive integer, got {r}"):
            apply_lora(model, r=r, alpha=8)
    assert not has_lora(model) and all(p.requires_grad for p in model.parameters())  # nothing half-applied
    apply_lora(model, r=2, alpha=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, r=2, alpha=2)
    # a PEFT feature we do not implement is refused, not silently ignored
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        load_adapter(GPT2LMHeadModel.from_pretrained(path), str(tmp_path))


def test_regex_targets_follow_peft(hf_checkpoint, tmp_path):
    """A string target_modules is a regex over full module names (PEFT's rule); a plain name is saved as a list."""
    import peft
    transformers = hf_quiet()
    path, _ = hf_checkpoint()
    ours = apply_lora(GPT2LMHeadModel.from_pretrained(path), r=2, alpha=4, target_modules=r".*\.1\.mlp\.c_(fc|proj)")
    assert sorted(n for n, m in ours.named_modules() if isinstance(m, LoRALinear)) == \
        ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    randomize_lora(ours)
    save_adapter(ours, tmp_path / "re")
    theirs = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(path), str(tmp_path / "re"))
    ids = torch.randint(0, 101, (1, 7))
    torch.testing.assert_close(ours(ids).logits, theirs.eval()(ids).logits, atol=1e-5, rtol=0)
    plain = apply_lora(GPT2LMHeadModel.from_pretrained(path), r=2, alpha=4, target_modules="c_fc")
    save_adapter(plain, tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["target_modules"] == ["c_fc"]


def test_save_pretrained_refuses_unmerged_adapters(hf_checkpoint, tmp_path):
    """A plain checkpoint with LoRA keys in it would load nowhere: refuse, and say what to call instead."""
    path, _ = hf_checkpoint()
    model = GPT2LMHeadModel.from_pretrained(path)
    apply_lora(model, r=4, alpha=8, target_modules=("c_attn", "c_fc"))
    with pytest.raises(ValueError, match="unmerged LoRA adapters.*merge_lora.*save_adapter"):
        model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "model.safetensors").exists()
    merge_lora(model)
    model.save_pretrained(tmp_path / "plain")
    assert (tmp_path / "plain" / "model.safetensors").exists()
