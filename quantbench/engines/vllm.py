"""The vLLM engine: a method's saved checkpoint served by vLLM's `LLM` (through lm-eval's own vLLM model,
so tasks, scoring and timing share one engine), measured on the same token ids as the other engines.

    model, tokenizer, info = load("gptq-w4g128", checkpoint, model_path=path, device="cuda", settings={})
    ppl, how = perplexity(model, tokenizer, text, window=2048, max_tokens=16384, dtype="float16")
    summary, used = kld(model, reference_folder, dtype="float16")

It gives the functions every engine gives (engines/transformers.py names them) but `logprobs`: vLLM
returns log-probabilities of a prompt's tokens, not logits, per position the prompt's own next token
and the `k` most likely ones (`SamplingParams(prompt_logprobs=k, flat_logprobs=True)`). The whole
vocabulary (`prompt_logprobs=-1`) comes back as Python floats, vocabulary x positions of them, which is
what makes it slow. So perplexity is computed from the prompt tokens' own log-probabilities (exact), and
the KL divergence from the run's reference (the baseline's full log-probabilities, quality.py) from the
method's top `k`, with the bound the missing mass puts on it:

    KL(p || q) = sum over S of p log(p / q)  +  sum outside S of p log(p / q)
              >= sum over S of p log(p / q)  +  P log(P / Q)

where S holds the tokens vLLM returned, P = 1 - p(S) and Q = 1 - q(S) are the mass the reference and the
method put outside S, and the inequality is the log-sum inequality (equal when q is proportional to p
outside S). It is a lower bound, and the estimate quantbench reports with P and Q beside it: there is no
upper bound, since q may put almost nothing on a token p likes.

    top = flat_arrays(output.prompt_logprobs, k)           # what vLLM gave for one window
    per_token = kld_lower_bound(reference_logprobs, top["ids"], top["logprobs"])

Everything else of the KLD summary (the top token's agreement, the change in the next token's
probability, the perplexity ratio) is exact: vLLM returns the prompt token's own log-probability and
the most likely token's (compare_to_reference).

vLLM decodes as it serves, with the model torch.compile'd and the decode batches in CUDA graphs (its
defaults): its speed is recorded as the "compiled" mode, timed by `vllm bench latency`'s protocol.
"""
import contextlib
import importlib.metadata
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from quantbench import quality
from quantbench.engines import llamacpp

# float32 log-probabilities sum to 1 within about this much: a missing mass below it is rounding
MASS_RESOLUTION = 1e-6
# The tokens a position returns for the KLD's bound: their mass covers all but a small tail of a 4-bit
# model's next-token distribution, at about a megabyte of floats per 4080 scored tokens.
KLD_TOP_K = 256
# Positions vLLM is opened with (the model's, where fewer): the longest of the default perplexity window,
# prompt lengths and --long-context 8192; its KV cache pool must hold one sequence of it.
MAX_MODEL_LEN = 8192
EAGER_ATTENTION = "vLLM's attention backend (its choice for the card)"
DECODE_MODES = ("compiled",)  # vLLM's own: torch.compile and CUDA graphs, as it serves
shapes = llamacpp.shapes  # from the Hugging Face config, with a 16-bit KV cache as vLLM's default is


def about(device):
    """What this engine is on this machine, for `quantbench methods`."""
    from quantbench.methods import VLLM_FAMILIES

    problem = why_not_runnable(device)
    here = f"not usable here: {problem[0]} ({problem[1]})" if problem else f"vLLM {importlib.metadata.version('vllm')}"
    return f"{here}; --engines vllm runs the methods of these families again in it: {', '.join(VLLM_FAMILIES)}"


def why_not_runnable(device):
    """None where vLLM can run on `device`, else (reason, fix)."""
    if device != "cuda":
        return ("vLLM runs on a CUDA GPU and this run is on the CPU", "run it on a machine with an NVIDIA GPU")
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return ("the Python package vllm is not installed", "pip install vllm==0.26.0 (its own environment: docs/gpu.md)")
    return None


