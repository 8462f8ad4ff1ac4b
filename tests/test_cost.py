import statistics
import time
import weakref

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


def test_measure_speed_sweeps_prompt_lengths_and_batch_sizes(tiny_model_dir):
    model, _ = methods.METHODS["fp16"]["load"](tiny_model_dir, device="cpu")
    rates = {"copy_bytes_s": 1e10, "matmul_flops": 1e11}
    weights = cost.weight_bytes(model)["weight_bytes"]
    r = cost.measure_speed(model, torch.arange(3, 300), device="cpu", pad_token_id=2, prompt_lengths=[16, 64, 600],
                           decode_prompt_tokens=8, new_tokens=5, batch_sizes=[1, 3], repeats=3,
                           weight_bytes=weights, rates=rates)
    p16 = r["prefill"]["16"]
    assert p16["ttft_ms"] > 0 and p16["timing"]["n"] == 3 and p16["timing"]["min"] <= p16["ttft_ms"] <= p16["timing"]["max"]
    assert p16["prefill_tok_s"] == pytest.approx(16 / (p16["ttft_ms"] / 1000))
    assert 0 < p16["matmul_share"] and r["prefill"]["64"]["status"] == "ok"
    assert r["prefill"]["600"]["status"] == "skipped" and "512 positions" in r["prefill"]["600"]["reason"]
    assert r["ttft_ms"] == p16["ttft_ms"] and r["ttft_prompt_tokens"] == 16
    assert set(r["decode_tok_s"]) == {"1", "3"} and all(v > 0 for v in r["decode_tok_s"].values())
    d3 = r["decode"]["3"]
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
    assert r["decode_runs"] == 1 and r["attention_kernels"]["eager"] == cost.EAGER_ATTENTION


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_the_step_clock_measures_a_known_step_time(tiny_model_dir, mode, monkeypatch):
    """Every forward made 30 ms slower: each decode step must read at least 30 ms and little more
    (the tiny model's own forward takes about a millisecond on the CPU), and there is one step per
    token after the first, per timed run."""
    model, _ = methods.METHODS["fp16"]["load"](tiny_model_dir, device="cpu")
    forward = model.forward

    def slow(*args, **kwargs):
        time.sleep(0.03)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", slow)
    ids = torch.arange(3, 19).view(2, 8)
    extra = {"mode": "compiled", "step": model, "cache": cost.static_cache(model, 8 + 6)} if mode == "compiled" else {}
    with torch.no_grad():
        steps = cost._time_steps(model, ids, 6, runs=2, pad_token_id=2, **extra)
    assert len(steps) == 2 * 5
    assert 0.03 <= statistics.median(steps) < 0.06, steps


def test_the_eager_sweep_runs_on_the_attention_kernels_it_records(tiny_model_dir, monkeypatch):
    model, _ = methods.METHODS["fp16"]["load"](tiny_model_dir, device="cpu")
    entered = []
    real = cost.only_attention
    monkeypatch.setattr(cost, "only_attention", lambda kernels: entered.append(kernels) or real(kernels))
    r = cost.measure_speed(model, torch.arange(3, 300), device="cpu", pad_token_id=2, prompt_lengths=[16],
                           decode_prompt_tokens=8, new_tokens=4, batch_sizes=[1], repeats=1, weight_bytes=1,
                           eager_attention=["MATH"])
    assert entered == [["MATH"], ["MATH"]]  # the TTFT point and the decode point
    assert r["attention_kernels"] == {"eager": ["MATH"], "compiled": "torch's default order"}


def test_flop_and_kv_counts_match_a_hand_count(tiny_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)  # hidden 64, MLP 128, 2 layers, 4 heads, 2 KV heads, vocab 400
    per_layer = 64 * 64 + 2 * (64 * 32) + 64 * 64 + 3 * 64 * 128  # q, k and v (2 KV heads of 16), o, gate/up/down
    assert cost.matmul_flops_per_token(config) == 2 * (2 * per_layer + 64 * config.vocab_size)
    assert cost.attention_flops(config, 10) == 2 * 2 * 10 * 10 * 64


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


def test_peak_bytes_on_cpu_is_the_process_rss():
    p = cost.peak_bytes("cpu")
    assert p["peak_bytes"] > 10 * 2**20 and "RSS" in p["peak_kind"]


