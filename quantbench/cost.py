"""Speed of a loaded model, in any engine, against the device's measured ceilings (the roofline).

Timing protocol: greedy generation of exactly the asked number of tokens; one warm-up run before each
measurement, the device synchronized before every clock read (the engine's time_prefill and
time_decode do the timing; this module sweeps the points and relates them to the roofline).
- TTFT at prompt length P, batch 1: the time of generating 1 token: prefill plus the first token,
  what a user waits before the first token appears. Median of `repeats` runs, with min and max.
- Decode tokens/s at batch B, in each decode mode (eager; compiled): with a prompt of
  `decode_prompt_tokens`, one warm-up run of N new tokens, then `decode_runs` timed runs in which
  every token is stamped as it is produced; each of the N - 1 steps after the first token is one
  sample, the prefill is excluded, and decode rate = B / (median step time).
- Roofline: a decode step reads every weight once plus the KV cache, so achieved bandwidth =
  (weights as stored + the KV cache at its mean length) x steps/s, over the copy bandwidth measured
  once per run (device_rates); prefill counts 2 FLOPs per linear weight per prompt token plus causal
  attention, over TTFT, against the measured matmul rate.

    >>> measure_speed(engine, model, stream, device="cuda", pad_token_id=0, prompt_lengths=[128], ...)
    {'prefill': {'128': {...}}, 'decode': {'eager': {'1': {...}}}, ...}
"""
import gc
import statistics
import sys
import time

import torch


def kv_cache_bytes(shapes, batch, tokens):
    """Bytes of the KV cache for `batch` sequences of `tokens`: K and V for every layer and key-value head."""
    return 2 * shapes["layers"] * shapes["kv_heads"] * shapes["head_dim"] * tokens * batch * shapes["element_bytes"]


def attention_flops(shapes, prompt_tokens):
    """FLOPs of causal attention over a prompt (QK^T and PV, half the square): 2 x 2 x layers x P^2/2 x width."""
    return 2 * shapes["layers"] * prompt_tokens * prompt_tokens * shapes["head_dim"] * shapes["heads"]


