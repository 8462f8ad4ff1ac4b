"""The speed sweep through an engine: prefill and decode points, their roofline shares, out-of-memory
points, compiled mode's record, and the device's measured ceilings."""
import weakref

import pytest
import torch

from quantbench import cost, methods
from quantbench.engines import transformers as engine


def test_prompt_batch_is_real_text_without_padding():
    stream = torch.arange(100)
    b = cost.prompt_batch(stream, 3, 10)
    assert b.shape == (3, 10) and b[1, 0] == 10
    assert cost.prompt_batch(torch.arange(5), 2, 4).shape == (2, 4)  # a short stream is repeated


def _sweep(model, **kw):
    args = dict(device="cpu", pad_token_id=2, prompt_lengths=[16], decode_prompt_tokens=8, new_tokens=5, batch_sizes=[1],
                repeats=2, weight_bytes=1)
    return cost.measure_speed(engine, model, torch.arange(3, 300), **{**args, **kw})


def test_measure_speed_sweeps_prompt_lengths_and_batch_sizes(tiny_model_dir):
    model, _ = methods.METHODS["fp16"]["load"](tiny_model_dir, device="cpu")
    weights = engine.weight_bytes(model)["weight_bytes"]
    r = _sweep(model, prompt_lengths=[16, 64, 600], batch_sizes=[1, 3], repeats=3, weight_bytes=weights,
               rates={"copy_bytes_s": 1e10, "matmul_flops": 1e11})
    p16 = r["prefill"]["16"]
    assert p16["ttft_ms"] > 0 and p16["timing"]["n"] == 3 and p16["timing"]["min"] <= p16["ttft_ms"] <= p16["timing"]["max"]
    assert p16["prefill_tok_s"] == pytest.approx(16 / (p16["ttft_ms"] / 1000))
    assert 0 < p16["matmul_share"] and r["prefill"]["64"]["status"] == "ok"
    assert r["prefill"]["600"]["status"] == "skipped" and "512 positions" in r["prefill"]["600"]["reason"]
    assert set(r["decode"]) == {"eager"} and set(r["decode"]["eager"]) == {"1", "3"}
    d3 = r["decode"]["eager"]["3"]
    # K and V, 2 layers, 2 KV heads of 16, 3 sequences of 8 + 5 tokens, float32 on the CPU.
    assert d3["kv_cache_bytes"] == 2 * 2 * 2 * 16 * 3 * 13 * 4
    assert d3["bytes_per_step"] == weights + 2 * 2 * 2 * 16 * 3 * 10.5 * 4
    assert d3["achieved_bytes_s"] == pytest.approx(d3["bytes_per_step"] * d3["tok_s"] / 3)
    assert d3["bandwidth_share"] == pytest.approx(d3["achieved_bytes_s"] / 1e10)
    # one timed run of 5 tokens: its 4 steps after the first token are the samples
    assert d3["step_ms"]["n"] == 4 and d3["step_ms"]["min"] <= d3["step_ms"]["median"] <= d3["step_ms"]["p90"] <= d3["step_ms"]["max"]
    assert d3["tok_s"] == pytest.approx(3 / (d3["step_ms"]["median"] / 1000)) and d3["tok_s_mean"] > 0
    # each point's wall time includes its warm-up and timed runs: at least their 2 x 4 steps
    assert d3["point_s"] >= 2 * 4 * d3["step_ms"]["min"] / 1000 and p16["point_s"] >= 2 * p16["ttft_ms"] / 1000
    assert r["decode_runs"] == 1 and r["attention_kernels"]["eager"] == engine.EAGER_ATTENTION


def test_a_benchmark_may_time_the_eager_sweep_on_other_attention_kernels(tiny_model_dir):
    model, _ = methods.METHODS["fp16"]["load"](tiny_model_dir, device="cpu")
    r = _sweep(model, attention=["MATH"])
    assert r["attention_kernels"] == {"eager": ["MATH"], "compiled": "torch's default order"}