def open_llm(checkpoint, *, dtype, max_model_len, k, tokenizer=None, gpu_memory_utilization=0.9, enforce_eager=False):
    """(lm-eval's vLLM model on a checkpoint folder, what vLLM chose): its `.model` is the vLLM `LLM`, opened
    as `vllm serve` opens the folder (the format from its config, the kernels vLLM's choice, its default
    share of the GPU's memory), so tasks, scoring and timing share one engine. Prefix caching off, so every
    window is computed; `k`: the top log-probabilities a prompt position may return."""
    # apply_model sends a function to vLLM's worker process, which vLLM refuses to unpickle unless allowed
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from lm_eval.models.vllm_causallms import VLLM

    lm = VLLM(pretrained=str(checkpoint), tokenizer=tokenizer and str(tokenizer), dtype=dtype, max_model_len=max_model_len,
              max_logprobs=k, seed=0, gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
              enable_prefix_caching=False)
    llm = lm.model
    return lm, {"quantization": llm.llm_engine.model_config.quantization, **llm.apply_model(_quant_methods)[0]}


def load(method, checkpoint, *, model_path, device, settings, trust_remote_code=False):
    """(model, tokenizer, info): the method's checkpoint folder (the run's model for a float method, the
    quantized one from the cache, or the folder a checkpoint method names) served by vLLM, in the dtype
    the method says (a quantized checkpoint's own: "auto"), with the Hugging Face tokenizer of the model at
    `model_path`; what vLLM chose (its quantization method, the classes of its layers' quantization methods and
    of the kernels they run)."""
    from transformers import AutoConfig, AutoTokenizer

    from quantbench.methods import METHODS, checkpoint_folder

    folder = checkpoint_folder(settings["source"]) if METHODS[method]["family"] == "checkpoint" else checkpoint
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    max_len = min(getattr(config, "max_position_embeddings", None) or MAX_MODEL_LEN, MAX_MODEL_LEN)
    _USED_BEFORE[:] = [_device_used()]
    lm, chose = open_llm(folder, dtype=settings.get("dtype", "auto"), max_model_len=max_len, k=KLD_TOP_K,
                         tokenizer=model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    engine_config = lm.model.llm_engine.vllm_config
    info = {"engine": "vllm", "device": device, "vllm": importlib.metadata.version("vllm"), **chose,
            "compute_dtype": str(engine_config.model_config.dtype).removeprefix("torch."), "checkpoint": str(folder),
            "max_model_len": max_len, "top_k_logprobs": KLD_TOP_K,
            "gpu_memory_utilization": engine_config.cache_config.gpu_memory_utilization,
            "enforce_eager": engine_config.model_config.enforce_eager, "prefix_caching": False}
    return {"lm": lm, "llm": lm.model, "config": config, "seen": None, "checkpoint": folder, "max_model_len": max_len}, \
        tokenizer, info


# Where vLLM 0.26's linear methods, and the compressed-tensors schemes its method hands a layer to, keep the
# kernel they chose: one method (AutoGPTQLinearMethod) runs Machete on Hopper and Marlin elsewhere.
KERNEL_ATTRIBUTES = ("kernel", "fp8_linear", "linear_kernel")


def _quant_methods(model):
    """The classes of the quantization methods vLLM put on the model's layers (e.g. AutoGPTQLinearMethod), and
    of the kernels they chose (e.g. MacheteLinearKernel; for torchao, the weights' tensor class)."""
    methods, kernels = set(), set()
    for m in model.modules():
        if getattr(m, "quant_method", None) is None:
            continue
        methods.add(type(m.quant_method).__name__)
        held = [getattr(h, a, None) for h in (m.quant_method, getattr(m, "scheme", None)) for a in KERNEL_ATTRIBUTES]
        kernels.update(type(k).__name__ for k in held if k is not None)
        if type(getattr(m, "weight", None)).__module__.startswith("torchao"):
            kernels.add(type(m.weight).__name__)
    return {"quant_methods": sorted(methods), "kernels": sorted(kernels)}


def prompt_logprobs(llm, windows, k):
    """flat_arrays of each token window (lists of token ids), scored in one `generate` so vLLM batches them."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=k, flat_logprobs=True, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=[int(t) for t in w]) for w in windows], params, use_tqdm=False)
    return [flat_arrays(o.prompt_logprobs, k) for o in outputs]


def time_generate(llm, *, batch_size, input_len, output_len, warmup=5, iters=15, seed=0):
    """timed_generations of `batch_size` random prompts of `input_len` tokens (ids below 10000, as `vllm bench
    latency` draws them), so read_latency reads both alike: {'latencies': seconds of each timed one}."""
    ids = np.random.default_rng(seed).integers(10000, size=(batch_size, input_len)).tolist()
    return {"latencies": timed_generations(llm, ids, output_len, warmup=warmup, iters=iters)}


def timed_generations(llm, ids, output_len, *, warmup, iters):
    """Seconds of each of `iters` generations from the prompts `ids` (lists of token ids) to `output_len` new
    tokens each, after `warmup` untimed: `vllm bench latency`'s protocol in this process (sampling at
    temperature 1, EOS ignored, no detokenizing). `generate` returns when every sequence is done, so the
    clock needs no device synchronisation of its own."""
    from vllm import SamplingParams, TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=row) for row in ids]
    params = SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=output_len, detokenize=False)
    times = []
    for _ in range(warmup + iters):
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t)
    return times[warmup:]


def flat_arrays(prompt_logprobs, k):
    """vLLM's prompt log-probabilities of one prompt of T tokens (a FlatLogprobs, or the list of T
    {token id: Logprob} it stands for; position 0 is None, as nothing predicts the first token) as arrays
    of T - 1 rows, row t about token t + 1: 'target' the log-probability of the prompt's own token, 'ids'
    and 'logprobs' [T - 1, k + 1] those of the tokens returned, the prompt's own first, then the top `k`."""
    if hasattr(prompt_logprobs, "start_indices"):  # flat: one list per field, positions by start and end
        starts, ends = prompt_logprobs.start_indices[1:], prompt_logprobs.end_indices[1:]
        ids, values = np.asarray(prompt_logprobs.token_ids), np.asarray(prompt_logprobs.logprobs, dtype=np.float64)
        rows = [(ids[a:b], values[a:b]) for a, b in zip(starts, ends)]
    else:
        rows = [(np.fromiter(d.keys(), dtype=np.int64, count=len(d)), np.array([v.logprob for v in d.values()]))
                for d in prompt_logprobs[1:]]
    width = k + 1
    if any(len(i) not in (k, width) for i, _ in rows):  # k when the prompt's token is itself in the top k
        raise ValueError(f"expected {k} or {width} log-probabilities a position (prompt_logprobs={k})")
    # a row of k repeats its first entry (the prompt's token, also among the top k) to keep one width
    ids = np.stack([np.resize(i, width) if len(i) == k else i for i, _ in rows])
    logprobs = np.stack([np.resize(v, width) if len(v) == k else v for _, v in rows])
    return {"target": logprobs[:, 0], "ids": ids, "logprobs": logprobs}


