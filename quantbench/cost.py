"""Cost of a loaded model: weight memory, peak memory, time to first token, decode throughput.

Timing protocol: greedy generation with `min_new_tokens == max_new_tokens` so every run produces
the same number of tokens; one warm-up run before each measurement, the GPU synchronized before
every clock read, `repeats` runs, the median reported with min and max.
- TTFT at prompt length P, batch 1: the time of `generate(max_new_tokens=1)`: prefill plus the
  first token, what a user waits before the first token appears.
- Decode tokens/s at batch B: with a prompt of `decode_prompt_tokens`, time `generate` for N new
  tokens (t_N) and for 1 (t_1); decode rate = B * (N - 1) / (t_N - t_1), so prefill is excluded.

    >>> weight_bytes(model)
    {'weight_bytes': 109777792, 'memory_footprint_bytes': 109777792, 'quant_state_bytes': 2965504}
"""
import gc
import resource
import statistics
import sys
import time

import torch


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


def _time_generate(model, input_ids, new_tokens, *, repeats, device, pad_token_id):
    attention_mask = torch.ones_like(input_ids)
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, pad_token_id=pad_token_id)
    model.generate(input_ids, **kwargs)  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        model.generate(input_ids, **kwargs)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def prompt_batch(token_stream, batch, length):
    """A batch of `batch` different real-text prompts of exactly `length` tokens (no padding)."""
    need = batch * length
    if token_stream.numel() < need:
        token_stream = token_stream.repeat(need // max(1, token_stream.numel()) + 1)
    return token_stream[:need].view(batch, length)


@torch.no_grad()
def measure_speed(model, token_stream, *, device, pad_token_id, prompt_tokens, decode_prompt_tokens,
                  new_tokens, batch_sizes, repeats):
    """TTFT at prompt_tokens and decode tokens/s at each batch size; medians with their spread."""
    ids = prompt_batch(token_stream, 1, prompt_tokens).to(model.device)
    ttft = [t * 1000 for t in _time_generate(model, ids, 1, repeats=repeats, device=device,
                                             pad_token_id=pad_token_id)]
    result = {"ttft_ms": statistics.median(ttft), "ttft_prompt_tokens": prompt_tokens,
              "decode_tok_s": {}, "timing": {"ttft_ms": _spread(ttft), "decode_tok_s": {}},
              "new_tokens": new_tokens, "decode_prompt_tokens": decode_prompt_tokens, "repeats": repeats}
    for b in batch_sizes:
        ids = prompt_batch(token_stream, b, decode_prompt_tokens).to(model.device)
        t_n = _time_generate(model, ids, new_tokens, repeats=repeats, device=device, pad_token_id=pad_token_id)
        t_1 = _time_generate(model, ids, 1, repeats=repeats, device=device, pad_token_id=pad_token_id)
        # Pair the i-th runs; the median of per-pair rates is robust to one slow run.
        rates = [b * (new_tokens - 1) / max(tn - t1, 1e-9) for tn, t1 in zip(t_n, t_1)]
        result["decode_tok_s"][str(b)] = statistics.median(rates)
        result["timing"]["decode_tok_s"][str(b)] = _spread(rates)
    return result
