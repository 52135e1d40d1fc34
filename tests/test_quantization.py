"""Quantized weights (nanogpt2/quantization.py): int8 and int4 logits stay within stated bounds of fp32, the CPU
kernels equal a dequantize-then-matmul reference, checkpoints round-trip exactly, LoRA trains on a quantized
base, and every misuse fails naming the bad value."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from helpers_generation import assert_greedy_up_to_near_ties

import nanogpt2
from nanogpt2 import GPT2LMHeadModel, GPT2Model
from nanogpt2.lora import apply_lora, merge_lora
from nanogpt2.optim import build_optimizer
from nanogpt2.quantization import (QuantizedEmbedding, QuantizedLinear, Quantizer, dequantize_rows, quantize_int4,
                                   quantize_int8, unpack_int4)

from conftest import hf_quiet

SCHEMES = [("int8", None), ("int4", 32)]
BUNDLED = "shakespeare-tiny"


def text_ids(n=192):
    """Real text for the bundled model (random ids would measure noise, not language)."""
    enc = nanogpt2.get_tokenizer()
    path = os.path.join(os.path.dirname(nanogpt2.__file__), "assets", "data", "tinyshakespeare.txt")
    with open(path, encoding="utf-8") as f:
        text = f.read()[-20000:]
    return torch.tensor([enc.encode(text)[:n]])


# ---- the arithmetic -------------------------------------------------------------------------------

def test_int8_rounds_each_row_to_its_own_scale():
    w = torch.randn(7, 48) * torch.logspace(-2, 1, 7)[:, None]   # rows of very different range
    q, s = quantize_int8(w, torch.float32)
    assert q.dtype == torch.int8 and q.abs().max() == 127 and s.shape == (7,)
    err = (dequantize_rows(q, s, None, None, torch.float32) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()                  # at most half a step, per row


@pytest.mark.parametrize("g", [32, 64])
def test_int4_packs_two_a_byte_and_stays_within_half_a_step(g):
    w = torch.randn(5, 128)
    packed, s, z = quantize_int4(w, g, torch.float32)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 64) and s.shape == z.shape == (5, 128 // g)
    q = unpack_int4(packed)
    assert torch.equal(q[:, 0::2], packed & 15) and torch.equal(q[:, 1::2], packed >> 4)   # low nibble = even k
    err = (dequantize_rows(packed, s, z, g, torch.float32) - w).abs().view(5, -1, g)
    assert (err <= s[..., None] / 2 + 1e-6).all()


@pytest.mark.parametrize("mode,g", SCHEMES + [("int4", 64)])
@pytest.mark.parametrize("n", [96, 101])    # 101: not a multiple of 16, the CPU int4 op's padded path
def test_cpu_kernel_equals_dequantize_then_matmul(mode, g, n):
    torch.manual_seed(0)
    w, b = torch.randn(n, 128), torch.randn(n)
    layer = QuantizedLinear.from_float(w, b, mode, g)
    x = torch.randn(3, 5, 128)
    ref = F.linear(x, layer.dequantized_weight(), b)
    out = layer(x)
    assert out.shape == (3, 5, n) and out.dtype == torch.float32
    # the op takes bf16 activations (module doc): bf16 rounding of x and of the output, nothing more
    torch.testing.assert_close(out, ref, atol=0.05 * ref.abs().max().item(), rtol=0.02)
    assert (out - ref).abs().mean() < 0.01 * ref.abs().mean()


def test_gradient_reaches_the_input_through_the_dequantized_weight():
    torch.manual_seed(0)
    layer = QuantizedLinear.from_float(torch.randn(40, 64), None, "int4", 32)
    x = torch.randn(4, 64, requires_grad=True)
    (layer(x) ** 2).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    (F.linear(x2, layer.dequantized_weight()) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=0.05, atol=0.05 * x2.grad.abs().max().item())
    assert not layer.qweight.requires_grad and layer.qweight.grad is None


# ---- whole models -------------------------------------------------------------------------------

# Stated bounds, bundled model, 192 tokens of real text: relative L2 error of the logits, and how often the
# quantized top-1 token equals fp32's (measured: int8 0.3% / 99%, int4-32 4.3% / 90%; see BENCHMARKS.md).
BOUNDS = {("int8", None): (0.01, 0.97), ("int4", 32): (0.08, 0.80), ("int4", 64): (0.10, 0.75)}


@pytest.mark.parametrize("mode,g", list(BOUNDS))
def test_bundled_model_logits_within_the_stated_bound(mode, g):
    ids = text_ids()
    ref = GPT2LMHeadModel.from_pretrained(BUNDLED)(ids).logits
    out = GPT2LMHeadModel.from_pretrained(BUNDLED, quantize=mode, group_size=g)(ids).logits
    rel = ((out - ref).norm() / ref.norm()).item()
    top1 = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    max_rel, min_top1 = BOUNDS[(mode, g)]
    assert rel < max_rel and top1 > min_top1, (rel, top1)


@pytest.mark.parametrize("mode,g", SCHEMES)
def test_quantize_in_memory_equals_quantize_while_loading(hf_checkpoint, mode, g):
    path, _ = hf_checkpoint()
    ids = torch.randint(0, 101, (2, 11))
    loaded = GPT2LMHeadModel.from_pretrained(path, quantize=mode, group_size=g)
    in_memory = nanogpt2.quantize(GPT2LMHeadModel.from_pretrained(path), mode, g)
    torch.testing.assert_close(loaded(ids).logits, in_memory(ids).logits, atol=0, rtol=0)
    assert loaded.config.extra["quantization_config"]["mode"] == mode
    assert sum(isinstance(m, QuantizedLinear) for m in loaded.modules()) == 2 * 4 + 1   # 4 per block + lm_head


def test_loading_quantizes_each_layer_as_it_arrives(hf_checkpoint, monkeypatch):
    """Never the whole float model in memory: when a layer is quantized, at most that one target linear holds
    real float weights (the others are either still meta, i.e. not read yet, or already integers)."""
    path, _ = hf_checkpoint()
    seen, original = [], Quantizer.loaded

    def spy(self, model, module_name):
        float_linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                         and not m.weight.is_meta and n != "lm_head"]
        seen.append(len(float_linears))
        return original(self, model, module_name)

    monkeypatch.setattr(Quantizer, "loaded", spy)
    GPT2LMHeadModel.from_pretrained(path, quantize="int8")
    assert seen and max(seen) <= 1, seen


def test_tied_head_and_embedding_stay_one_quantized_matrix(hf_checkpoint):
    path, _ = hf_checkpoint()
    model = GPT2LMHeadModel.from_pretrained(path, quantize="int4", group_size=32)
    wte, head = model.transformer.wte, model.lm_head
    assert isinstance(wte, QuantizedEmbedding)
    assert wte.qweight is head.qweight and wte.scales is head.scales and wte.zeros is head.zeros
    ids = torch.tensor([[0, 5, 100]])
    torch.testing.assert_close(wte(ids)[0], head.dequantized_weight()[ids[0]], atol=0, rtol=0)
    model.to(torch.bfloat16)     # a move keeps the tie (shared Parameters) and re-derives the CPU layout
    assert model.transformer.wte.qweight is model.lm_head.qweight and model.lm_head.cpu_scales.dtype == torch.bfloat16
    assert model(ids).logits.dtype == torch.bfloat16 and model.dtype == torch.bfloat16
    assert model.num_parameters() == GPT2LMHeadModel.from_pretrained(path).num_parameters()


@pytest.mark.parametrize("mode,g", SCHEMES)
def test_save_load_round_trip_is_exact(hf_checkpoint, tmp_path, mode, g):
    path, _ = hf_checkpoint()
    model = GPT2LMHeadModel.from_pretrained(path, quantize=mode, group_size=g)
    model.save_pretrained(tmp_path / "q")
    with open(tmp_path / "q" / "config.json") as f:
        qc = json.load(f)["quantization_config"]
    assert qc["quant_method"] == "nanogpt2" and qc["mode"] == mode and qc["group_size"] == g
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "q")            # no quantize=: read as saved
    assert list(model.state_dict()) == list(again.state_dict())
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), n
    ids = torch.randint(0, 101, (2, 9))
    torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=0, rtol=0)
    # asking for the scheme it has is fine; for another is an error naming both
    GPT2LMHeadModel.from_pretrained(tmp_path / "q", quantize=mode, group_size=g)
    other = ("int4", 32) if mode == "int8" else ("int8", None)
    with pytest.raises(ValueError, match=f"already quantized as {mode}.*asked for {other[0]}"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "q", quantize=other[0], group_size=other[1])


def test_transformers_refuses_a_quantized_checkpoint_and_loads_a_dequantized_one(hf_checkpoint, tmp_path):
    transformers = hf_quiet()
    path, _ = hf_checkpoint()
    model = GPT2LMHeadModel.from_pretrained(path, quantize="int4", group_size=32)
    model.save_pretrained(tmp_path / "q")
    with pytest.raises(RuntimeError, match="mismatched_sizes"):   # after logging "Unknown quantization type"
        transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "q")
    ids = torch.randint(0, 101, (2, 9))
    quantized_logits = model(ids).logits
    model.dequantize()
    assert not any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in model.modules())
    assert model.lm_head.weight is model.transformer.wte.weight and "quantization_config" not in model.config.extra
    model.save_pretrained(tmp_path / "plain")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "plain").eval()
    ours = model(ids).logits
    torch.testing.assert_close(theirs(ids).logits, ours, atol=1e-4, rtol=1e-4)
    # the float model is the quantized one's arithmetic without the bf16 activations of the CPU op
    torch.testing.assert_close(ours, quantized_logits, atol=0.05 * ours.abs().max().item(), rtol=0.02)


def test_headless_model_and_untied_head(hf_checkpoint):
    path, _ = hf_checkpoint(tie_word_embeddings=False)
    model = GPT2LMHeadModel.from_pretrained(path, quantize="int8")
    assert isinstance(model.lm_head, QuantizedLinear) and isinstance(model.transformer.wte, torch.nn.Embedding)
    body = GPT2Model.from_pretrained(path, quantize="int8")
    assert sum(isinstance(m, QuantizedLinear) for m in body.modules()) == 8
    ids = torch.randint(0, 101, (1, 7))
    assert body(ids).last_hidden_state.shape == (1, 7, 32)


@pytest.mark.parametrize("mode,g", SCHEMES)
def test_generate_on_a_quantized_model(hf_checkpoint, mode, g):
    path, _ = hf_checkpoint()
    model = GPT2LMHeadModel.from_pretrained(path, quantize=mode, group_size=g)
    ids = torch.randint(0, 101, (2, 5))
    out = model.generate(ids, max_new_tokens=8)
    # greedy continues with the argmax of a plain forward over the growing sequence
    step = ids
    for _ in range(8):
        step = torch.cat([step, model(step).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, step)


# ---- LoRA on a quantized base (QLoRA) --------------------------------------------------------------

def test_lora_on_a_quantized_base_lowers_the_loss_and_leaves_the_base_alone(hf_checkpoint):
    path, _ = hf_checkpoint()
    model = GPT2LMHeadModel.from_pretrained(path, quantize="int4", group_size=32)
    base = {n: t.clone() for n, t in model.state_dict().items()}
    apply_lora(model, r=4, alpha=8, target_modules=("c_attn", "c_proj", "c_fc"))
    assert model.transformer.h[0].attn.c_attn.lora_A.weight.dtype == torch.float32
    model.train()
    opt = build_optimizer(model, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0, device=torch.device("cpu"))
    ids = torch.randint(0, 101, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for n, t in model.state_dict().items():
        key = n.replace(".base_layer", "")
        if key in base:
            assert torch.equal(t, base[key]), n
    with pytest.raises(ValueError, match=r"dequantize\(model\)"):
        merge_lora(model)
    model.dequantize()
    merge_lora(model)        # a float base takes the adapters


def test_optimizer_over_a_quantized_model_without_adapters_is_refused(hf_checkpoint):
    path, _ = hf_checkpoint()
    model = GPT2LMHeadModel.from_pretrained(path, quantize="int8").train()
    with pytest.raises(ValueError, match=r"quantized \(integer\) weights.*apply_lora.*dequantize"):
        build_optimizer(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, device=torch.device("cpu"))


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(quantize="int3"), r"unknown quantization mode 'int3'; valid: 'int8', 'int4'"),
    (dict(quantize="int4", group_size=48), r"group_size 48 is not supported; valid: 32, 64, 128"),
    (dict(quantize="int4", group_size=64), r"group_size 64 does not divide in_features=32 of transformer.h.0"),
    (dict(quantize="int8", group_size=32), r"group_size=32 applies to int4 only"),
    (dict(group_size=32), r"group_size=32 needs quantize=\"int4\""),
])
def test_bad_scheme_is_refused_naming_the_value(hf_checkpoint, kwargs, match):
    path, _ = hf_checkpoint()
    with pytest.raises(ValueError, match=match):
        GPT2LMHeadModel.from_pretrained(path, **kwargs)


def test_quantizing_twice_and_under_lora_are_refused(hf_checkpoint):
    path, _ = hf_checkpoint()
    model = GPT2LMHeadModel.from_pretrained(path, quantize="int8")
    with pytest.raises(ValueError, match=r"already quantized \(int8\).*dequantize"):
        nanogpt2.quantize(model, "int4", 32)
    with pytest.raises(ValueError, match="LoRA adapters"):
        nanogpt2.quantize(apply_lora(GPT2LMHeadModel.from_pretrained(path), r=2, alpha=4), "int8")
    with pytest.raises(ValueError, match="not quantized"):
        nanogpt2.dequantize(GPT2LMHeadModel.from_pretrained(path))


def test_foreign_or_damaged_quantization_config_is_refused(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint()
    GPT2LMHeadModel.from_pretrained(path, quantize="int8").save_pretrained(tmp_path / "q")
    cfg_path = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quant_method 'bitsandbytes'; nanogpt2 loads only"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "q")
    del cfg["quantization_config"]                  # integer tensors without the config that explains them
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(nanogpt2.CheckpointError, match="is integer but this model needs a float tensor"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "q")


def test_qlora_training_run_lowers_the_loss_and_exports_a_float_checkpoint(tmp_path, hf_checkpoint):
    """tools/train.py --quantize int4 --lora-r 8: the run trains, saves PEFT adapters, and --export-dir writes
    the dequantized base with the adapters merged, which transformers loads."""
    from test_train import VOCAB, tiny_cfg
    from nanogpt2.train import TrainConfig, train
    transformers = hf_quiet()
    base_dir, _ = hf_checkpoint(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    cfg = tiny_cfg(tmp_path, init_from=base_dir, quantize="int4", group_size=32, lora_r=8, lora_alpha=16,
                   lora_targets="c_attn,c_proj,c_fc", max_steps=8, lr=2e-2, dropout=0.0, log_interval=1,
                   export_dir=str(tmp_path / "merged"))
    result = train(cfg)
    losses = [loss for _, loss in result.history]
    assert losses[-1] < losses[0] - 0.1, losses
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(cfg.out_dir))
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    ours = GPT2LMHeadModel.from_pretrained(tmp_path / "merged")
    ids = torch.randint(0, VOCAB, (1, 12))
    torch.testing.assert_close(merged(ids).logits, ours(ids).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="needs --lora-r > 0"):
        TrainConfig(data="x", init_from=base_dir, quantize="int8")
    with pytest.raises(ValueError, match="--group-size 32 needs --quantize int4"):
        TrainConfig(data="x", init_from=base_dir, group_size=32, lora_r=4)
    with pytest.raises(ValueError, match="group_size 40 is not supported"):
        TrainConfig(data="x", init_from=base_dir, quantize="int4", group_size=40, lora_r=4)


# ---- CUDA (make gpu-check): the Triton weight-only kernels inside a whole model ------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("mode,g", SCHEMES + [("int4", 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_quantized_model_equals_its_dequantized_self(hf_checkpoint, mode, g, dtype):
    path, _ = hf_checkpoint(n_embd=128, n_head=4, vocab_size=1000)
    model = GPT2LMHeadModel.from_pretrained(path, quantize=mode, group_size=g, dtype=dtype, device="cuda")
    ids = torch.randint(0, 1000, (3, 40), device="cuda")
    out = model(ids).logits                                            # prefill: the GEMM kernel
    decode = model.generate(ids[:1, :8], max_new_tokens=16)            # decode: the GEMV kernel
    ref_model = GPT2LMHeadModel.from_pretrained(path, quantize=mode, group_size=g, dtype=dtype, device="cuda")
    ref_model.dequantize()
    ref = ref_model(ids).logits
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol * ref.abs().max().item(), rtol=tol)
    compiled = model.generate(ids[:1, :8], max_new_tokens=16, compile=True)                  # CUDA graphs
    if dtype == torch.float32:
        assert torch.equal(compiled, decode)
    else:   # bf16: inductor's fused norms round unlike eager's, so a near-tie may flip and the sequences part
        assert_greedy_up_to_near_ties(model, compiled, 8)


def test_int4_group_128_on_a_wider_model_stays_within_its_bound(hf_checkpoint):
    """Group 128 needs in_features >= 128: a random 128-wide model (the bundled one is 64 wide). Random weights
    (std 0.02) have tiny logits, so the bound is relative to fp32's logit spread."""
    path, _ = hf_checkpoint(n_embd=128, n_head=4, vocab_size=1000)
    ids = torch.randint(0, 1000, (2, 24))
    ref = GPT2LMHeadModel.from_pretrained(path)(ids).logits
    out = GPT2LMHeadModel.from_pretrained(path, quantize="int4", group_size=128)(ids).logits
    assert ((out - ref).norm() / ref.norm()).item() < 0.2


