"""The transformers engine: a method's checkpoint loaded as a PyTorch model, and what quality and cost
need of it. Every engine (one file in this folder, one line in engines.ENGINES) gives the same few
functions, so that quality and cost never call an engine's library themselves:

    model, tokenizer, info = load("nf4", checkpoint, model_path=path, device="cuda", settings={})
    for logp in logprobs(model, windows, first=0, batch_size=4): ...   # next-token log-probabilities
    lm(model, tokenizer, batch_size=16, max_length=2048)               # an lm-eval LM (HFLM)
    with forwards(model, varying_shapes=True) as seen: ...             # non-finite logits counted
    ttft_s = time_prefill(model, ids, repeats=3, pad_token_id=0)
    step_s = time_decode(model, ids, 64, mode="compiled", runs=1, pad_token_id=0, step=compile_step(model, "cuda"))

and its memory (weight_bytes, reset_peak, peak_bytes, resident_bytes) and shapes (for the roofline).

Decode runs in two modes. eager: plain `generate`, what a user gets by default. compiled: what the
hardware allows: greedy decoding with a static KV cache, the prefill eager and then one
torch.compile'd forward per token (mode "reduce-overhead": CUDA graphs), the next token picked on the
GPU, with no per-step host synchronisation, logits processors or stopping checks (the Python work that
`generate` does between steps and that dominates a small model's step).
"""
import contextlib
import gc
import importlib.metadata
import logging
import math
import resource
import sys
import time

import torch

# What optional pieces this engine does not use say when imported, which reads as an error (torchao's
# kernels built for other Pythons and GPUs, its Triton-only kernels on a CPU, torch's deprecation of how
# torchao registers its enums, bitsandbytes' optional kernels package), and lm-eval's note that it was
# given a loaded model, which this engine does on purpose: dropped where they are logged.
KNOWN_HARMLESS = {"torchao": "Failed to load ", "torchao.kernel.intmm": "Detected no triton",
                  "torch.utils._pytree": "is an Enum subclass", "bitsandbytes.backends.cpu.ops": "from kernels-community",
                  "lm_eval.models.huggingface": "Passed an already-initialized model"}
for _name, _text in KNOWN_HARMLESS.items():
    logging.getLogger(_name).addFilter(lambda record, text=_text: text not in record.getMessage())

# Attention kernels (torch's SDPBackend names) of the forwards whose shapes change from call to call:
# lm-eval's batches, the sanity generation and eager decoding (a KV cache one token longer each step).
# On Hopper torch tries cuDNN's attention first, and cuDNN builds an execution plan for every new
# shape; flash and memory-efficient attention need none. Compiled mode keeps torch's order (its shapes
# are static: one plan).
EAGER_ATTENTION = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"]
DECODE_MODES = ("eager", "compiled")


