"""The transformers engine: memory, the step clock, attention kernels, shapes, the static-cache and
compiled decoding loops (their GPU tests run on the GPU machine), and the logits checks."""
import statistics
import time

import pytest
import torch

from quantbench import methods
from quantbench.engines import transformers as engine


def test_load_gives_the_model_its_tokenizer_and_what_ran(tiny_model_dir):
    model, tokenizer, info = engine.load("nf4", tiny_model_dir, model_path=tiny_model_dir, device="cpu", settings={})
    assert info["engine"] == "transformers" and info["library"] == "bitsandbytes" and info["device"] == "cpu"
    assert tokenizer.pad_token_id is not None and not model.training


def test_weight_bytes_of_a_float_model_is_its_footprint(tiny_model_dir):
    model, _ = methods.METHODS["fp16"]["load"](tiny_model_dir, device="cpu")
    w = engine.weight_bytes(model)
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert w["weight_bytes"] == params * 4 + buffers == w["memory_footprint_bytes"]
    assert w["quant_state_bytes"] == 0


def test_weight_bytes_counts_bitsandbytes_scales(tiny_model_dir):
    model, _ = methods.METHODS["nf4"]["load"](tiny_model_dir, device="cpu")
    w = engine.weight_bytes(model)
    assert w["quant_state_bytes"] > 0
    assert w["weight_bytes"] == w["memory_footprint_bytes"] + w["quant_state_bytes"]
    # Independent count of one layer: 4-bit weights, one absmax per 64 weights (8-bit with double quant).
    layer = model.model.layers[0].mlp.up_proj.weight
    assert layer.numel() == 64 * 128 // 2
    assert layer.quant_state.absmax.numel() == 64 * 128 // 64
    fp = engine.weight_bytes(methods.METHODS["fp16"]["load"](tiny_model_dir, device="cpu")[0])
    assert w["weight_bytes"] < fp["weight_bytes"]


def test_shapes_match_a_hand_count(tiny_model_dir):
    model, _ = methods.METHODS["fp16"]["load"](tiny_model_dir, device="cpu")  # hidden 64, MLP 128, 2 layers, vocab 400
    per_layer = 64 * 64 + 2 * (64 * 32) + 64 * 64 + 3 * 64 * 128  # q, k and v (2 KV heads of 16), o, gate/up/down
    s = engine.shapes(model)
    assert s["linear_flops_per_token"] == 2 * (2 * per_layer + 64 * model.config.vocab_size)
    assert (s["layers"], s["heads"], s["kv_heads"], s["head_dim"], s["positions"], s["element_bytes"]) == (2, 4, 2, 16, 512, 4)


def test_logprobs_are_the_log_softmax_of_the_next_token_logits(tiny_model_dir):
    model, _ = methods.METHODS["fp16"]["load"](tiny_model_dir, device="cpu")
    windows = torch.arange(3, 43).view(4, 10)
    got = list(engine.logprobs(model, windows, first=4, batch_size=3))
    assert [g.shape for g in got] == [(3, 5, 400), (1, 5, 400)]
    with torch.no_grad():
        want = torch.log_softmax(model(windows).logits[:, 4:-1].double(), dim=-1)
    torch.testing.assert_close(torch.cat(got).double(), want, rtol=1e-5, atol=1e-5)


def _record_attention(monkeypatch):
    """The attention kernels each `only_attention` of the engine is entered with, in order."""
    entered, real = [], engine.only_attention
    monkeypatch.setattr(engine, "only_attention", lambda kernels: entered.append(kernels) or real(kernels))
    return entered


def test_forwards_count_non_finite_logits_and_restrict_attention_for_varying_shapes(tiny_model_dir, monkeypatch):
    model, _ = methods.METHODS["fp16"]["load"](tiny_model_dir, device="cpu")
    entered = _record_attention(monkeypatch)
    ids = torch.arange(3, 19).view(2, 8)
    with engine.forwards(model, varying_shapes=True) as seen, torch.no_grad():
        model(ids)
    assert seen == {"positions": 16, "nonfinite": 0} and entered == [engine.EAGER_ATTENTION]
    with torch.no_grad():
        model.lm_head.weight[5] = float("nan")  # token 5's logit NaN at every position
        with engine.forwards(model) as seen:
            model(ids)
    assert seen == {"positions": 16, "nonfinite": 16} and entered[-1] is None


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
    steps = engine.time_decode(model, ids, 6, mode=mode, runs=2, pad_token_id=2, step=model if mode == "compiled" else None)
    assert len(steps) == 2 * 5
    assert 0.03 <= statistics.median(steps) < 0.06, steps


def test_eager_timing_runs_on_the_attention_kernels_asked_for(tiny_model_dir, monkeypatch):
    model, _ = methods.METHODS["fp16"]["load"](tiny_model_dir, device="cpu")
    entered = _record_attention(monkeypatch)
    ids = torch.arange(3, 11).view(1, 8)
    assert len(engine.time_prefill(model, ids, repeats=2, pad_token_id=2)) == 2
    engine.time_decode(model, ids, 4, mode="eager", runs=1, pad_token_id=2, attention=["MATH"])
    assert entered == [engine.EAGER_ATTENTION, ["MATH"], ["MATH"]]  # prefill once; decode: warm-up and timed run