def kld_lower_bound(reference, ids, logprobs):
    """Per position, the lower bound above on KL(reference || method) and the masses outside the returned
    tokens: reference [n, V] the baseline's log-probabilities; ids, logprobs [n, m] the method's for m
    tokens a position (repeats allowed). In float64: {'kld', 'reference_outside', 'method_outside'}, [n] each."""
    p_log = torch.as_tensor(reference).double()
    ids = torch.as_tensor(ids, dtype=torch.long)
    q_log = torch.full_like(p_log, float("nan")).scatter_(1, ids, torch.as_tensor(logprobs).double())
    inside = torch.zeros_like(p_log, dtype=torch.bool).scatter_(1, ids, True)
    p = p_log.exp()
    known = torch.where(inside, p * (p_log - q_log), 0).sum(1)
    # the reference's outside mass summed, not 1 - p(S): its stored float16 rounding does not sum to 1
    p_out = torch.where(inside, 0, p).sum(1)
    q_out = (1 - torch.where(inside, q_log.exp(), 0).sum(1)).clamp(min=MASS_RESOLUTION)
    rest = torch.where(p_out > 0, p_out * (p_out.clamp(min=1e-300).log() - q_out.log()), 0)
    return {"kld": known + rest, "reference_outside": p_out, "method_outside": q_out}


