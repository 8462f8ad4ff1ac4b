"""The vLLM engine's scoring, the part of it that needs no GPU (the engine's load and its measurements,
issue 24, run on the GPU machine only).

vLLM returns log-probabilities of a prompt's tokens, not logits: per position the prompt's own next
token and the `k` most likely ones (`SamplingParams(prompt_logprobs=k, flat_logprobs=True)`). The whole
vocabulary (`prompt_logprobs=-1`) comes back as Python floats, vocabulary x positions of them, which is
what makes it slow. So the KL divergence from the run's reference (the baseline's full log-probabilities,
quality.py) is computed from the method's top `k`, with the bound the missing mass puts on it:

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
"""
import os
import time

import numpy as np
import torch

from quantbench import quality

# float32 log-probabilities sum to 1 within about this much: a missing mass below it is rounding
MASS_RESOLUTION = 1e-6


def load(checkpoint, *, dtype, max_model_len, k, gpu_memory_utilization=0.4, enforce_eager=False):
    """(lm-eval's vLLM model on a checkpoint folder, what vLLM chose): its `.model` is the vLLM `LLM`, opened
    as `vllm serve` opens the folder (the format from its config, the kernels vLLM's choice), so tasks,
    scoring and timing share one engine. Prefix caching off, so every window is computed; `k`: the top
    log-probabilities a prompt position may return."""
    # apply_model sends a function to vLLM's worker process, which vLLM refuses to unpickle unless allowed
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from lm_eval.models.vllm_causallms import VLLM

    lm = VLLM(pretrained=str(checkpoint), dtype=dtype, max_model_len=max_model_len, max_logprobs=k, seed=0,
              gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager, enable_prefix_caching=False)
    llm = lm.model
    return lm, {"quantization": llm.llm_engine.model_config.quantization, "linear_methods": llm.apply_model(_linear_methods)[0]}


def _linear_methods(model):
    """The classes of the quantization methods vLLM put on the model's layers (e.g. GPTQMarlinLinearMethod)."""
    return sorted({type(m.quant_method).__name__ for m in model.modules() if getattr(m, "quant_method", None) is not None})


def prompt_logprobs(llm, windows, k):
    """flat_arrays of each token window (lists of token ids), scored in one `generate` so vLLM batches them."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=k, flat_logprobs=True, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=[int(t) for t in w]) for w in windows], params, use_tqdm=False)
    return [flat_arrays(o.prompt_logprobs, k) for o in outputs]


def time_generate(llm, *, batch_size, input_len, output_len, warmup=5, iters=15, seed=0):
    """Seconds of each of `iters` generations of `batch_size` random prompts of `input_len` tokens to
    `output_len` new tokens each, after `warmup` untimed: `vllm bench latency`'s protocol in this process
    (its random ids below 10000, EOS ignored, no detokenizing), so read_latency reads both alike. `generate`
    returns when every sequence is done, so the clock needs no device synchronisation of its own."""
    from vllm import SamplingParams, TokensPrompt

    ids = np.random.default_rng(seed).integers(10000, size=(batch_size, input_len)).tolist()
    prompts = [TokensPrompt(prompt_token_ids=row) for row in ids]
    params = SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=output_len, detokenize=False)
    times = []
    for _ in range(warmup + iters):
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t)
    return {"latencies": times[warmup:]}


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

def latency_command(model, out_json, *, batch_size, input_len, output_len, dtype, warmup=5, iters=15):
    """`vllm bench latency`: `iters` timed generations of `batch_size` random prompts of `input_len`
    tokens, `output_len` new tokens each (EOS ignored), after `warmup` untimed ones; prefix caching off,
    its default there, so every prompt is computed."""
    return ["vllm", "bench", "latency", "--model", str(model), "--dtype", dtype, "--batch-size", str(batch_size),
            "--input-len", str(input_len), "--output-len", str(output_len), "--num-iters-warmup", str(warmup),
            "--num-iters", str(iters), "--max-model-len", str(input_len + output_len), "--disable-detokenize",
            "--output-json", str(out_json)]


def throughput_command(model, out_json, *, batch_size, input_len, output_len, dtype, num_prompts):
    """`vllm bench throughput` on random prompts with at most `batch_size` sequences in flight."""
    return ["vllm", "bench", "throughput", "--model", str(model), "--dtype", dtype, "--dataset-name", "random",
            "--input-len", str(input_len), "--output-len", str(output_len), "--num-prompts", str(num_prompts),
            "--max-num-seqs", str(batch_size), "--max-model-len", str(input_len + output_len),
            "--output-json", str(out_json)]


def serve_command(model, result_dir, result_name, *, request_rate, input_len, output_len, num_prompts, port):
    """`vllm bench serve` against a `vllm serve` of `model` on localhost:`port`: random prompts arriving
    as a Poisson process of `request_rate` a second; TTFT and TPOT at the 50th, 90th and 99th percentiles."""
    return ["vllm", "bench", "serve", "--backend", "vllm", "--model", str(model), "--port", str(port),
            "--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len", str(output_len),
            "--num-prompts", str(num_prompts), "--request-rate", str(request_rate), "--ignore-eos",
            "--percentile-metrics", "ttft,tpot", "--metric-percentiles", "50,90,99",
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
