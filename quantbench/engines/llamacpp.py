"""The llama.cpp engine: a GGUF file run by llama.cpp through llama-cpp-python, fed the token ids of the
model's Hugging Face tokenizer, so that its numbers compare with the transformers engine's on the
same tokens (engines/transformers.py names the functions every engine gives).

    model, tokenizer, info = load("gguf-q4_k_m", checkpoint, model_path=path, device="cpu", settings={})

`model` is a plain dict: the GGUF's path, how many layers go to the GPU, and the llama.cpp contexts
made so far (one at a time: a context holds the KV cache and, for scoring, a logits buffer of its
length x the vocabulary).
"""
import atexit
import contextlib
import importlib.metadata
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from quantbench.gguf_files import failure_line

EAGER_ATTENTION = "llama.cpp's flash attention"  # the sweep records what ran its attention
DECODE_MODES = ("eager",)  # llama.cpp's decode; it has no compiled mode of its own
FLASH_ATTENTION = True  # what llama.cpp's own tools do by default ("auto": on where supported, the CPU included)


def gguf_model(path, *, gpu_layers=0, threads=None, config=None):
    """The engine's model: a GGUF file, how many layers go to the GPU (-1: all), llama.cpp's threads, the
    Hugging Face config (for shapes), and the llama.cpp context made from it so far (_llm)."""
    return {"path": path, "gpu_layers": gpu_layers, "threads": threads or default_threads(), "config": config,
            "llm": None, "logits_all": None, "seen": None}


def _llm(model, n_ctx, logits_all):
    """A llama.cpp context of at least `n_ctx` positions (scoring every position when `logits_all`),
    kept until another is needed."""
    have = model["llm"]
    # The positions asked for, not n_ctx(): llama.cpp pads its context past them, but the bindings'
    # buffers of token ids and scores hold only as many as were asked for.
    if have is not None and len(have.input_ids) >= n_ctx and model["logits_all"] == logits_all:
        return have
    if have is not None:
        have.close()
    model["llm"], model["logits_all"] = _context(model, n_ctx, logits_all), logits_all
    return model["llm"]


def _context(model, n_ctx, logits_all):
    """A new llama.cpp context of exactly `n_ctx` positions on the model's file, threads and offload."""
    from llama_cpp import Llama

    return Llama(model_path=str(model["path"]), n_ctx=n_ctx, n_batch=min(n_ctx, 2048), n_ubatch=512,
                 logits_all=logits_all, n_gpu_layers=model["gpu_layers"], n_threads=model["threads"],
                 n_threads_batch=model["threads"], flash_attn=FLASH_ATTENTION, verbose=False)


def about(device):
    """What this engine is on this machine, for `quantbench methods`: the bindings' release, whether
    their llama.cpp was built with a GPU backend, and how many layers a run on `device` offloads."""
    try:
        import llama_cpp
    except ImportError:
        return "not installed: pip install -e '.[gguf]' (builds llama-cpp-python for this machine's CPU)"
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    backends = [part.split(":")[0].strip() for part in llama_cpp.llama_print_system_info().decode().split("|") if ":" in part]
    build = (f"built with GPU offload ({', '.join(b for b in backends if b != 'CPU') or 'a GPU backend'})" if gpu else
             "built for the CPU only (no CUDA: CMAKE_ARGS=\"-DGGML_CUDA=on\" pip install --force-reinstall --no-cache-dir "
             "llama-cpp-python==" + importlib.metadata.version("llama-cpp-python") + ")")
    layers = "every layer offloaded to the GPU (n_gpu_layers -1)" if gpu and device == "cuda" else "no layer offloaded (n_gpu_layers 0)"
    threading = ("OpenMP's threads" if openmp() else "no OpenMP: the bindings attach no thread pool, so llama.cpp starts "
                 "its threads for every graph and generates slower than its own tools (build with OpenMP, the default)")
    return (f"llama-cpp-python {importlib.metadata.version('llama-cpp-python')}, {build}; on {device}: {layers}, "
            f"{default_threads()} threads, {threading}")


def crash_fix():
    """What to do when a llama.cpp experiment's process died in native code, where the build says why."""
    import llama_cpp

    from quantbench.gguf_files import NO_AMX_BUILD

    if "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode():
        return ("this llama-cpp-python has llama.cpp's AMX kernels, which crash on some machines with AMX (llama.cpp "
                f"issue 20824): rebuild it without them: {NO_AMX_BUILD}=={importlib.metadata.version('llama-cpp-python')}")
    return None