# vLLM's own benchmarks, run as its users run them (`vllm bench latency|throughput|serve`, a process each),
# and what their JSON files say in quantbench's units: the reference quantbench's vLLM speed is checked
# against (docs/protocols.md, "vLLM's own benchmarks"). Field names: vllm/benchmarks/*.py of vLLM 0.26.0.
# VLLM_CLI is what the `vllm` console script runs, started by this interpreter, which finds the vLLM it
# imports also where the script is not on PATH (a package installed with --target).
VLLM_CLI = [sys.executable, "-m", "vllm.entrypoints.cli.main"]

def latency_command(model, out_json, *, batch_size, input_len, output_len, dtype, warmup=5, iters=15, max_model_len=None):
    """`vllm bench latency`: `iters` timed generations of `batch_size` random prompts of `input_len`
    tokens, `output_len` new tokens each (EOS ignored), after `warmup` untimed ones; prefix caching off,
    its default there, so every prompt is computed. `max_model_len`: the positions vLLM is opened with
    (default input_len + output_len)."""
    return [*VLLM_CLI, "bench", "latency", "--model", str(model), "--dtype", dtype, "--batch-size", str(batch_size),
            "--input-len", str(input_len), "--output-len", str(output_len), "--num-iters-warmup", str(warmup),
            "--num-iters", str(iters), "--max-model-len", str(max_model_len or input_len + output_len),
            "--disable-detokenize", "--output-json", str(out_json)]


def throughput_command(model, out_json, *, batch_size, input_len, output_len, dtype, num_prompts, max_model_len=None):
    """`vllm bench throughput` on random prompts with at most `batch_size` sequences in flight, after
    `batch_size` warm-up requests."""
    return [*VLLM_CLI, "bench", "throughput", "--model", str(model), "--dtype", dtype, "--dataset-name", "random",
            "--input-len", str(input_len), "--output-len", str(output_len), "--num-prompts", str(num_prompts),
            "--max-num-seqs", str(batch_size), "--num-warmups", str(batch_size),
            "--max-model-len", str(max_model_len or input_len + output_len), "--output-json", str(out_json)]


def server_command(model, *, port, dtype, max_model_len):
    """`vllm serve` of `model` on localhost:`port`, as its users start it (vLLM's defaults otherwise)."""
    return [*VLLM_CLI, "serve", str(model), "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
            "--max-model-len", str(max_model_len)]


def serve_command(model, result_dir, result_name, *, request_rate, input_len, output_len, num_prompts, port):
    """`vllm bench serve` against a `vllm serve` of `model` on localhost:`port`: random prompts arriving
    as a Poisson process of `request_rate` a second; TTFT and TPOT at the 50th, 90th and 99th percentiles."""
    return [*VLLM_CLI, "bench", "serve", "--backend", "vllm", "--model", str(model), "--host", "127.0.0.1",
            "--port", str(port), "--dataset-name", "random", "--random-input-len", str(input_len),
            "--random-output-len", str(output_len), "--num-prompts", str(num_prompts), "--request-rate",
            str(request_rate), "--ignore-eos", "--percentile-metrics", "ttft,tpot", "--metric-percentiles", "50,90,99",
            "--save-result", "--result-dir", str(result_dir), "--result-filename", result_name]


def read_latency(one_token, many_tokens, *, batch_size, output_len):
    """Prefill and decode from two `vllm bench latency` results of the same batch and prompts, one with one
    new token (the time to the first token) and one with `output_len`: a decode step is the difference of
    their median latencies over the `output_len - 1` extra steps. In ms and tokens/s."""
    first, whole = float(np.median(one_token["latencies"])), float(np.median(many_tokens["latencies"]))
    if output_len < 2 or whole <= first:
        raise ValueError(f"no decode time: {output_len} new tokens took {whole:.4f} s against {first:.4f} s for one")
    step = (whole - first) / (output_len - 1)
    return {"ttft_ms": 1e3 * first, "time_per_output_token_ms": 1e3 * step, "decode_tokens_per_s": batch_size / step,
            "iterations": [len(one_token["latencies"]), len(many_tokens["latencies"])]}


def read_throughput(result, *, output_len):
    """`vllm bench throughput`'s result: requests and tokens a second, prompt and output tokens counted
    together as it reports them, and the output tokens alone (each request makes `output_len`)."""
    return {"requests_per_s": result["requests_per_second"], "total_tokens_per_s": result["tokens_per_second"],
            "output_tokens_per_s": result["num_requests"] * output_len / result["elapsed_time"]}


