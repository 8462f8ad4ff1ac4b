"""Cost of a loaded model: weight memory, peak memory, time to first token, decode throughput.

Timing protocol: greedy generation with `min_new_tokens == max_new_tokens` so every run produces
the same number of tokens; one warm-up run before each measurement, the GPU synchronized before
every clock read.
- TTFT at prompt length P, batch 1: the time of `generate(max_new_tokens=1)`: prefill plus the
  first token, what a user waits before the first token appears. Median of `repeats` runs, with
  min and max.
- Decode tokens/s at batch B: with a prompt of `decode_prompt_tokens`, one warm-up run of N new
  tokens (every shape, kernel plan and CUDA graph of the timed runs met once), then `decode_runs`
  timed runs in which every token is stamped as it is produced (a CUDA event on the GPU, the
  clock on the CPU); each of the N - 1 steps after the first token is one sample, the prefill is
  excluded, and decode rate = B / (median step time), with the mean-based rate beside it.
  Eager runs use the attention kernels of EAGER_ATTENTION (cuDNN's excluded: see there).

    >>> weight_bytes(model)
    {'weight_bytes': 109777792, 'memory_footprint_bytes': 109777792, 'quant_state_bytes': 2965504}
"""
import contextlib
import gc
import resource
import statistics
import sys
import time

import torch

# Attention kernels of every eager forward quantbench times or evaluates with (torch's SDPBackend
# names): lm-eval's batches, the sanity generation and the eager speed sweep. On Hopper torch tries
# cuDNN's attention first, and cuDNN builds an execution plan for every new shape; eager decoding
# (a KV cache one token longer each step) has a new shape every step. On an H200 (2026-11-27) a
# lm-eval step with an unseen shape cost 3x one with a seen shape, and the default eager sweep of
# arch:smollm2-135m took 19.4-19.6 s with cuDNN allowed against 11.0-11.5 s without, at the same
# tokens/s within run-to-run spread. Flash and memory-efficient attention need no plan. Compiled
# mode keeps torch's order (its shapes are static: one plan). None: torch's own order.
EAGER_ATTENTION = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"]