def openmp():
    """Whether the bindings' llama.cpp runs its CPU threads on OpenMP. Without it, and without a thread pool
    attached (llama-cpp-python attaches none; llama.cpp's own tools do), every graph starts and joins its
    threads: a few hundred microseconds a token."""
    import llama_cpp

    return "OPENMP = 1" in llama_cpp.llama_print_system_info().decode()


def default_threads():
    """llama.cpp's threads: one per physical core (half the logical ones past two, as with SMT)."""
    n = os.cpu_count() or 1
    return n if n <= 2 else n // 2


def load(method, checkpoint, *, model_path, device, settings, trust_remote_code=False):
    """(model, tokenizer, info): the method's GGUF in `checkpoint`, the Hugging Face tokenizer of the
    model at `model_path` (whose ids llama.cpp is fed), and what ran (llama.cpp's build and the GGUF's
    tensor types, the threads, the layers offloaded to the GPU)."""
    import llama_cpp
    from transformers import AutoConfig, AutoTokenizer

    from quantbench.methods import METHODS

    path, info = METHODS[method]["load"](str(checkpoint), device=device, **settings)
    if device == "cuda":
        _USED_BEFORE[:] = [_device_used()]
    offload = bool(llama_cpp.llama_supports_gpu_offload())
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = gguf_model(path, gpu_layers=-1 if device == "cuda" and offload else 0,
                       config=AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code))
    # closed before the interpreter tears its modules down (llama-cpp-python's own close then fails loudly)
    atexit.register(lambda: model["llm"] is not None and model["llm"].close())
    _llm(model, 512, logits_all=False)  # the weights loaded (and offloaded) now, as part of the load
    info.update(engine="llama.cpp", device=device, n_gpu_layers=model["gpu_layers"], threads=model["threads"],
                flash_attn=FLASH_ATTENTION, gpu_offload_supported=offload, openmp=openmp(),
                tokenizer_check=tokenizer_check(model, tokenizer))
    return model, tokenizer, info


# Run in a child: llama.cpp aborts the process on a text its vocabulary cannot tokenize.
_TOKENIZE = ("import json, sys; from llama_cpp import Llama; v = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False); "
             "print(json.dumps(v.tokenize(open(sys.argv[2], 'rb').read(), add_bos=False, special=False)))")


def tokenizer_check(model, tokenizer, text=None):
    """Whether the GGUF's own tokenizer (what a llama.cpp user's prompts go through) gives the Hugging Face
    tokenizer's ids on a text (default: Python's pydoc topics), and the first position where not."""
    from pydoc_data.topics import topics

    given = text is not None
    text = text if given else "\n\n".join(topics[k] for k in sorted(topics))[:20000]
    hf = tokenizer(text, add_special_tokens=False).input_ids
    check = {"tokens": len(hf), "text": "given" if given else "pydoc topics (first 20,000 characters)"}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "text.txt").write_text(text)
        r = subprocess.run([sys.executable, "-c", _TOKENIZE, str(model["path"]), str(Path(tmp) / "text.txt")],
                           capture_output=True, text=True)
    if r.returncode != 0:
        reason = failure_line(r.stderr, f"exit code {r.returncode}")
        return {**check, "agrees": False, "first_difference": 0,
                "error": f"llama.cpp's tokenizer of this GGUF fails on the text (exit {r.returncode}): {reason[:200]}"}
    own = json.loads(r.stdout.strip().splitlines()[-1])
    first = next((i for i, (a, b) in enumerate(zip(own, hf)) if a != b), None if len(own) == len(hf) else min(len(own), len(hf)))
    return {**check, "agrees": first is None, "first_difference": first}


def _count(model, logits):
    """Count the positions of `logits` ([positions, vocabulary]) holding a NaN or an infinity (forwards)."""
    if model["seen"] is not None:
        model["seen"]["positions"] += len(logits)
        model["seen"]["nonfinite"] += int((~np.isfinite(logits)).any(-1).sum())


@contextlib.contextmanager
def forwards(model, *, varying_shapes=False):
    """Yields {'positions', 'nonfinite'} counting the scored positions whose logits hold a NaN or an
    infinity in the block (llama.cpp's logits come back through this engine, so it counts them there)."""
    seen = {"positions": 0, "nonfinite": 0}
    model["seen"] = seen
    try:
        yield seen
    finally:
        model["seen"] = None