def read_serve(result):
    """`vllm bench serve`'s saved result: the request rate, completed and failed requests, output tokens
    a second, and TTFT and TPOT in ms (mean, median and each saved percentile)."""
    metrics = {m: {k[:-len(f"_{m}_ms")]: v for k, v in result.items() if k.endswith(f"_{m}_ms") and k != f"std_{m}_ms"}
               for m in ("ttft", "tpot")}
    return {"request_rate": result["request_rate"], "completed": result["completed"], "failed": result.get("failed", 0),
            "output_tokens_per_s": result["output_throughput"], "ttft_ms": metrics["ttft"], "tpot_ms": metrics["tpot"]}


# In each vLLM experiment, vLLM's own benchmarks on the sweep's settings: `vllm bench latency`'s warm-up and timed
# generations (its defaults are 10 and 30; fewer, as each figure starts vLLM afresh), which quantbench's own vLLM
# points also take at the least; requests of each `vllm bench throughput` per sequence in flight; the seconds of
# arrivals a serving rate is measured over (at least SERVE_MIN_PROMPTS requests); seconds one benchmark may take.
BENCH_WARMUP, BENCH_ITERS = 3, 10
THROUGHPUT_REQUESTS_PER_SEQ = 4
SERVE_SECONDS, SERVE_MIN_PROMPTS = 10, 20
BENCH_TIMEOUT_S = 600


def own_benchmarks(model, keep, *, which, prompt_length, prompt_tokens, new_tokens, batch_sizes, serve_rates, dtype):
    """vLLM's own figures for the experiment's checkpoint, each `vllm bench` a process of its own as its users
    run it, after this process's vLLM is shut down (each wants the same share of the GPU), with the positions
    this experiment's vLLM had (`which`: those of the first two to run):
    - latency at batch 1 (`vllm bench latency`): TTFT at `prompt_length` tokens (the sweep's first prefill
      point), and decode from `prompt_tokens`-token prompts to `new_tokens` (read_latency): what quantbench
      measured itself in this process, as its check;
    - throughput at each of `batch_sizes` (`vllm bench throughput`, offline, at most b sequences in flight);
    - serving at each of `serve_rates` requests a second (`vllm bench serve` against one `vllm serve`).
    A benchmark that fails is recorded with the end of its output; the others still run. Each one's JSON and
    log are kept in the folder `keep` (vLLM's own record: its settings, every iteration's latency)."""
    try:
        model["llm"].llm_engine.engine_core.shutdown()
    except Exception as e:  # noqa: BLE001 - the experiment's own figures stand; vLLM's cannot follow
        return {"status": "failed", "error": f"this experiment's vLLM did not shut down: {type(e).__name__}: {e}"}
    model["llm"] = model["lm"] = None
    folder, positions, keep = model["checkpoint"], model["max_model_len"], Path(keep)
    keep.mkdir(parents=True, exist_ok=True)
    out = {"status": "ok", "vllm": importlib.metadata.version("vllm"), "checkpoint": str(folder), "dtype": dtype,
           "max_model_len": positions, "warmup": BENCH_WARMUP, "iters": BENCH_ITERS,
           "files": keep.name, "latency": {}, "throughput": {}, "serve": {}}

    def latency(input_len, output_len):
        path = keep / f"latency-{input_len}-{output_len}.json"
        return run_bench(latency_command(folder, path, batch_size=1, input_len=input_len, output_len=output_len,
                                         dtype=dtype, warmup=BENCH_WARMUP, iters=BENCH_ITERS, max_model_len=positions), path)

    def latency_point():
        ttft = float(np.median(latency(prompt_length, 1)["latencies"])) * 1e3
        decode = read_latency(latency(prompt_tokens, 1), latency(prompt_tokens, new_tokens), batch_size=1,
                              output_len=new_tokens)
        return {"batch_size": 1, "prefill": {str(prompt_length): {"ttft_ms": ttft}},
                "decode": {"input_len": prompt_tokens, "output_len": new_tokens, **decode}}

    if "latency" in which:
        out["latency"] = _recorded(latency_point)
    for b in batch_sizes if "throughput" in which else []:
        def throughput(b=b):
            path, requests = keep / f"throughput-{b}.json", THROUGHPUT_REQUESTS_PER_SEQ * b
            result = run_bench(throughput_command(folder, path, batch_size=b, input_len=prompt_tokens,
                                                  output_len=new_tokens, dtype=dtype, num_prompts=requests,
                                                  max_model_len=positions), path)
            return {"num_prompts": requests, "input_len": prompt_tokens, "output_len": new_tokens,
                    **read_throughput(result, output_len=new_tokens)}
        out["throughput"][str(b)] = _recorded(throughput)
    if serve_rates:
        out["serve"] = _serving(folder, keep, rates=serve_rates, input_len=prompt_tokens, output_len=new_tokens,
                                dtype=dtype, max_model_len=positions)
    return out