def prompt_batch(token_stream, batch, length):
    """A batch of `batch` different real-text prompts of exactly `length` tokens (no padding)."""
    need = batch * length
    if token_stream.numel() < need:
        token_stream = token_stream.repeat(need // max(1, token_stream.numel()) + 1)
    return token_stream[:need].view(batch, length)


def _spread(values, p90=False):
    out = {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}
    if p90:  # the slow tail of decode steps (interpolated within the samples)
        out["p90"] = statistics.quantiles(values, n=10, method="inclusive")[-1] if len(values) > 1 else values[0]
    return out


def _point(device, measure):
    """Run one sweep point; an out-of-memory is recorded as such (and the memory given back). The
    failed attempt's allocations are dropped from the peak counters: the sweep's peak is over the
    points that ran. Each point records its wall seconds, warm-up included (`point_s`)."""
    start = time.perf_counter()
    try:
        return {**measure(), "point_s": round(time.perf_counter() - start, 3)}
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one; so are some kernels' own OOM errors
        if not isinstance(e, torch.cuda.OutOfMemoryError) and "out of memory" not in str(e).lower():
            raise
        error = str(e).splitlines()[0][:300]
    # Only here, out of the except block, is the exception's traceback gone, and with it the frames
    # that hold the failed attempt's tensors.
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return {"status": "out of memory", "error": error, "point_s": round(time.perf_counter() - start, 3)}


def measure_speed(engine, model, token_stream, *, device, pad_token_id, prompt_lengths, decode_prompt_tokens,
                  new_tokens, batch_sizes, repeats, weight_bytes, rates=None, decode_modes=("eager",),
                  decode_runs=1, attention="engine default"):
    """The speed sweep, in each of `decode_modes`:
    - prefill: at each prompt length, batch 1: TTFT and prefill tokens/s (prompt / TTFT), and the
      share of the device's measured matmul rate that the prompt's FLOPs over TTFT reach;
    - decode: at each batch size: tokens/s, memory split into weights, KV cache and the rest (CUDA),
      and the achieved bandwidth with its share of the measured copy bandwidth.
    A point that runs out of memory is recorded and the sweep goes on; a prompt longer than the
    model's context is skipped with the reason. `attention`: the eager forwards' attention kernels
    when not the engine's own choice (a benchmark's variant)."""
    shapes = engine.shapes(model)
    how = {} if attention == "engine default" else {"attention": attention}
    peaks, compile_error = [], None
    step = engine.compile_step(model, device) if "compiled" in decode_modes else None
    result = {"prefill": {}, "decode": {mode: {} for mode in decode_modes}, "new_tokens": new_tokens,
              "decode_prompt_tokens": decode_prompt_tokens, "repeats": repeats, "decode_runs": decode_runs,
              "decode_modes": list(decode_modes), "kv_element_bytes": shapes["element_bytes"],
              "attention_kernels": {"eager": how.get("attention", engine.EAGER_ATTENTION) or "torch's default order",
                                    "compiled": "torch's default order"}}
    if "compiled" in decode_modes:
        result["compiled_settings"] = engine.compiled_settings(device)

    for p in prompt_lengths:
        if p + 1 > shapes["positions"]:
            result["prefill"][str(p)] = {"status": "skipped", "reason": f"longer than the model's {shapes['positions']} positions"}
            continue

        def prefill(p=p):
            ids = prompt_batch(token_stream, 1, p).to(engine.input_device(model))
            ttft = [t * 1000 for t in engine.time_prefill(model, ids, repeats=repeats, pad_token_id=pad_token_id, **how)]
            point = {"status": "ok", "ttft_ms": statistics.median(ttft), "timing": _spread(ttft)}
            point["prefill_tok_s"] = p / (point["ttft_ms"] / 1000)
            if rates and rates.get("matmul_flops"):
                flops = shapes["linear_flops_per_token"] * p + attention_flops(shapes, p)
                point["matmul_share"] = flops / (point["ttft_ms"] / 1000) / rates["matmul_flops"]
            return point
        result["prefill"][str(p)] = _point(device, prefill)

    for mode, b in [(m, b) for m in decode_modes for b in batch_sizes]:
        if mode not in engine.DECODE_MODES:
            result["decode"][mode][str(b)] = {"status": "skipped", "reason": f"{mode} decode is not this engine's"}
            continue

        def decode_point(b=b, mode=mode):
            if device == "cuda":  # this point's own peak; the sweep's peak is kept in `peaks`
                peaks.append(engine.peak_bytes(device)["peak_bytes"])
            engine.reset_peak(device)
            ids = prompt_batch(token_stream, b, decode_prompt_tokens).to(engine.input_device(model))
            breaks = engine.graph_breaks() if mode == "compiled" else None
            steps = engine.time_decode(model, ids, new_tokens, mode=mode, runs=decode_runs, pad_token_id=pad_token_id,
                                       step=step, **how)
            if statistics.median(steps) <= 0:
                return {"status": "not measurable", "error": "the decode steps took no measurable time"}
            tok_s = b / statistics.median(steps)
            kv = kv_cache_bytes(shapes, b, decode_prompt_tokens + new_tokens)
            kv_read = kv_cache_bytes(shapes, b, decode_prompt_tokens + new_tokens / 2)
            point = {"status": "ok", "tok_s": tok_s, "tok_s_mean": b / statistics.fmean(steps),
                     "step_ms": _spread([t * 1000 for t in steps], p90=True),
                     "kv_cache_bytes": kv, "bytes_per_step": weight_bytes + kv_read}
            point["achieved_bytes_s"] = point["bytes_per_step"] * tok_s / b
            if rates and rates.get("copy_bytes_s"):
                point["bandwidth_share"] = point["achieved_bytes_s"] / rates["copy_bytes_s"]
            if device == "cuda":
                peak = engine.peak_bytes(device)["peak_bytes"]
                point.update({"peak_bytes": peak, "other_bytes": peak - weight_bytes - kv})
            if mode == "compiled":
                point.update(engine.compiled_state(model, device, engine.graph_breaks(since=breaks)))
            return point
        if mode == "compiled" and compile_error:
            result["decode"][mode][str(b)] = {"status": "failed", "error": compile_error}
            continue
        try:
            result["decode"][mode][str(b)] = _point(device, decode_point)
        except Exception as e:  # noqa: BLE001 - a kernel torch.compile cannot trace: say so, keep the rest
            if mode != "compiled":
                raise
            compile_error = f"compiled decode failed at batch {b}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            result["decode"][mode][str(b)] = {"status": "failed", "error": compile_error}
            gc.collect()
    if device == "cuda":
        result["peak_bytes"] = max(peaks + [engine.peak_bytes(device)["peak_bytes"]])
    bench = engine.standard_bench(model)
    if bench:
        result["standard_bench"] = bench
    return result


def device_rates(device):
    """The device's measured ceilings, once per run: copy bandwidth (a 1 GiB buffer copied, read + write
    bytes over time) and dense matmul rate (2 n^3 FLOPs over time: float16 8192^3 on a GPU; on the CPU
    the best of float32 1024^3 and 2048^3 on all of torch's threads, as one size alone underestimates
    a small machine's peak); medians of 5 after a warm-up. A share above 100% is still possible where
    an engine streams faster than the probe (the summary flags it)."""
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(fn, n=5):
        fn()
        sync()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    size = 2**30
    src = torch.empty(size, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src))
    src = dst = None  # give the buffers back before the matmul
    sizes, dtype = ([8192], torch.float16) if device == "cuda" else ([1024, 2048], torch.float32)
    rates = []
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        rates.append(2 * n**3 / timed(lambda: a @ b))
    return {"copy_bytes_s": 2 * size / copy_s, "matmul_flops": max(rates),
            "method": f"copy: {size // 2**20} MiB buffer, 2 x bytes / time; matmul: {str(dtype).replace('torch.', '')} "
                      f"{' and '.join(f'{n}x{n}x{n}' for n in sizes)} (the best), 2 n^3 / time; medians of 5 after a "
                      f"warm-up" + ("" if device == "cuda" else f"; {torch.get_num_threads()} threads"), "device": device}


if __name__ == "__main__":  # python -m quantbench.cost cuda: the device's rates as JSON (a child of the sweep)
    import json

    print(json.dumps(device_rates(sys.argv[1])))