def _scores(model, ids, n_ctx):
    """The float32 logits of every position of `ids`, one sequence. The cache keeps the sequence scored
    before: where `ids` begins with it (lm-eval's choices of one question share its context), only the
    rest is evaluated, as llama.cpp's server reuses a prompt's prefix."""
    llm = _llm(model, n_ctx, logits_all=True)
    ids = list(map(int, ids))
    keep = 0
    if not (llm._is_recurrent or llm._is_hybrid):  # a recurrent state cannot be cut back to a position
        before = llm.input_ids[:llm.n_tokens]
        keep = next((i for i, (a, b) in enumerate(zip(before, ids)) if a != b), min(len(before), len(ids)))
    llm.reset()
    llm.n_tokens = min(keep, len(ids) - 1)  # eval() drops the cache past n_tokens; one token at least runs
    llm.eval(ids[llm.n_tokens:])
    logits = np.array(llm.scores[:len(ids)], dtype=np.float32)
    _count(model, logits)
    return logits


def logprobs(model, windows, *, first=0, batch_size=1):
    """Per batch of `windows` ([n, T] token ids): the float32 log-probabilities of the next token at
    positions first..T-2, [batch, T-1-first, vocabulary] (llama.cpp scores one window at a time)."""
    for start in range(0, len(windows), batch_size):
        yield torch.stack([torch.log_softmax(torch.from_numpy(_scores(model, w.tolist(), windows.shape[1])[first:-1]), dim=-1)
                           for w in windows[start:start + batch_size]])


def generate(model, tokenizer, prompt, new_tokens):
    """Greedy continuation of `prompt`: (new token ids, text)."""
    ids = tokenizer(prompt).input_ids
    new = _greedy(model, ids, new_tokens)
    return new, tokenizer.decode(new, skip_special_tokens=True)


def _greedy(model, ids, new_tokens, stop=None, eos=None, marks=None):
    """Greedy tokens after `ids`, at most `new_tokens`, ending at `eos` or when `stop(tokens)` says so;
    with `marks`, the clock read as each token is produced."""
    llm = _llm(model, len(ids) + new_tokens, logits_all=False)
    llm.reset()
    llm.eval(list(map(int, ids)))
    out = []
    for _ in range(new_tokens):
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
        _count(model, logits[None])
        token = int(logits.argmax())
        out.append(token)
        if marks is not None:
            marks.append(time.perf_counter())
        if token == eos or (stop and stop(out)):
            break
        llm.eval([token])
    return out


def lm(model, tokenizer, *, batch_size, max_length, max_batch_size):
    """lm-eval's LM for this engine: its TemplateLM with llama.cpp scoring and greedy generation, the
    requests encoded and chat templates applied by lm-eval's HFLM's own methods on the same Hugging Face
    tokenizer (so the transformers and llama.cpp runs score the same tokens of the same prompts)."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

    class LlamaCppLM(TemplateLM):
        # HFLM's: no second start token where a chat template already wrote one, the template's
        # rendering (and its fallback without a system turn), and the name lm-eval's caches key on.
        tok_encode = HFLM.tok_encode
        apply_chat_template = HFLM.apply_chat_template
        tokenizer_name = HFLM.tokenizer_name

        def __init__(self):
            super().__init__()
            self.tokenizer, self.max_length, self.max_gen_toks = tokenizer, max_length, 256
            self.add_bos_token, self.chat_template_args = None, {}  # what HFLM's methods read: its defaults

        @property
        def eot_token_id(self):
            return tokenizer.eos_token_id

        @property
        def prefix_token_id(self):
            return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
            out = []
            for _, context, continuation in requests:
                inp = (context + continuation)[-(max_length + 1):][:-1]
                logits = _scores(model, inp, max_length)[-len(continuation):]
                logp = torch.log_softmax(torch.from_numpy(logits).double(), dim=-1)
                target = torch.tensor(continuation)
                out.append((float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            from lm_eval import utils

            out = []
            for (string,) in (r.args for r in requests):
                windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=max_length,
                    context_len=1))
                out.append(sum(ll for ll, _ in self._loglikelihood_tokens([(None, c, x) for c, x in windows])))
            return out

        def generate_until(self, requests, disable_tqdm=False):
            out = []
            eos = tokenizer.decode([self.eot_token_id])
            for context, gen_kwargs in (r.args for r in requests):
                kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                bound = kwargs.pop("max_gen_toks")
                ids = self.tok_encode(context)[-(max_length - bound):]
                new = _greedy(model, ids, bound, eos=self.eot_token_id,
                              stop=lambda toks: any(u in tokenizer.decode(toks) for u in until))
                out.append(postprocess_generated_text(generation=tokenizer.decode(new), stop=until, think_end_token=None))
            return out

    return LlamaCppLM()


# ---- memory ----

def weight_bytes(model):
    """The GGUF file's bytes: the weights as llama.cpp stores and maps them, quantization scales included."""
    size = Path(model["path"]).stat().st_size
    return {"weight_bytes": size, "gguf_file_bytes": size}