def test_flop_and_kv_counts_match_a_hand_count():
    shapes = {"layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 16, "element_bytes": 2}
    assert cost.attention_flops(shapes, 10) == 2 * 2 * 10 * 10 * 64
    assert cost.kv_cache_bytes(shapes, 3, 7) == 2 * 2 * 2 * 16 * 7 * 3 * 2


def test_out_of_memory_at_one_point_is_recorded_and_the_sweep_goes_on(monkeypatch):
    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    point = cost._point("cpu", oom)
    assert point["status"] == "out of memory" and point["error"] == "CUDA out of memory. Tried to allocate 2.00 GiB"
    assert point["point_s"] >= 0
    with pytest.raises(RuntimeError, match="other"):
        cost._point("cpu", lambda: (_ for _ in ()).throw(RuntimeError("other")))
    # On a GPU the failed attempt's memory is given back, once the frames that hold its tensors are
    # gone, and left out of the sweep's peak
    held, calls = [], []

    def oom_holding_a_tensor():
        kv = torch.zeros(1000)
        held.append(weakref.ref(kv))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 32.00 GiB")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(("empty_cache", held[0]() is None)))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: calls.append(("reset_peak", held[0]() is None)))
    assert cost._point("cuda", oom_holding_a_tensor)["status"] == "out of memory"
    assert calls == [("empty_cache", True), ("reset_peak", True)]


def test_device_rates_on_the_cpu_are_positive_and_described():
    r = cost.device_rates("cpu")
    assert r["copy_bytes_s"] > 1e8 and r["matmul_flops"] > 1e8 and "median" in r["method"]


def test_compiled_mode_uses_a_static_cache_and_says_whether_it_compiled(tiny_model_dir):
    """On the CPU compiled mode runs its static-cache loop uncompiled: recorded so.
    (On the GPU machine it compiles; see the gpu tests below.)"""
    model, _ = methods.METHODS["fp16"]["load"](tiny_model_dir, device="cpu")
    r = _sweep(model, new_tokens=6, batch_sizes=[2], decode_modes=("eager", "compiled"))
    point = r["decode"]["compiled"]["2"]
    assert point["status"] == "ok" and point["tok_s"] > 0 and r["decode_modes"] == ["eager", "compiled"]
    assert point["compiled"] is False and "GPUs only" in point["why_not_compiled"]
    assert r["compiled_settings"] is None and r["decode"]["eager"]["2"]["status"] == "ok"  # nothing compiled, nothing set


def test_a_compiled_mode_that_fails_is_recorded_and_the_eager_points_stand(tiny_model_dir, monkeypatch):
    model, _ = methods.METHODS["fp16"]["load"](tiny_model_dir, device="cpu")

    def step(**kwargs):
        raise RuntimeError("torch._dynamo hit an untraceable kernel")

    monkeypatch.setattr(engine, "compile_step", lambda model, device: step)
    r = _sweep(model, new_tokens=8, batch_sizes=[1, 2], decode_modes=("eager", "compiled"))
    assert r["decode"]["eager"]["1"]["status"] == "ok" and r["decode"]["eager"]["2"]["status"] == "ok"
    assert r["decode"]["compiled"]["1"] == r["decode"]["compiled"]["2"] == {
        "status": "failed", "error": "compiled decode failed at batch 1: RuntimeError: torch._dynamo hit an untraceable kernel"}


@pytest.mark.gpu
def test_compiled_mode_compiles_the_decoding_step_on_the_gpu(tiny_model_dir):
    model, _ = methods.METHODS["fp16"]["load"](tiny_model_dir, device="cuda")
    r = _sweep(model, device="cuda", new_tokens=16, batch_sizes=[1, 4], repeats=3, decode_modes=("compiled",))
    points = r["decode"]["compiled"]
    assert points["1"]["compiled"] is True and points["1"]["tok_s"] > 0 and points["4"]["tok_s"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_compiled_mode_compiles_a_bitsandbytes_model_or_says_why(tiny_model_dir, method):
    model, _ = methods.METHODS[method]["load"](tiny_model_dir, device="cuda")
    r = _sweep(model, device="cuda", new_tokens=16, repeats=3, decode_modes=("compiled",))
    point = r["decode"]["compiled"]["1"]
    assert (point["status"] == "ok" and point["compiled"] is True and "would not compile" in point["note"]) or \
        (point["status"] == "failed" and point["error"].startswith("compiled decode failed")), point
    if method == "int8" and point["status"] == "ok":  # LLM.int8's outlier split breaks the graph, on the CPU too
        assert point["graph_breaks"] > 0 and "bitsandbytes" in point["graph_break_reasons"][0], point