@pytest.mark.gpu
def test_peak_bytes_on_gpu_counts_an_allocation():
    cost.reset_peak("cuda")
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    assert cost.peak_bytes("cuda")["peak_bytes"] >= x.numel()


def test_compiled_mode_uses_a_static_cache_and_says_whether_it_compiled(tiny_model_dir):
    """On the CPU compiled mode runs its static-cache loop uncompiled: recorded so.
    (On the GPU machine it compiles; see the gpu tests below.)"""
    model, _ = methods.METHODS["fp16"]["load"](tiny_model_dir, device="cpu")
    r = cost.measure_speed(model, torch.arange(3, 300), device="cpu", pad_token_id=2, prompt_lengths=[16],
                           decode_prompt_tokens=8, new_tokens=6, batch_sizes=[2], repeats=2,
                           weight_bytes=1, decode_modes=("eager", "compiled"))
    point = r["decode_compiled"]["2"]
    assert point["status"] == "ok" and point["tok_s"] > 0 and r["decode_modes"] == ["eager", "compiled"]
    assert point["compiled"] is False and "GPUs only" in point["why_not_compiled"]
    assert r["compiled_settings"] is None  # nothing compiled, nothing set
    assert r["decode_tok_s"]["2"] == r["decode"]["2"]["tok_s"]  # the summary's columns stay eager


def test_graph_breaks_name_llm_int8s_data_dependent_split(tiny_model_dir):
    """bitsandbytes' LLM.int8 (on the CPU, as bitsandbytes 0.50 runs it) traced by torch.compile:
    its outlier split has a data-dependent shape, so dynamo breaks the graph and counts why; an
    fp16 model compiles whole. (Traced with dynamo's eager backend: the breaks are dynamo's, the
    backend is not involved.)"""
    pytest.importorskip("bitsandbytes")
    from collections import Counter

    ids = torch.arange(3, 11).view(1, 8)
    found = {}
    for method in ["fp16", "int8"]:
        model, _ = methods.METHODS[method]["load"](tiny_model_dir, device="cpu")
        torch._dynamo.reset()
        before = cost.graph_breaks()
        with torch.no_grad():
            torch.compile(model, backend="eager", dynamic=False)(input_ids=ids)
        found[method] = cost.graph_breaks(since=before)
    assert found["fp16"] == Counter()
    state = cost._compiled_state(model, "cuda", found["int8"])  # what a compiled point records
    assert state["graph_breaks"] == sum(found["int8"].values()) > 0
    assert "bitsandbytes" in state["graph_break_reasons"][0] and "depends on input Tensor data" in state["graph_break_reasons"][0]
    assert "would not compile" in state["note"]


def test_forced_logits_are_the_logits_of_a_full_forward_over_the_fed_tokens(tiny_model_dir):
    """Teacher forcing through the static cache gives, at each step, the last position's logits of
    one plain forward over the prompt and the tokens fed so far (an independent computation)."""
    model, _ = methods.METHODS["fp16"]["load"](tiny_model_dir, device="cpu")
    ids, tokens = torch.arange(3, 15).view(1, 12), torch.tensor([[40, 41, 42, 43, 44]])
    with torch.no_grad():
        got = cost.forced_logits(model, ids, tokens, step=model, cache=cost.static_cache(model, 20))
        want = [model(torch.cat([ids, tokens[:, :i + 1]], dim=1)).logits[:, -1].float() for i in range(4)]
    assert got.shape == (4, 1, model.config.vocab_size)
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["fp16", "nf4"])
def test_the_static_cache_loop_decodes_the_same_tokens_as_generate(tiny_model_dir, method):
    if method == "nf4":
        pytest.importorskip("bitsandbytes")
    model, _ = methods.METHODS[method]["load"](tiny_model_dir, device="cpu")
    ids = torch.arange(3, 27).view(2, 12)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=9, min_new_tokens=9,
                              do_sample=False, pad_token_id=2)[:, 12:]
        cache = cost.static_cache(model, 12 + 9)
        for _ in range(2):  # the cache is reused: a second run starts from a clean one
            got = cost.greedy_static(model, ids, 9, step=model, cache=cache)
            assert torch.equal(got, want)