def test_kernels_take_the_group_sizes_the_layers_offer():
    from nanogpt2.kernels.quant_matmul import GROUP_SIZES as KERNEL_GROUP_SIZES
    from nanogpt2.quantization import GROUP_SIZES
    assert GROUP_SIZES == KERNEL_GROUP_SIZES


@pytest.mark.parametrize("mode,g", SCHEMES)
def test_residual_decomposition_and_attribution_on_a_quantized_model(hf_checkpoint, mode, g):
    """Analysis reads dequantized weights (quantization.float_weight), never the integers: each decomposition of
    a quantized model equals that of its dequantized copy (up to the CPU op's bf16 activations)."""
    path, _ = hf_checkpoint()
    ids = torch.randint(0, 101, (2, 10))
    quantized = GPT2LMHeadModel.from_pretrained(path, quantize=mode, group_size=g)
    plain = GPT2LMHeadModel.from_pretrained(path, quantize=mode, group_size=g).dequantize()
    results = []
    for model in (quantized, plain):
        _, cache = model.run_with_cache(ids)
        parts = cache.decompose_resid(pos_slice=-1)                  # (n, B, C) at the last position
        heads = cache.stack_head_results(1)
        results.append((parts, heads, cache.logit_attrs(parts, ids[:, -1], pos_slice=-1)))
    for q, p in zip(*results):
        torch.testing.assert_close(q, p, atol=0.05 * p.abs().max().item(), rtol=0.05)
    tok_embed = results[0][0][0]
    assert tok_embed.abs().max() < 5          # embeddings, not raw integers (which reach 127)