def _serving(folder, keep, *, rates, input_len, output_len, dtype, max_model_len):
    """{rate: read_serve of `vllm bench serve` at it}, against one `vllm serve` started here and stopped after."""
    port = _free_port()
    log = keep / "serve.log"
    with open(log, "w") as sink:
        server = subprocess.Popen(server_command(folder, port=port, dtype=dtype, max_model_len=max_model_len),
                                  stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ready = _recorded(lambda: _wait_ready(server, port, log))
        if ready["status"] != "ok":
            return {str(r): ready for r in rates}
        out = {}
        for rate in rates:
            def serve(rate=rate):
                name, prompts = f"serve-{rate}.json", max(SERVE_MIN_PROMPTS, rate * SERVE_SECONDS)
                result = run_bench(serve_command(folder, keep, name, request_rate=rate, input_len=input_len,
                                                 output_len=output_len, num_prompts=prompts, port=port), keep / name)
                return {"num_prompts": prompts, "input_len": input_len, "output_len": output_len, **read_serve(result)}
            out[str(rate)] = _recorded(serve)
        return out
    finally:
        _stop(server)


def _recorded(measure):
    """{'status': 'ok', ...what `measure` returned}, or 'failed' with the error: one benchmark's failure is its own."""
    try:
        return {"status": "ok", **measure()}
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        return {"status": "failed", "error": str(e)[-2000:]}


def run_bench(command, out_json):
    """Run one `vllm bench` command that writes `out_json` (a process group of its own: vLLM starts its engine
    as a child) to its end, and read that file; a non-zero exit or BENCH_TIMEOUT_S is a RuntimeError with the
    end of its output (kept beside `out_json`)."""
    out_json = Path(out_json)
    log = out_json.with_suffix(".log")
    with open(log, "w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = process.wait(timeout=BENCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        code = f"no end after {BENCH_TIMEOUT_S} s"
    finally:
        _stop(process)
    if code != 0:
        raise RuntimeError(f"{' '.join(command[3:6])} failed ({code}): {_tail(log)}")
    return json.loads(out_json.read_text())


def _wait_ready(server, port, log, timeout=BENCH_TIMEOUT_S):
    """{'start_s'}: once `vllm serve` answers /health; a RuntimeError with its log's end if it exits or times out."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if server.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
                if reply.status == 200:
                    return {"start_s": round(time.perf_counter() - start, 1)}
        except OSError:  # not listening yet
            time.sleep(1)
    raise RuntimeError(f"vllm serve did not become ready (exit code {server.poll()}): {_tail(log)}")


def _tail(log):
    return "\n".join(log.read_text(errors="replace").splitlines()[-15:])


def _stop(process):
    """End a process and its group (vLLM's engine process with it): SIGINT, then SIGKILL to what is left."""
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:  # the group is gone
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=wait)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compare_to_reference(scored, folder):
    """(the KLD summary of quality.kld_statistics with its mean a lower bound, how it was measured) of the
    method whose flat_arrays for each of the reference's chunks are `scored`, against the baseline's
    reference in `folder` (quality.write_reference: positions n_ctx // 2 .. n_ctx - 2 of each chunk)."""
    info, base, saved = quality.read_reference(folder)
    first = saved["chunks"].shape[1] // 2
    if len(scored) != len(saved["chunks"]):
        raise ValueError(f"{len(scored)} chunks scored, the reference has {len(saved['chunks'])}")
    parts, same_top, target, row = [], [], [], 0
    for top in scored:
        # unrounded: the mass outside the returned tokens is 1 less theirs, which float16 would blur
        ids, logprobs = top["ids"][first:], top["logprobs"][first:]
        n = len(ids)
        parts.append(kld_lower_bound(np.array(base[row:row + n], dtype=np.float64), ids, logprobs))
        same_top.append(ids[np.arange(n), logprobs.argmax(1)] == saved["top1"][row:row + n])
        target.append(top["target"][first:])
        row += n
    kld = {key: torch.cat([p[key] for p in parts]).numpy() for key in parts[0]}
    stats = quality.kld_statistics(kld["kld"], np.concatenate(same_top), np.concatenate(target),
                                   saved["logp_target"].astype(np.float64))
    stats.update({"kld_is_lower_bound": True, "top_k": int(scored[0]["ids"].shape[1] - 1),
                  "reference_outside_mean": float(kld["reference_outside"].mean()),
                  "method_outside_mean": float(kld["method_outside"].mean()),
                  "method_outside_max": float(kld["method_outside"].max())})
    return stats, quality.reference_used(info)


# ---- the engine's functions (engines/transformers.py names them) ----

def perplexity(model, tokenizer, text, *, window, max_tokens=None, dtype):
    """quality.perplexity's protocol on the same windows, from vLLM's log-probability of each prompt token."""
    windows, corpus_tokens = quality.perplexity_windows(tokenizer, text, window=window, max_tokens=max_tokens)
    with quality.finite_logits(sys.modules[__name__], model, "perplexity", dtype):
        scored = _scored(model, windows.tolist(), 0)
    nll = -sum(float(top["target"].sum()) for top in scored)
    return quality.perplexity_of(nll, windows, corpus_tokens, dtype)


def kld(model, folder, *, dtype):
    """compare_to_reference of the method's top KLD_TOP_K log-probabilities on the chunks of the reference in
    `folder`: (the KLD summary, its mean a lower bound; how it was measured)."""
    _, _, saved = quality.read_reference(folder)
    with quality.finite_logits(sys.modules[__name__], model, "kld", dtype):
        scored = _scored(model, saved["chunks"].tolist(), KLD_TOP_K)
    stats, used = compare_to_reference(scored, folder)
    quality.check_finite("kld", stats, dtype)
    return stats, {**used, "how": f"vLLM's prompt log-probabilities: the KLD a lower bound from the top {KLD_TOP_K} a "
                   "position (log-sum inequality), the other statistics exact"}


def _scored(model, windows, k):
    """prompt_logprobs of `windows`, their non-finite log-probabilities counted as forwards' logits are."""
    scored = prompt_logprobs(model["llm"], windows, k)
    if model["seen"] is not None:
        for top in scored:
            model["seen"]["positions"] += len(top["target"])
            model["seen"]["nonfinite"] += int((~np.isfinite(top["logprobs"])).any(-1).sum())
    return scored


@contextlib.contextmanager
def forwards(model, *, varying_shapes=False):
    """Yields {'positions', 'nonfinite'}: the positions scored in the block whose returned log-probabilities
    hold a NaN or an infinity (vLLM returns no logits)."""
    model["seen"] = {"positions": 0, "nonfinite": 0}
    try:
        yield model["seen"]
    finally:
        model["seen"] = None


def generate(model, tokenizer, prompt, new_tokens):
    """Greedy continuation of `prompt`: (new token ids, text)."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, logprobs=0, detokenize=False)
    out = model["llm"].generate([TokensPrompt(prompt_token_ids=tokenizer(prompt).input_ids)], params, use_tqdm=False)[0]
    new = list(out.outputs[0].token_ids)
    if model["seen"] is not None:  # the chosen token's log-probability at each step
        values = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs or [], new)]
        model["seen"]["positions"] += len(values)
        model["seen"]["nonfinite"] += sum(not np.isfinite(v) for v in values)
    return new, tokenizer.decode(new, skip_special_tokens=True)


def lm(model, tokenizer, *, batch_size, max_length, max_batch_size):
    """lm-eval's VLLM opened at load: vLLM schedules the requests itself (lm-eval's batch size "auto"); its
    contexts are cut at the run's `max_length`, as the transformers engine's are."""
    model["lm"]._max_length = max_length  # VLLM keeps the length it truncates to here (max_model_len by default)
    return model["lm"]


# ---- memory ----

def weight_bytes(model):
    """The bytes of the parameters of the model vLLM runs (its worker's module: the weights as its kernels take
    them after any repacking, quantization scales included, which vLLM keeps as parameters); its buffers apart:
    mostly the rotary cos/sin cache it precomputes for every position the config allows (transformers keeps
    only the 1/2 head-size frequencies and computes the rest per step)."""
    return model["llm"].apply_model(_held_bytes)[0]


def _held_bytes(module):
    return {"weight_bytes": sum(p.numel() * p.element_size() for p in module.parameters()),
            "buffer_bytes": sum(b.numel() * b.element_size() for b in module.buffers())}


def reset_peak(device):
    """vLLM allocates its share of the GPU when it starts (weights, activations and a KV cache pool filling
    the rest of gpu_memory_utilization): there is no peak to reset."""


def release(device):
    """Nothing to give back between phases."""


_USED_BEFORE = []  # the device memory in use before vLLM started (each experiment is a process of its own)


def _device_used():
    """The whole device's memory in use, as NVML counts it (vLLM's worker is another process), read without
    initialising CUDA here: vLLM starts its worker by fork only from a process that has not."""
    import pynvml

    pynvml.nvmlInit()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    index = int(visible) if visible.isdigit() else 0
    return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used


def resident_bytes(device):
    """None: what vLLM holds is its whole share of the GPU (peak_bytes), its KV cache pool included."""
    return None


def peak_bytes(device):
    """The device memory in use beyond what was before vLLM started: its share of the GPU, set when it starts."""
    return {"peak_bytes": _device_used() - _USED_BEFORE[0],
            "peak_kind": "device memory in use less that before vLLM started (NVML): vLLM's whole share of the GPU"}


def input_device(model):
    """Token ids stay on the host: vLLM takes them as lists."""
    return "cpu"


def device_name(device):
    return torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else None


# ---- timed prefill and decode: `vllm bench latency`'s protocol (timed_generations) ----

def time_prefill(model, input_ids, *, repeats, pad_token_id, attention=None):
    """Seconds of prefill plus the first token from `input_ids` (one sequence): `repeats` times, at least
    BENCH_ITERS (a TTFT is milliseconds), after BENCH_WARMUP, as own_benchmarks' `vllm bench latency`."""
    return timed_generations(model["llm"], input_ids.tolist(), 1, warmup=BENCH_WARMUP, iters=max(repeats, BENCH_ITERS))