@pytest.mark.gpu
def test_compiled_mode_compiles_the_decoding_step_on_the_gpu(tiny_model_dir):
    model, _ = methods.METHODS["fp16"]["load"](tiny_model_dir, device="cuda")
    r = cost.measure_speed(model, torch.arange(3, 300), device="cuda", pad_token_id=2, prompt_lengths=[16],
                           decode_prompt_tokens=8, new_tokens=16, batch_sizes=[1, 4], repeats=3,
                           weight_bytes=1, decode_modes=("compiled",))
    assert r["decode_compiled"]["1"]["compiled"] is True and r["decode_tok_s"]["1"] > 0 and r["decode_tok_s"]["4"] > 0


@pytest.mark.gpu
def test_the_compiled_loop_decodes_the_same_tokens_as_generate_on_the_gpu(tiny_model_dir):
    """In float32, so that fused kernels cannot flip an argmax of the random model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda().eval()
    ids = torch.arange(3, 27, device="cuda").view(2, 12)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20,
                              do_sample=False, pad_token_id=2)[:, 12:]
        step, cache = cost.compiled_step(model, "cuda"), cost.static_cache(model, 32)
        for _ in range(3):  # compilation, CUDA graph capture, replay
            assert torch.equal(cost.greedy_static(model, ids, 20, step=step, cache=cache), want)


@pytest.mark.gpu
def test_the_compiled_step_computes_the_eager_logits_on_llama_3_2_1b_shapes():
    """Llama-3.2-1B's shapes (two of its layers, random weights) in float32: every step's logits of
    the compiled step (tuned kernels and, on Hopper, programmatic dependent launch, under which a
    kernel that read before its predecessor's results were written would show) against the eager
    model's, the same tokens fed. float32, so that a summation order cannot move a logit by more
    than a rounding error."""
    from transformers import AutoModelForCausalLM

    from quantbench import models

    config = models.arch_config("llama-3.2-1b")
    config.num_hidden_layers = 2
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ids = torch.randint(0, config.vocab_size, (1, 16), device="cuda")
    cache = cost.static_cache(model, 16 + 24)
    with torch.no_grad():
        tokens = cost.greedy_static(model, ids, 24, step=model, cache=cache)
        want = cost.forced_logits(model, ids, tokens, step=model, cache=cache)
        step = cost.compiled_step(model, "cuda")
        for _ in range(3):  # compilation, CUDA graph capture, replay
            got = cost.forced_logits(model, ids, tokens, step=step, cache=cache)
            assert (got - want).abs().max() <= 1e-4 * want.abs().max(), (got - want).abs().max()
    settings = cost.compiled_settings("cuda")
    assert settings["programmatic_dependent_launch"] == (torch.cuda.get_device_capability()[0] >= 9)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_compiled_mode_compiles_a_bitsandbytes_model_or_says_why(tiny_model_dir, method):
    model, _ = methods.METHODS[method]["load"](tiny_model_dir, device="cuda")
    r = cost.measure_speed(model, torch.arange(3, 300), device="cuda", pad_token_id=2, prompt_lengths=[16],
                           decode_prompt_tokens=8, new_tokens=16, batch_sizes=[1], repeats=3,
                           weight_bytes=1, decode_modes=("compiled",))
    point = r["decode_compiled"]["1"]
    assert (point["status"] == "ok" and point["compiled"] is True and "would not compile" in point["note"]) or \
        (point["status"] == "failed" and point["error"].startswith("compiled decode failed")), point
    if method == "int8" and point["status"] == "ok":  # LLM.int8's outlier split breaks the graph, on the CPU too
        assert point["graph_breaks"] > 0 and "bitsandbytes" in point["graph_break_reasons"][0], point


def test_a_compiled_mode_that_fails_is_recorded_and_the_eager_points_stand(tiny_model_dir, monkeypatch):
    model, _ = methods.METHODS["fp16"]["load"](tiny_model_dir, device="cpu")

    def step(**kwargs):
        raise RuntimeError("torch._dynamo hit an untraceable kernel")

    monkeypatch.setattr(cost, "compiled_step", lambda model, device: step)
    r = cost.measure_speed(model, torch.arange(3, 300), device="cpu", pad_token_id=2, prompt_lengths=[16],
                           decode_prompt_tokens=8, new_tokens=8, batch_sizes=[1, 2], repeats=2,
                           weight_bytes=1, decode_modes=("eager", "compiled"))
    assert r["decode"]["1"]["status"] == "ok" and r["decode"]["2"]["status"] == "ok"
    assert r["decode_compiled"]["1"] == r["decode_compiled"]["2"] == {
        "status": "failed", "error": "compiled decode failed at batch 1: RuntimeError: torch._dynamo hit an untraceable kernel"}
