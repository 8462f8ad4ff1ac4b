import pytest
import torch

from quantbench import cost, methods


def test_weight_bytes_of_a_float_model_is_its_footprint(tiny_model_dir):
    model, _ = methods.METHODS["fp16"]["load"](tiny_model_dir, device="cpu")
    w = cost.weight_bytes(model)
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert w["weight_bytes"] == params * 4 + buffers == w["memory_footprint_bytes"]
    assert w["quant_state_bytes"] == 0


def test_weight_bytes_counts_bitsandbytes_scales(tiny_model_dir):
    model, _ = methods.METHODS["nf4"]["load"](tiny_model_dir, device="cpu")
    w = cost.weight_bytes(model)
    assert w["quant_state_bytes"] > 0
    assert w["weight_bytes"] == w["memory_footprint_bytes"] + w["quant_state_bytes"]
    # Independent count of one layer: 4-bit weights, one absmax per 64 weights (8-bit with double quant).
    layer = model.model.layers[0].mlp.up_proj.weight
    assert layer.numel() == 64 * 128 // 2
    assert layer.quant_state.absmax.numel() == 64 * 128 // 64
    fp = cost.weight_bytes(methods.METHODS["fp16"]["load"](tiny_model_dir, device="cpu")[0])
    assert w["weight_bytes"] < fp["weight_bytes"]


def test_prompt_batch_is_real_text_without_padding():
    stream = torch.arange(100)
    b = cost.prompt_batch(stream, 3, 10)
    assert b.shape == (3, 10) and b[1, 0] == 10
    assert cost.prompt_batch(torch.arange(5), 2, 4).shape == (2, 4)  # a short stream is repeated


def test_measure_speed_reports_medians_and_spread(tiny_model_dir):
    model, _ = methods.METHODS["fp16"]["load"](tiny_model_dir, device="cpu")
    r = cost.measure_speed(model, torch.arange(3, 300), device="cpu", pad_token_id=2, prompt_tokens=16,
                           decode_prompt_tokens=8, new_tokens=5, batch_sizes=[1, 3], repeats=3)
    assert r["ttft_ms"] > 0 and r["timing"]["ttft_ms"]["n"] == 3
    assert r["timing"]["ttft_ms"]["min"] <= r["ttft_ms"] <= r["timing"]["ttft_ms"]["max"]
    assert set(r["decode_tok_s"]) == {"1", "3"} and all(v > 0 for v in r["decode_tok_s"].values())


def test_peak_bytes_on_cpu_is_the_process_rss():
    p = cost.peak_bytes("cpu")
    assert p["peak_bytes"] > 10 * 2**20 and "RSS" in p["peak_kind"]


@pytest.mark.gpu
def test_peak_bytes_on_gpu_counts_an_allocation():
    cost.reset_peak("cuda")
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    assert cost.peak_bytes("cuda")["peak_bytes"] >= x.numel()