def time_decode(model, input_ids, new_tokens, *, mode, runs, pad_token_id, step=None, attention=None):
    """Seconds per decode step after the first token, one sample per run: (the run's time to `new_tokens`
    tokens less the median time to one) / (new_tokens - 1), as read_latency reads vllm bench latency's two
    runs; vLLM returns a batch when every sequence is done, so a step's own time is not seen, and a run
    gives one sample where transformers' gives one per step: `runs`, at least BENCH_ITERS, after BENCH_WARMUP."""
    ids, iters = input_ids.tolist(), max(runs, BENCH_ITERS)
    first = statistics.median(timed_generations(model["llm"], ids, 1, warmup=BENCH_WARMUP, iters=iters))
    return [(t - first) / (new_tokens - 1)
            for t in timed_generations(model["llm"], ids, new_tokens, warmup=BENCH_WARMUP, iters=iters)]


def compile_step(model, device):
    return None  # vLLM compiled the model when it started


def compiled_settings(device):
    return {"vllm": "torch.compile of the model and CUDA graphs of the decode batches, vLLM's defaults"}


def graph_breaks(since=None):
    return None


def compiled_state(model, device, breaks):
    config = model["llm"].llm_engine.vllm_config.compilation_config
    return {"compiled": True, "how": "vLLM's own (its defaults)", "cudagraph_mode": str(config.cudagraph_mode)}


def standard_bench(model):
    return None  # vLLM's own benchmarks run as processes of their own, after the sweep: own_benchmarks