def reset_peak(device):
    """The process's peak resident set size cannot be reset; each experiment is a process of its own."""


def release(device):
    """Nothing to give back: llama.cpp frees its context when closed."""


# The device memory in use before llama.cpp loaded the experiment's GGUF (each experiment is a process
# of its own): what llama.cpp allocates on the GPU is what is in use beyond it.
_USED_BEFORE = []


def _device_used():
    free, total = torch.cuda.mem_get_info()  # the whole device's (cudaMemGetInfo), llama.cpp's buffers included
    return total - free


def resident_bytes(device):
    """None: what llama.cpp holds after the load is its weights and its first context's KV cache and
    compute buffers together (peak_bytes), not what transformers' count means (memory the weights'
    count misses)."""
    return None


def peak_bytes(device):
    """On a GPU, the device memory llama.cpp holds when asked (it allocates its weights, KV cache and
    compute buffers when a context is made, so what it holds during a decode point is that point's peak); on the CPU, the process's maximum
    resident set size (llama.cpp's buffers and the pages of the mapped GGUF it touched)."""
    if device == "cuda" and _USED_BEFORE:
        return {"peak_bytes": _device_used() - _USED_BEFORE[0], "peak_kind": "device memory in use less that before the load (cudaMemGetInfo)"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"peak_bytes": rss, "peak_kind": "process max RSS"}


def input_device(model):
    """Token ids stay on the host: llama.cpp takes them as a list."""
    return "cpu"


def device_name(device):
    return torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else None


def shapes(model):
    """What the roofline needs, from the model's Hugging Face config (the GGUF was converted from it)."""
    c = model["config"]
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    per_layer = c.hidden_size * head_dim * (2 * c.num_attention_heads + 2 * kv_heads) + 3 * c.hidden_size * c.intermediate_size
    return {"layers": c.num_hidden_layers, "heads": c.num_attention_heads, "head_dim": head_dim, "kv_heads": kv_heads,
            "vocab": c.vocab_size, "positions": getattr(c, "max_position_embeddings", None) or 2048,
            "element_bytes": 2,  # llama.cpp's KV cache is float16 unless asked otherwise
            "linear_flops_per_token": 2 * (c.num_hidden_layers * per_layer + c.hidden_size * c.vocab_size)}


# ---- timed prefill and decode ----

def time_prefill(model, input_ids, *, repeats, pad_token_id, attention=None):
    """Seconds of prefill plus the first token from `input_ids` (one sequence), `repeats` times after a warm-up."""
    ids = input_ids[0].tolist()
    _greedy(model, ids, 1)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _greedy(model, ids, 1)
        times.append(time.perf_counter() - t0)
    return times


def _parallel_greedy(model, ids, new_tokens, marks=None):
    """Greedy tokens after each row of `ids` ([B, P]), the B rows decoded together as B sequences of one
    llama.cpp context, as llama.cpp's server and llama-batched-bench run them (llama-cpp-python's `Llama`
    runs one): a prefill of all B prompts, then one llama_decode of B tokens per step. With `marks`,
    the clock read as each step's B tokens are produced."""
    import llama_cpp

    llm = _llm(model, 8, logits_all=False)  # the loaded model; the context below is this call's own
    n, p = len(ids), len(ids[0])
    params = llama_cpp.llama_context_default_params()
    cells = -(-(p + new_tokens + 1) // 256) * 256  # each sequence's share of the cache, in llama.cpp's padding
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = n * cells, n * p, 512, n
    params.n_threads = params.n_threads_batch = model["threads"]
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if FLASH_ATTENTION else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    if not ctx:
        raise RuntimeError(f"llama.cpp could not make a context for {n} sequences of {p + new_tokens} tokens")
    batch = llama_cpp.llama_batch_init(n * p, 0, n)
    vocab = llm.n_vocab()

    def decode(rows):  # rows: (sequence, position, token, wants logits)
        for i, (seq, pos, token, out) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, out
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(rows)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError(f"llama_decode failed on {len(rows)} tokens of {n} sequences")
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(n, vocab))
        _count(model, logits)
        return logits.argmax(-1).tolist()

    try:
        tokens = decode([(s, j, int(t), j == p - 1) for s, row in enumerate(ids) for j, t in enumerate(row)])
        out = [[t] for t in tokens]
        for step in range(1, new_tokens):
            if marks is not None:
                marks.append(time.perf_counter())
            tokens = decode([(s, p + step - 1, t, True) for s, t in enumerate(tokens)])
            for s, t in enumerate(tokens):
                out[s].append(t)
        if marks is not None:
            marks.append(time.perf_counter())
        return out
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