def only_attention(kernels):
    """A context in which SDPA uses only `kernels` (torch's SDPBackend names); None: torch's own order."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, k) for k in kernels]) if kernels else contextlib.nullcontext()


def about(device):
    """What this engine is on this machine, for `quantbench methods`."""
    import transformers

    gpu = f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no CUDA device"
    return f"transformers {transformers.__version__}, torch {torch.__version__} ({gpu}); runs on {device}"


def load(method, checkpoint, *, model_path, device, settings, trust_remote_code=False):
    """(model, tokenizer, info): the method's loader on `checkpoint` (the float model, or the quantized
    checkpoint it was saved to), the tokenizer of the model at `model_path`; `info` says what ran."""
    from transformers import AutoTokenizer

    from quantbench.methods import METHODS, unquantized_linears

    model, info = METHODS[method]["load"](str(checkpoint), device=device, trust_remote_code=trust_remote_code,
                                          **settings)
    model.eval()
    if METHODS[method]["family"] != "baseline":
        info["unquantized_linears"] = unquantized_linears(model)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, {**info, "engine": "transformers", "device": device}


@torch.no_grad()
def logprobs(model, windows, *, first=0, batch_size=1):
    """Per batch of `windows` ([n, T] token ids): the float32 log-probabilities over the vocabulary of
    the next token at positions first..T-2, [batch, T-1-first, vocabulary], on the model's device. With a
    quantized KV cache (use_quantized_cache) the positions before `first` are a prefill and each later one
    a decode step, so that every scored token reads its past from the cache, as in generation: a single
    forward reads no cache."""
    quantized = _quantized_cache_config(model)
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size].to(model.device)
        if quantized is None:
            yield torch.log_softmax(model(batch).logits[:, first:-1].float(), dim=-1)
            continue
        from transformers import QuantizedCache

        if first < 1:
            raise ValueError("a quantized KV cache is scored after a prefill of at least one token")
        cache = QuantizedCache(config=model.config, **quantized)
        model(batch[:, :first], past_key_values=cache, use_cache=True, logits_to_keep=1)
        steps = [model(batch[:, p:p + 1], past_key_values=cache, use_cache=True).logits[:, -1].float()
                 for p in range(first, batch.shape[1] - 1)]
        yield torch.log_softmax(torch.stack(steps, dim=1), dim=-1)


# transformers' quantized KV cache (KIVI-style): keys and values quantized per channel in groups of 64,
# the most recent 128 tokens kept in the model's dtype until they are quantized too; its defaults.
KV_GROUP_SIZE, KV_RESIDUAL_LENGTH = 64, 128


def use_quantized_cache(model, *, nbits, backend):
    """Make every generation of `model` (and `logprobs`) keep its KV cache quantized to `nbits` by `backend`
    (hqq or quanto), as a transformers user sets it: generation_config's cache_implementation "quantized".
    Returns what was set."""
    from quantbench.methods import MissingLibrary, installed

    library, module = {"hqq": ("hqq", "hqq"), "quanto": ("optimum-quanto", "optimum.quanto")}[backend]
    if not installed(module):
        raise MissingLibrary(f"the {backend} KV cache needs the Python package '{library}', which is not installed: "
                             f"pip install {library}")
    c = model.config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    # HQQ quantizes a layer's whole keys in groups, so a group must divide every size they take: a head's width does
    group = math.gcd(KV_GROUP_SIZE, head_dim)
    config = {"backend": backend, "nbits": nbits, "q_group_size": group, "residual_length": KV_RESIDUAL_LENGTH}
    model.generation_config.cache_implementation = "quantized"
    model.generation_config.cache_config = dict(config)
    return {**config, "library": library, "library_version": importlib.metadata.version(library),
            "axis_key": 0, "axis_value": 0, "implementation": "transformers QuantizedCache"}


def _quantized_cache_config(model):
    config = getattr(model, "generation_config", None)
    if config is None or getattr(config, "cache_implementation", None) != "quantized":
        return None
    return dict(config.cache_config)


def _cache_bytes(cache):
    """Bytes a KV cache holds: its tensors, a quantized layer's packed keys and values with their scales
    and zeros, and the recent tokens it keeps unquantized."""
    def size(x):
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, (tuple, list)):
            return sum(size(v) for v in x)
        if isinstance(x, dict):
            return sum(size(v) for v in x.values())
        if hasattr(x, "__tensor_flatten__"):  # quanto's quantized tensors
            return sum(size(getattr(x, n)) for n in x.__tensor_flatten__()[0])
        return 0

    return sum(size(getattr(layer, name, None)) for layer in cache.layers
               for name in ("keys", "values", "_quantized_keys", "_quantized_values"))


@torch.no_grad()
def quantized_cache_bytes(model, input_ids):
    """Bytes the quantized cache (use_quantized_cache) holds after a prefill of `input_ids` and one decode step."""
    from transformers import QuantizedCache

    cache = QuantizedCache(config=model.config, **_quantized_cache_config(model))
    logits = model(input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    model(logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    return _cache_bytes(cache)


@contextlib.contextmanager
def forwards(model, *, varying_shapes=False):
    """A context for the model's forwards in a quality phase: yields {'positions', 'nonfinite'}, filled
    when it ends, counting the positions (a sequence's token) whose logits hold a NaN or an infinity
    (from the minimum and maximum over the vocabulary, which NaN propagates through: no mask as large as
    the logits, no host synchronisation per forward). varying_shapes: forwards of ever new shapes
    (generation, lm-eval's batches), run on EAGER_ATTENTION."""
    seen = {"positions": 0, "nonfinite": 0}
    count = {"positions": 0, "nonfinite": 0}

    def hook(module, args, output):
        logits = getattr(output, "logits", None)
        if isinstance(logits, torch.Tensor) and logits.numel():
            low, high = logits.detach().aminmax(dim=-1)
            count["positions"] += low.numel()
            count["nonfinite"] = count["nonfinite"] + (~(torch.isfinite(low) & torch.isfinite(high))).sum()

    handle = model.register_forward_hook(hook)
    try:
        with only_attention(EAGER_ATTENTION if varying_shapes else None):
            yield seen
    finally:
        handle.remove()
        seen.update(positions=count["positions"], nonfinite=int(count["nonfinite"]))


def lm(model, tokenizer, *, batch_size, max_length, max_batch_size):
    """lm-eval's own LM for the loaded model (HFLM), batch size set on it (lm-eval ignores
    simple_evaluate's for a model object; "auto": its detection, from max_batch_size down) and
    max_length explicit, so it never falls back to the model's full position count."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                max_batch_size=max_batch_size)


@torch.no_grad()
def generate(model, tokenizer, prompt, new_tokens):
    """Greedy continuation of `prompt`: (new token ids, text)."""
    enc = tokenizer(prompt, return_tensors="pt").to(model.device)
    out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    new = out[0, enc.input_ids.shape[1]:].tolist()
    return new, tokenizer.decode(new, skip_special_tokens=True)


# ---- memory ----

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


def input_device(model):
    """Where the model's input token ids go."""
    return model.device


def device_name(device):
    """The card this process computes on (a Ray or Modal worker's own), or None on the CPU."""
    return torch.cuda.get_device_name(0) if device == "cuda" else None


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    """Start a new peak. Garbage is collected first, so that tensors a loader left in reference
    cycles (freed whenever Python's collector next runs) do not count as the next phase's memory."""
    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def release(device):
    """Give back the device memory the allocator keeps cached (after quantizing, before the reload)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


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


def shapes(model):
    """What the roofline needs of the model: layers, heads, widths, positions, the bytes of one
    activation element, and the multiply-add FLOPs of its linear layers per token (2 per weight,
    lm_head included even when tied to the embedding, counted on an empty copy)."""
    from transformers import AutoModelForCausalLM

    c = model.config
    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(c)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return {"layers": c.num_hidden_layers, "heads": c.num_attention_heads, "head_dim": head_dim,
            "kv_heads": getattr(c, "num_key_value_heads", None) or c.num_attention_heads, "vocab": c.vocab_size,
            "positions": getattr(c, "max_position_embeddings", None) or 2048,
            "element_bytes": torch.finfo(model.dtype).bits // 8 if model.dtype.is_floating_point else 2,
            "linear_flops_per_token": 2 * sum(m.weight.numel() for m in empty.modules() if isinstance(m, torch.nn.Linear))}


# ---- timed prefill and decode ----

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
      turns a batch-1 matrix product into a reduction it can fuse and tune);
    - on Hopper and later (compute capability 9+), programmatic dependent launch: each Triton kernel
      may start, and read what does not depend on the kernel before it (the weights), while that
      kernel finishes, and waits for its results before reading them (docs/benchmarks.md)."""
    if device != "cuda":
        return None
    return {"mode": "reduce-overhead", "dynamic": False, "coordinate_descent_tuning": True,
            "programmatic_dependent_launch": torch.cuda.get_device_capability()[0] >= 9}


def compile_step(model, device):
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


@torch.no_grad()
def time_prefill(model, input_ids, *, repeats, pad_token_id, attention=EAGER_ATTENTION):
    """Seconds of `generate(max_new_tokens=1)` from `input_ids`, `repeats` times after a warm-up, the
    device synchronized around each; attention on the kernels `attention` (None: torch's order)."""
    device = input_ids.device.type
    with only_attention(attention):
        _generate(model, input_ids, 1, pad_token_id)
        times = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            _generate(model, input_ids, 1, pad_token_id)
            sync(device)
            times.append(time.perf_counter() - t0)
    return times


def decode(model, input_ids, new_tokens, *, pad_token_id, mode="eager", step=None, cache=None, marks=None,
           attention=EAGER_ATTENTION):
    """One greedy run of `new_tokens` in `mode`: eager `generate` (attention on the kernels `attention`),
    or compiled (`greedy_static` with `step` and the static `cache`); with `marks`, one mark as each
    token is produced."""
    if mode == "eager":
        with only_attention(attention):
            _generate(model, input_ids, new_tokens, pad_token_id, marks)
    else:
        greedy_static(model, input_ids, new_tokens, step=step, cache=cache, marks=marks)


@torch.no_grad()
def time_decode(model, input_ids, new_tokens, *, mode, runs, pad_token_id, step=None, attention=EAGER_ATTENTION):
    """Seconds of each decode step (each token after the first) over `runs` runs of `new_tokens`, after
    one warm-up run (in compiled mode also the compilation and the CUDA graph capture)."""
    how = {"pad_token_id": pad_token_id, "mode": mode, "step": step, "attention": attention,
           "cache": static_cache(model, input_ids.shape[1] + new_tokens) if mode == "compiled" else None}
    decode(model, input_ids, new_tokens, **how)
    steps = []
    for _ in range(runs):
        marks = []
        decode(model, input_ids, new_tokens, marks=marks, **how)
        steps += seconds_between(marks)
    return steps


def graph_breaks(since=None):
    """torch.compile's graph breaks so far in this process ({reason: count}, counted when dynamo
    traces); with `since` (an earlier call's value), those met after it. A break splits the
    compiled step into graphs with Python between them: each part is compiled, but the step is no
    longer one graph (bitsandbytes' LLM.int8 breaks it in its linear layers: its outlier split has a
    data-dependent shape)."""
    from collections import Counter

    from torch._dynamo.utils import counters

    now = Counter(counters["graph_break"])
    return now - since if since is not None else now


def _break_reason(text):
    """A graph break's reason on one line: its first line and dynamo's explanation, if it gives one."""
    lines = [line.strip() for line in text.splitlines() if line.strip()] or ["(no reason given)"]
    explanation = next((line.removeprefix("Explanation:").strip() for line in lines if line.startswith("Explanation:")), "")
    return f"{lines[0]}: {explanation}" if explanation else lines[0]


def compiled_state(model, device, breaks):
    """Whether compiled mode compiled the step, its graph breaks while compiling a point (`breaks`,
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


def standard_bench(model):
    """An engine's own benchmark protocol (llama.cpp: llama-bench's pp512/tg128); transformers has none."""
    return None