def test_peak_bytes_on_cpu_is_the_process_rss():
    p = engine.peak_bytes("cpu")
    assert p["peak_bytes"] > 10 * 2**20 and "RSS" in p["peak_kind"]


@pytest.mark.gpu
def test_peak_bytes_on_gpu_counts_an_allocation():
    engine.reset_peak("cuda")
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    assert engine.peak_bytes("cuda")["peak_bytes"] >= x.numel()


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
        before = engine.graph_breaks()
        with torch.no_grad():
            torch.compile(model, backend="eager", dynamic=False)(input_ids=ids)
        found[method] = engine.graph_breaks(since=before)
    assert found["fp16"] == Counter()
    state = engine.compiled_state(model, "cuda", found["int8"])  # what a compiled point records
    assert state["graph_breaks"] == sum(found["int8"].values()) > 0
    assert "bitsandbytes" in state["graph_break_reasons"][0] and "depends on input Tensor data" in state["graph_break_reasons"][0]
    assert "would not compile" in state["note"]


def test_forced_logits_are_the_logits_of_a_full_forward_over_the_fed_tokens(tiny_model_dir):
    """Teacher forcing through the static cache gives, at each step, the last position's logits of
    one plain forward over the prompt and the tokens fed so far (an independent computation)."""
    model, _ = methods.METHODS["fp16"]["load"](tiny_model_dir, device="cpu")
    ids, tokens = torch.arange(3, 15).view(1, 12), torch.tensor([[40, 41, 42, 43, 44]])
    with torch.no_grad():
        got = engine.forced_logits(model, ids, tokens, step=model, cache=engine.static_cache(model, 20))
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
        cache = engine.static_cache(model, 12 + 9)
        for _ in range(2):  # the cache is reused: a second run starts from a clean one
            got = engine.greedy_static(model, ids, 9, step=model, cache=cache)
            assert torch.equal(got, want)


@pytest.mark.gpu
def test_the_compiled_loop_decodes_the_same_tokens_as_generate_on_the_gpu(tiny_model_dir):
    """In float32, so that fused kernels cannot flip an argmax of the random model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda().eval()
    ids = torch.arange(3, 27, device="cuda").view(2, 12)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20,
                              do_sample=False, pad_token_id=2)[:, 12:]
        step, cache = engine.compile_step(model, "cuda"), engine.static_cache(model, 32)
        for _ in range(3):  # compilation, CUDA graph capture, replay
            assert torch.equal(engine.greedy_static(model, ids, 20, step=step, cache=cache), want)


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
    cache = engine.static_cache(model, 16 + 24)
    with torch.no_grad():
        tokens = engine.greedy_static(model, ids, 24, step=model, cache=cache)
        want = engine.forced_logits(model, ids, tokens, step=model, cache=cache)
        step = engine.compile_step(model, "cuda")
        for _ in range(3):  # compilation, CUDA graph capture, replay
            got = engine.forced_logits(model, ids, tokens, step=step, cache=cache)
            assert (got - want).abs().max() <= 1e-4 * want.abs().max(), (got - want).abs().max()
    settings = engine.compiled_settings("cuda")
    assert settings["programmatic_dependent_launch"] == (torch.cuda.get_device_capability()[0] >= 9)


@pytest.mark.parametrize("backend, library, bits", [("hqq", "hqq", (8, 4, 2)), ("quanto", "optimum-quanto", (4, 2))])
def test_a_quantized_kv_cache_scores_each_token_as_a_decode_step_after_a_prefill(tiny_model_dir, backend, library, bits):
    """logprobs through transformers' quantized cache (HQQ's or optimum-quanto's): the first half of each
    window a prefill, then one token a step, each reading its past back from the cache. At 8 bits it gives
    the plain forward's log-probabilities within the cache's rounding; fewer bits diverge more."""
    pytest.importorskip(library.replace("-", "."))
    from quantbench.methods import load_float

    model, _ = load_float(str(tiny_model_dir), device="cpu", dtype="float32")
    windows = torch.randint(3, 300, (3, 48), generator=torch.Generator().manual_seed(0))
    plain = torch.cat(list(engine.logprobs(model, windows, first=24, batch_size=2)))
    kld = {}
    for nbits in bits:
        info = engine.use_quantized_cache(model, nbits=nbits, backend=backend)
        stepped = torch.cat(list(engine.logprobs(model, windows, first=24, batch_size=2)))
        assert stepped.shape == plain.shape == (3, 23, model.config.vocab_size)
        kld[nbits] = float((plain.exp() * (plain - stepped)).sum(-1).mean())
    assert info["library"] == library and info["residual_length"] == 128
    assert (stepped - plain).abs().max() > 0 and all(kld[a] < kld[b] for a, b in zip(bits, bits[1:]))
    assert kld.get(8, 0) < 1e-4 and 0 < kld[4] < 1e-3, kld
    model.generation_config.cache_implementation = None
    assert torch.equal(torch.cat(list(engine.logprobs(model, windows, first=24, batch_size=2))), plain)