@pytest.mark.parametrize("mode,g", SCHEMES)
def test_a_few_rows_of_a_quantized_weight_dequantize_alone(hf_checkpoint, mode, g):
    """float_weight_rows (logit attribution's unembedding directions) = those rows of the whole dequantized
    matrix, for the head, the tied embedding and a float layer, whatever the rows' device and shape."""
    from nanogpt2.quantization import float_weight, float_weight_rows
    path, _ = hf_checkpoint()
    model = GPT2LMHeadModel.from_pretrained(path, quantize=mode, group_size=g)
    plain = GPT2LMHeadModel.from_pretrained(path)
    rows = torch.tensor([[3, 0], [60, 3]])
    for module in (model.lm_head, model.transformer.wte, model.transformer.wpe, plain.lm_head):
        assert torch.equal(float_weight_rows(module, rows), float_weight(module)[rows])
    assert torch.equal(model.transformer.wte(rows), float_weight(model.lm_head)[rows])   # the tie, read as rows


@pytest.mark.parametrize("mode,g", SCHEMES)
def test_compiled_decode_of_a_quantized_model_gives_the_eager_tokens(hf_checkpoint, mode, g):
    """compile=True on CPU freezes the integer weights (torch's weight-only ops, or inductor's int4 templates:
    compiled.cpu_compile_options); it must decode the eager tokens."""
    path, _ = hf_checkpoint()
    model = GPT2LMHeadModel.from_pretrained(path, quantize=mode, group_size=g)
    ids = torch.randint(0, 101, (1, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.generate(ids, max_new_tokens=10, compile=True), model.generate(ids, max_new_tokens=10))


def test_loading_hands_freed_float_buffers_back(hf_checkpoint, monkeypatch):
    """Quantize-while-loading frees each transposed Conv1D read buffer and each float weight it quantizes; the
    loader counts exactly those bytes and trims glibc's heap every TRIM_BYTES of them (weights._release_freed_heap:
    without it the gpt2-xl int8 load peaked at 0.61x the checkpoint instead of 0.29x)."""
    from nanogpt2 import weights
    path, _ = hf_checkpoint()
    plain = GPT2LMHeadModel.from_pretrained(path)
    blocks = sum(m.weight.nbytes for m in plain.transformer.h.modules() if isinstance(m, torch.nn.Linear))
    freed = 2 * blocks + plain.lm_head.weight.nbytes   # each block weight: its transposed read, then itself
    trims = []
    monkeypatch.setattr(weights, "_release_freed_heap", lambda: trims.append(1))
    for threshold, expected in ((freed, 1), (freed + 1, 0), (freed // 2 + 1, 1)):
        monkeypatch.setattr(weights, "TRIM_BYTES", threshold)
        trims.clear()
        GPT2LMHeadModel.from_pretrained(path, quantize="int8")
        assert len(trims) == expected, (threshold, freed)
