import importlib.util

import pytest
import torch

from quantbench import methods


def test_original_names_resolve():
    assert methods.resolve_method_name("fp16_baseline") == "fp16"
    assert methods.resolve_method_name("bnb_4bit_nf4") == "nf4"
    assert methods.resolve_method_name("bnb_4bit_fp4") == "fp4"
    assert methods.resolve_method_name("bnb_8bit") == "int8"
    assert methods.resolve_method_name("nf4-nodq") == "nf4-nodq"


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError) as e:
        methods.resolve_method_name("gptq-w5")
    assert "unknown method 'gptq-w5'" in str(e.value) and "nf4" in str(e.value) and "bnb_8bit" in str(e.value)


def test_every_method_has_its_table_fields_and_settings():
    for name, m in methods.METHODS.items():
        assert callable(m["load"]) and m["family"] and m["bits"] in (4, 8, 16), name
        assert isinstance(methods.method_settings(name), dict)
    assert methods.method_settings("nf4") == {"quant_type": "nf4", "double_quant": True, "compute_dtype": "float16"}
    assert methods.method_settings("nf4-nodq")["double_quant"] is False


def test_missing_library_is_reported_with_the_fix(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    reason, fix = methods.why_not_runnable("nf4", "cpu")
    assert "bitsandbytes" in reason and fix == "pip install 'quantbench[bnb]'"
    with pytest.raises(methods.MissingLibrary, match=r"quantbench\[bnb\]"):
        methods.load_bnb_4bit("/nonexistent", device="cpu")
    assert methods.why_not_runnable("fp16", "cpu") is None


def test_gpu_only_method_is_not_runnable_on_cpu(monkeypatch):
    monkeypatch.setitem(methods.METHODS, "gpu-thing", {**methods.METHODS["fp16"], "gpu": True})
    reason, fix = methods.why_not_runnable("gpu-thing", "cpu")
    assert "CUDA GPU" in reason


def test_fp16_on_cpu_runs_in_float32_and_says_so(tiny_model_dir):
    model, info = methods.METHODS["fp16"]["load"](tiny_model_dir, device="cpu")
    assert next(model.parameters()).dtype == torch.float32
    assert info["weight_dtype"] == "float32" and "float32" in info["note"]


def test_nf4_is_really_stored_in_4_bits(tiny_model_dir):
    import bitsandbytes as bnb

    model, info = methods.METHODS["nf4"]["load"](tiny_model_dir, device="cpu")
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    w = layer.weight
    assert w.dtype == torch.uint8 and w.numel() * 2 == 64 * 128  # two 4-bit values per byte
    assert w.quant_state.quant_type == "nf4" and w.quant_state.nested  # double quant on
    assert info["library"] == "bitsandbytes" and "Linear4bit" in info["linear_classes"]


def test_fp4_without_double_quant_and_bf16_compute(tiny_model_dir):
    model, info = methods.load_bnb_4bit(tiny_model_dir, device="cpu", quant_type="fp4", double_quant=False,
                                        compute_dtype="bfloat16")
    qs = model.model.layers[0].self_attn.q_proj.weight.quant_state
    assert qs.quant_type == "fp4" and not qs.nested
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == torch.bfloat16
    assert info["compute_dtype"] == "bfloat16" and info["double_quant"] is False


def test_int8_is_really_stored_in_8_bits(tiny_model_dir):
    import bitsandbytes as bnb

    model, info = methods.METHODS["int8"]["load"](tiny_model_dir, device="cpu")
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt)
    assert layer.weight.dtype == torch.int8 and layer.weight.SCB is not None
    ids = torch.tensor([[1, 5, 9, 20]])
    assert torch.isfinite(model(ids).logits).all()