def time_decode(model, input_ids, new_tokens, *, mode, runs, pad_token_id, step=None, attention=None):
    """Seconds of each decode step after the first token, over `runs` runs after a warm-up: one
    sequence through `Llama` (as a llama-cpp-python user decodes), a batch as parallel sequences."""
    ids = input_ids.tolist()

    def run(marks):
        if len(ids) == 1:
            return _greedy(model, ids[0], new_tokens, marks=marks)
        return _parallel_greedy(model, ids, new_tokens, marks=marks)

    run(None)
    steps = []
    for _ in range(runs):
        marks = []
        run(marks)
        steps += [b - a for a, b in zip(marks, marks[1:])]
    return steps


def compile_step(model, device):
    return None


def compiled_settings(device):
    return None


def graph_breaks(since=None):
    return None


def compiled_state(model, device, breaks):
    return {"compiled": False, "why_not_compiled": "llama.cpp has no compiled mode of its own"}


def standard_bench(model, *, n_prompt=512, n_gen=128, repetitions=5):
    """Prompt processing and token generation as llama-bench measures them (pp512, tg128): a prompt of
    `n_prompt` tokens evaluated at once, and `n_gen` tokens evaluated one by one from an empty cache,
    each `repetitions` times after a warm-up; tokens/s mean and standard deviation. Each test has a
    context of its own tokens only, as llama-bench gives it (n_ctx = n_prompt + n_gen): the attention
    of a small model's generation costs a few percent more over a larger cache. The tokens go to
    llama.cpp's llama_decode as llama-bench gives them (llama_batch_get_one over an array made before
    the clock), not through `Llama.eval`, whose Python bookkeeping per call is the bindings' cost, not
    llama.cpp's, and which returns before a GPU is done (it reads no logits unless logits_all)."""
    import ctypes

    import llama_cpp

    rng = np.random.default_rng(0)
    if model["llm"] is not None:  # one context at a time, as llama-bench has
        model["llm"].close()
        model["llm"] = None
    pointer = ctypes.POINTER(llama_cpp.llama_token)

    def decode(ctx, tokens, n):
        code = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tokens, n))
        if code != 0:
            raise RuntimeError(f"llama_decode failed (code {code}) in the pp/tg benchmark")

    def rate(llm, n, whole):
        tokens = (llama_cpp.llama_token * n)(*(int(t) for t in rng.integers(0, llm.n_vocab(), n)))
        each = [] if whole else [ctypes.cast(ctypes.addressof(tokens) + i * ctypes.sizeof(llama_cpp.llama_token), pointer)
                                 for i in range(n)]
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), False)
        t0 = time.perf_counter()
        if whole:  # waiting for the device where llama-bench does: after the prompt, after each token
            decode(llm.ctx, tokens, n)
            llama_cpp.llama_synchronize(llm.ctx)
        else:
            for one in each:
                decode(llm.ctx, one, 1)
                llama_cpp.llama_synchronize(llm.ctx)
        return n / (time.perf_counter() - t0)

    out = {"threads": model["threads"], "n_gpu_layers": model["gpu_layers"], "repetitions": repetitions}
    for name, n, whole in [(f"pp{n_prompt}", n_prompt, True), (f"tg{n_gen}", n_gen, False)]:
        llm = _context(model, n, logits_all=False)
        try:
            rate(llm, n, whole)
            rates = [rate(llm, n, whole) for _ in range(repetitions)]
        finally:
            llm.close()
        out[name] = {"tok_s": statistics.fmean(rates), "tok_s_stdev": statistics.stdev(rates) if len(rates) > 1 else 0.0,
                     "tok_s_samples": rates, "n_ctx": n, "n_batch": llm.n_batch}
    return out