def only_attention(kernels):
    """A context in which SDPA uses only `kernels` (torch's SDPBackend names); None: torch's own order."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, k) for k in kernels]) if kernels else contextlib.nullcontext()


def weight_bytes(model):
    """Bytes of the weights as stored. Counts parameters and buffers; for tensor subclasses
    (torchao's quantized tensors) the inner tensors they are made of; and the quantization state
    that hangs off a weight or layer as attributes, which `get_memory_footprint` does not count:
    bitsandbytes' absmax scales and codebooks or LLM.int8's row scales, HQQ's scales and zeros.
    Shared tensors count once."""
    seen = set()

    def size(t):
        if not isinstance(t, torch.Tensor):
            return 0
        if hasattr(t, "__tensor_flatten__"):  # a quantized tensor subclass: count what it holds
            names = t.__tensor_flatten__()[0]
            return sum(size(getattr(t, n)) for n in names)
        if t.data_ptr() in seen:
            return 0
        seen.add(t.data_ptr())
        return t.numel() * t.element_size()

    stored = sum(size(p) for p in model.parameters()) + sum(size(b) for b in model.buffers())
    quant_state = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        while qs is not None:  # double quant nests a second state for the scales
            quant_state += size(qs.absmax) + size(qs.code) + size(getattr(qs, "offset", None))
            qs = getattr(qs, "state2", None)
        quant_state += size(getattr(p, "SCB", None))
    for module in model.modules():
        meta = getattr(module, "meta", None)  # HQQLinear keeps scale and zero here
        if isinstance(meta, dict):
            quant_state += sum(size(v) for v in meta.values())
    return {"weight_bytes": stored + quant_state, "memory_footprint_bytes": model.get_memory_footprint(),
            "quant_state_bytes": quant_state}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    """Start a new peak. Garbage is collected first, so that tensors a loader left in reference
    cycles (freed whenever Python's collector next runs) do not count as the next phase's memory."""
    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def resident_bytes(device):
    """Device memory held by live tensors now, after a garbage collection (CUDA only; None on the
    CPU, where the process's memory cannot be split into tensors and the rest)."""
    gc.collect()
    return torch.cuda.memory_allocated() if device == "cuda" else None


def peak_bytes(device):
    """Peak memory on the device so far: CUDA's allocator peak on a GPU, the process's maximum
    resident set size on the CPU (which includes the Python interpreter and libraries)."""
    if device == "cuda":
        return {"peak_bytes": torch.cuda.max_memory_allocated(),
                "peak_reserved_bytes": torch.cuda.max_memory_reserved(), "peak_kind": "cuda max_memory_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss *= 1 if sys.platform == "darwin" else 1024  # Linux reports KiB
    return {"peak_bytes": rss, "peak_kind": "process max RSS (CPU)"}


# The two decode modes. eager: plain `generate`, what a user gets by default. compiled: what the
# hardware allows: greedy decoding with a static KV cache, the prefill eager and then one
# torch.compile'd forward per token (mode "reduce-overhead": CUDA graphs), the next token picked on
# the GPU, with no per-step host synchronisation, logits processors or stopping checks (the Python
# work that `generate` does between steps and that dominates a small model's step).


def greedy_static(model, input_ids, new_tokens, *, step, cache, marks=None):
    """Greedy decoding of `new_tokens` with the static KV cache `cache` (reset first): prefill eager,
    then `step` (the model, compiled or not) once per further token. Returns the new tokens; with
    `marks` (a list), appends a `mark` as each token is produced."""
    cache.reset()
    logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    token = logits[:, -1:].argmax(-1)
    out = [token]
    if marks is not None:
        marks.append(mark(input_ids.device.type))
    for _ in range(new_tokens - 1):  # positions come from the cache's own counter (a tensor: no recompiles)
        if input_ids.is_cuda:
            torch.compiler.cudagraph_mark_step_begin()
        token = step(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        out.append(token)
        if marks is not None:
            marks.append(mark(input_ids.device.type))
    return torch.cat(out, dim=1)


def forced_logits(model, input_ids, tokens, *, step, cache):
    """The logits of each decode step when `tokens` [batch, n] are fed in turn after the eager prefill
    of `input_ids` (teacher forcing): [n - 1, batch, vocab] in float32. With the same `tokens`, the
    compiled step's logits can be compared with the eager model's step by step, where greedy tokens
    would part at the first near tie and compare nothing after it."""
    cache.reset()
    model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    out = []
    for i in range(tokens.shape[1] - 1):
        if input_ids.is_cuda:
            torch.compiler.cudagraph_mark_step_begin()
        logits = step(input_ids=tokens[:, i:i + 1], past_key_values=cache, use_cache=True).logits[:, -1]
        out.append(logits.to(torch.float32, copy=True))  # a copy: the next graph replay overwrites its output
    return torch.stack(out)


def compiled_settings(device):
    """What compiled mode sets on a GPU (recorded in each result; None on the CPU, where the step is
    not compiled):
    - torch.compile mode "reduce-overhead" (CUDA graphs), static shapes;
    - inductor's coordinate-descent tuning of its kernels (gpt-fast's setting; with it inductor also
      turns a batch-1 matrix product into a reduction it can fuse and tune). On an H200,
      Llama-3.2-1B's shapes in float16 at batch 1: 1.51 -> 1.21 ms a step;
    - on Hopper and later (compute capability 9+), programmatic dependent launch: each Triton kernel
      may start, and read what does not depend on the kernel before it (the weights), while that
      kernel finishes, and waits for its results before reading them. On an H100 on 2026-11-27,
      Llama-3.2-1B float16 at batch 1: 1.315 -> 1.224 ms a step (benchmarks/decode_profile.py)."""
    if device != "cuda":
        return None
    return {"mode": "reduce-overhead", "dynamic": False, "coordinate_descent_tuning": True,
            "programmatic_dependent_launch": torch.cuda.get_device_capability()[0] >= 9}


def compiled_step(model, device):
    """The decoding step of compiled mode: on a GPU the model compiled with `compiled_settings`; on
    the CPU the model itself (recorded as not compiled). Each experiment is its own process, so the
    inductor settings stay within it."""
    settings = compiled_settings(device)
    if settings is None:
        return model
    from torch._inductor import config as inductor

    inductor.coordinate_descent_tuning = settings["coordinate_descent_tuning"]
    inductor.triton.enable_pdl = settings["programmatic_dependent_launch"]
    return torch.compile(model, mode=settings["mode"], dynamic=settings["dynamic"])


def static_cache(model, length):
    """A static KV cache of `length` positions (allocated at its first use, for the batch it meets)."""
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=length)


def mark(device):
    """A point in time: a CUDA event recorded on the stream (it neither waits for the GPU nor makes it
    wait; read after a synchronize), or the clock on the CPU."""
    if device == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def seconds_between(marks):
    """Seconds from each mark to the next (the GPU synchronized first)."""
    if marks and isinstance(marks[0], torch.cuda.Event):
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1000 for a, b in zip(marks, marks[1:])]
    return [b - a for a, b in zip(marks, marks[1:])]


def _generate(model, input_ids, new_tokens, pad_token_id, marks=None):
    """Eager greedy `generate` of exactly `new_tokens`; with `marks`, one mark as each token is produced
    (from a stopping criterion, which `generate` calls once per token and which never stops it)."""
    from transformers import StoppingCriteriaList

    def stamp(ids, scores, **kwargs):
        marks.append(mark(ids.device.type))
        return torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)

    model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id,
                   stopping_criteria=StoppingCriteriaList([stamp]) if marks is not None else None)


def _time_first_token(model, input_ids, *, repeats, device, pad_token_id):
    """Seconds of `generate(max_new_tokens=1)`, `repeats` times after a warm-up."""
    _generate(model, input_ids, 1, pad_token_id)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        _generate(model, input_ids, 1, pad_token_id)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def decode(model, input_ids, new_tokens, *, pad_token_id, mode="eager", step=None, cache=None, marks=None):
    """One greedy run of `new_tokens` in `mode`: eager `generate`, or compiled (`greedy_static` with
    `step` and the static `cache`); with `marks`, one mark as each token is produced."""
    if mode == "eager":
        _generate(model, input_ids, new_tokens, pad_token_id, marks)
    else:
        greedy_static(model, input_ids, new_tokens, step=step, cache=cache, marks=marks)


def _time_steps(model, input_ids, new_tokens, *, runs, **how):
    """Seconds of each decode step (each token after the first) over `runs` runs of `new_tokens`,
    after one warm-up run (in compiled mode also the compilation and the CUDA graph capture); `how`:
    `decode`'s keywords."""
    decode(model, input_ids, new_tokens, **how)
    steps = []
    for _ in range(runs):
        marks = []
        decode(model, input_ids, new_tokens, marks=marks, **how)
        steps += seconds_between(marks)
    return steps


def _spread(values, p90=False):
    out = {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}
    if p90:  # the slow tail of decode steps (interpolated within the samples)
        out["p90"] = statistics.quantiles(values, n=10, method="inclusive")[-1] if len(values) > 1 else values[0]
    return out


def prompt_batch(token_stream, batch, length):
    """A batch of `batch` different real-text prompts of exactly `length` tokens (no padding)."""
    need = batch * length
    if token_stream.numel() < need:
        token_stream = token_stream.repeat(need // max(1, token_stream.numel()) + 1)
    return token_stream[:need].view(batch, length)


def element_bytes(model):
    """Bytes per element of the model's activations and KV cache: its float dtype's (2 otherwise)."""
    return torch.finfo(model.dtype).bits // 8 if model.dtype.is_floating_point else 2


def _head_dim(config):
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_cache_bytes(config, batch, tokens, element_bytes):
    """Bytes of the KV cache for `batch` sequences of `tokens`: K and V for every layer and key-value head."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * _head_dim(config) * tokens * batch * element_bytes


def matmul_flops_per_token(config):
    """Multiply-add FLOPs of the model's linear layers for one token (2 per weight, lm_head included
    even when tied to the embedding), counted on an empty copy built from the config."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(config)
    return 2 * sum(m.weight.numel() for m in empty.modules() if isinstance(m, torch.nn.Linear))


def attention_flops(config, prompt_tokens):
    """FLOPs of causal attention over a prompt (QK^T and PV, half the square): 2 x 2 x layers x P^2/2 x width."""
    width = _head_dim(config) * config.num_attention_heads
    return 2 * config.num_hidden_layers * prompt_tokens * prompt_tokens * width


def _point(device, measure):
    """Run one sweep point; an out-of-memory is recorded as such (and the memory given back). The
    failed attempt's allocations are dropped from the peak counters: the sweep's peak is over the
    points that ran (on an H200 a batch of 65536 reached 95 GB before failing, a 2.5 GB sweep).
    Each point records its wall seconds, warm-up included (`point_s`): what the sweep costs, where."""
    start = time.perf_counter()
    try:
        return {**measure(), "point_s": round(time.perf_counter() - start, 3)}
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one; so are some kernels' own OOM errors
        if not isinstance(e, torch.cuda.OutOfMemoryError) and "out of memory" not in str(e).lower():
            raise
        error = str(e).splitlines()[0][:300]
    # Only here, out of the except block, is the exception's traceback gone, and with it the frames
    # that hold the failed attempt's tensors (inside it, an H200 kept 31 GB of them).
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return {"status": "out of memory", "error": error, "point_s": round(time.perf_counter() - start, 3)}


@torch.no_grad()
def measure_speed(model, token_stream, *, device, pad_token_id, prompt_lengths, decode_prompt_tokens,
                  new_tokens, batch_sizes, repeats, weight_bytes, rates=None, decode_modes=("eager",),
                  decode_runs=1, eager_attention=EAGER_ATTENTION):
    """The speed sweep, in each of `decode_modes` (eager `generate`; compiled: `greedy_static`):
    - prefill: at each prompt length, batch 1: TTFT and prefill tokens/s (prompt / TTFT), and the
      share of the device's measured matmul rate that the prompt's FLOPs over TTFT reach;
    - decode: at each batch size: tokens/s, memory split into weights, KV cache and the rest (CUDA),
      and the achieved bandwidth: bytes read per step (weights as stored + the KV cache at its mean
      length) x steps per second, with its share of the measured copy bandwidth.
    TTFT: median of `repeats` runs; decode: the median step of `decode_runs` runs; each after a
    warm-up. Eager forwards use the attention kernels `eager_attention` (None: torch's order). A
    point that runs out of memory is recorded and the sweep goes on; a prompt longer than the
    model's context is skipped with the reason."""
    config = model.config
    positions = getattr(config, "max_position_embeddings", None) or 2048
    kv_bytes = element_bytes(model)
    flops_per_token = matmul_flops_per_token(config)
    peaks, compile_error = [], None
    step = compiled_step(model, device) if "compiled" in decode_modes else None
    result = {"prefill": {}, "decode": {}, "new_tokens": new_tokens, "decode_prompt_tokens": decode_prompt_tokens,
              "repeats": repeats, "decode_runs": decode_runs, "decode_modes": list(decode_modes),
              "kv_element_bytes": kv_bytes,
              "attention_kernels": {"eager": eager_attention or "torch's default order", "compiled": "torch's default order"}}
    if "compiled" in decode_modes:
        result["decode_compiled"], result["compiled_settings"] = {}, compiled_settings(device)

    for p in prompt_lengths:
        if p + 1 > positions:
            result["prefill"][str(p)] = {"status": "skipped", "reason": f"longer than the model's {positions} positions"}
            continue

        def prefill(p=p):
            ids = prompt_batch(token_stream, 1, p).to(model.device)
            with only_attention(eager_attention):
                ttft = [t * 1000 for t in _time_first_token(model, ids, repeats=repeats, device=device,
                                                            pad_token_id=pad_token_id)]
            point = {"status": "ok", "ttft_ms": statistics.median(ttft), "timing": _spread(ttft)}
            point["prefill_tok_s"] = p / (point["ttft_ms"] / 1000)
            if rates and rates.get("matmul_flops"):
                flops = flops_per_token * p + attention_flops(config, p)
                point["matmul_share"] = flops / (point["ttft_ms"] / 1000) / rates["matmul_flops"]
            return point
        result["prefill"][str(p)] = _point(device, prefill)

    for mode, b in [(m, b) for m in decode_modes for b in batch_sizes]:
        def decode_point(b=b, mode=mode):
            if device == "cuda":  # this point's own peak; the sweep's peak is kept in `peaks`
                peaks.append(torch.cuda.max_memory_allocated())
            reset_peak(device)
            ids = prompt_batch(token_stream, b, decode_prompt_tokens).to(model.device)
            if mode == "compiled":
                breaks = graph_breaks()
                steps = _time_steps(model, ids, new_tokens, runs=decode_runs, pad_token_id=pad_token_id, mode=mode,
                                    step=step, cache=static_cache(model, decode_prompt_tokens + new_tokens))
            else:
                with only_attention(eager_attention):
                    steps = _time_steps(model, ids, new_tokens, runs=decode_runs, pad_token_id=pad_token_id)
            if statistics.median(steps) <= 0:
                return {"status": "not measurable", "error": "the decode steps took no measurable time"}
            tok_s = b / statistics.median(steps)
            kv = kv_cache_bytes(config, b, decode_prompt_tokens + new_tokens, kv_bytes)
            kv_read = kv_cache_bytes(config, b, decode_prompt_tokens + new_tokens / 2, kv_bytes)
            step_ms = [t * 1000 for t in steps]
            point = {"status": "ok", "tok_s": tok_s, "tok_s_mean": b / statistics.fmean(steps),
                     "step_ms": _spread(step_ms, p90=True),
                     "kv_cache_bytes": kv, "bytes_per_step": weight_bytes + kv_read}
            point["achieved_bytes_s"] = point["bytes_per_step"] * tok_s / b
            if rates and rates.get("copy_bytes_s"):
                point["bandwidth_share"] = point["achieved_bytes_s"] / rates["copy_bytes_s"]
            if device == "cuda":
                peak = torch.cuda.max_memory_allocated()
                point.update({"peak_bytes": peak, "other_bytes": peak - weight_bytes - kv})
            if mode == "compiled":
                point.update(_compiled_state(model, device, graph_breaks(since=breaks)))
            return point
        key = "decode" if mode == "eager" else f"decode_{mode}"
        if mode == "compiled" and compile_error:
            result[key][str(b)] = {"status": "failed", "error": compile_error}
            continue
        try:
            result[key][str(b)] = _point(device, decode_point)
        except Exception as e:  # noqa: BLE001 - a kernel torch.compile cannot trace: say so, keep the rest
            if mode != "compiled":
                raise
            compile_error = f"compiled decode failed at batch {b}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            result[key][str(b)] = {"status": "failed", "error": compile_error}
            gc.collect()

    if device == "cuda":
        result["peak_bytes"] = max(peaks + [torch.cuda.max_memory_allocated()])
    # The summary's columns: TTFT at the first prompt length, decode tokens/s per batch size.
    first = result["prefill"].get(str(prompt_lengths[0]), {})
    result["ttft_ms"], result["ttft_prompt_tokens"] = first.get("ttft_ms"), prompt_lengths[0]
    main = result["decode"] or result.get("decode_compiled", {})
    result["decode_tok_s"] = {b: v["tok_s"] for b, v in main.items() if v.get("status") == "ok"}
    return result


def graph_breaks(since=None):
    """torch.compile's graph breaks so far in this process ({reason: count}, counted when dynamo
    traces); with `since` (an earlier call's value), those met after it. A break splits the
    compiled step into graphs with Python between them: each part is compiled, but the step is no
    longer one graph (bitsandbytes' LLM.int8 breaks it in its linear layers, traced on the CPU: its
    outlier split has a data-dependent shape)."""
    from collections import Counter

    from torch._dynamo.utils import counters

    now = Counter(counters["graph_break"])
    return now - since if since is not None else now


def _break_reason(text):
    """A graph break's reason on one line: its first line and dynamo's explanation, if it gives one."""
    lines = [line.strip() for line in text.splitlines() if line.strip()] or ["(no reason given)"]
    explanation = next((line.removeprefix("Explanation:").strip() for line in lines if line.startswith("Explanation:")), "")
    return f"{lines[0]}: {explanation}" if explanation else lines[0]


def _compiled_state(model, device, breaks):
    """Whether compiled mode compiled the step, its graph breaks while compiling this point (`breaks`,
    from graph_breaks: count and the reasons, most frequent first), and what transformers' own
    `generate` would do."""
    if device != "cuda":
        return {"compiled": False, "why_not_compiled": "compiled on GPUs only (CUDA graphs); static KV cache, eager step"}
    state = {"compiled": True, "graph_breaks": sum(breaks.values())}
    if breaks:
        state["graph_break_reasons"] = [f"{n} x {_break_reason(r)}" for r, n in breaks.most_common(3)]
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not quantizer.is_compileable:
        state["note"] = (f"transformers' generate would not compile this quantization "
                         f"({type(quantizer).__name__}.is_compileable is False)")
    return state


def device_rates(device):
    """The device's measured ceilings, once per run: copy bandwidth (a 1 GiB buffer copied, read +
    write bytes over time; 256 MiB on the CPU) and dense matmul rate (float16 8192^3 on a GPU,
    float32 2048^3 on the CPU; 2 n^3 FLOPs over time); medians of 5 after a warm-up."""
    def timed(fn, n=5):
        fn()
        sync(device)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    size = 2**30 if device == "cuda" else 2**28
    src = torch.empty(size, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src))
    src = dst = None  # give the buffers back before the matmul
    n, dtype = (8192, torch.float16) if device == "cuda" else (2048, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_s = timed(lambda: a @ b)
    return {"copy_bytes_s": 2 * size / copy_s, "matmul_flops": 2 * n**3 / mm_s,
            "method": f"copy: {size // 2**20} MiB buffer, 2 x bytes / time; matmul: {str(dtype).replace('torch.', '')} "
                      f"{n}x{n}x{n}, 2 n^3 / time; medians of 5 after a warm-up", "device": device}


if __name__ == "__main__":  # python -m quantbench.cost cuda: the device's rates as JSON (a child of the sweep)
    import json

    print(json.dumps(device_rates(sys.argv[1])))
