"""Every page quantbench writes, from the result files alone: one row per experiment and the
comparison tables built from the rows (rows.py), shown by summary.md (also printed to the terminal),
report.md and report.html.

    quantbench report results/run003                  # report.md + report.html in the run folder
    quantbench report results/run003 results/run007 --out cmp/   # several runs side by side

summary.md is the run's record: the comparison, every sweep point, the protocol, what failed or was
skipped and what the quantizers reported. The report is the page to decide from: what was asked, a
recommendation computed from the numbers, the same comparison, the failures, four plots (plots.py)
and, for several runs, how they differ. report.html embeds its plots and has no scripts: it opens offline.
"""
import base64
import dataclasses
import html
from pathlib import Path

from quantbench import decide, plots
from quantbench.config import FIELDS, from_run
from quantbench.results import load_run
from quantbench.rows import (BOOTSTRAP_RESAMPLES, PRIMARY_METRICS, READING, SIGNIFICANCE, baseline, comparison_tables,
                             load_runs, mib, rows_of, table)

def notes(rows, several_runs):
    """The lines under the tables: speed timed beside other experiments, memory held beyond the weights,
    roofline shares above 100%."""
    def name(r):
        return r["experiment"] + (f" ({r['run']})" if several_runs else "")
    out = []
    over = sorted({name(r) for r in rows for points in (*r["decode"].values(), r["prefill"]) for p in points.values()
                   if (p.get("bandwidth_share") or 0) > 1 or (p.get("matmul_share") or 0) > 1})
    if over:
        out += ["Shares of the copy bandwidth or matmul rate above 100% (" + ", ".join(over) + "): the measured ceiling is "
                "below what these reached, so the probe underestimates this machine's peak there; compare such shares "
                "with each other, not with 100%.", ""]
    floors = [f"{name(r)} {r['kld']['kld_mean']:.2g}" for r in rows if r["is_floor"]]
    if floors:
        out += ["Noise floor (a float format against the baseline, so rounding alone; KLDs near it cannot be told from "
                "a change of float format): " + ", ".join(floors) + ".", ""]
    shared = [name(r) for r in rows if r["shared_host_with"]]
    if shared:
        out += ["† Timed while other experiments ran on the same host (a Ray run), which slows eager timings: compare "
                "speed from experiments that ran alone. " + ", ".join(shared) + ".", ""]
    held = [f"{name(r)} +{r['held_beyond_weights_bytes'] / 2**20:.0f} MiB" for r in rows if r["held_beyond_weights_bytes"] is not None]
    if held:
        out += ["Held after loading beyond the weights' count (GPU memory allocated once the load is done and garbage "
                "collected, minus the weights as stored: kernel workspaces or repacked copies the loaded layers keep "
                "outside their parameters; part of the peak): " + ", ".join(held) + ".", ""]
    return out


def failures(rows, several_runs):
    problems = [r for r in rows if r["status"] != "ok"]
    if not problems:
        return []
    return ["## Failed and skipped", ""] + [
        f"- **{r['experiment']}**" + (f" ({r['run']})" if several_runs else "") + f" {r['status']}: "
        f"{str(r['error']).rstrip('.')}." + (f" Fix: {r['fix']}" if r.get("fix") else "") for r in problems] + [""]


def quantizer_lines(rows):
    """Per experiment: the warnings and errors its quantization library gave (counted, the first few
    shown) and the linear layers it left in float."""
    out = []
    for r in rows:
        qz = r["result"].get("quantization") or {}
        said, left = qz.get("messages") or {}, (r["result"].get("backend") or {}).get("unquantized_linears") or {}
        parts = []
        if said.get("warnings") or said.get("errors"):
            parts.append(f"{said['errors']} error(s) and {said['warnings']} warning(s) while quantizing"
                         + (" (at load)" if qz.get("at_load") else "") + ": "
                         + "; ".join(f"{m['level']} {m['message'].rstrip('.')}" + (f" (x{m['count']})" if m["count"] > 1 else "")
                                     for m in said["messages"][:3]))
        if left.get("count"):
            parts.append(f"{left['count']} of {left['of']} linear layers left unquantized ({', '.join(left['names'][:3])}"
                         + (", ..." if left["count"] > 3 else "") + ")")
        if parts:
            out.append(f"- **{r['experiment']}**: " + "; ".join(parts) + ".")
    return ["## What the quantizers reported", "", *out, ""] if out else []


def sweep_lines(rows):
    """The speed sweep point by point: decode (each mode and batch size) and prefill (prompt lengths)."""
    decode, prefill, breaks = [], [], {}
    for r in rows:
        c = r["result"].get("cost", {})
        for mode, points in c.get("decode", {}).items():
            for b, p in points.items():
                label = mode if p.get("compiled", mode == "eager") else f"static cache, not compiled: {p.get('why_not_compiled')}"
                said = (["generate would not compile it"] if p.get("note") else []) + \
                    ([f"{p['graph_breaks']} graph breaks"] if p.get("graph_breaks") else [])
                label += f" ({'; '.join(said)})" if said else ""
                if p.get("graph_break_reasons"):
                    breaks.setdefault(r["experiment"], p["graph_break_reasons"][0])
                if p.get("status") != "ok":
                    decode.append(f"| {r['experiment']} | {mode} | {b} | {p.get('status')}"
                                  + (f": {p['error']}" if p.get("error") else "") + " | - | - | - | - |")
                    continue
                share = f"{100 * p['bandwidth_share']:.1f}" if p.get("bandwidth_share") else "-"
                peak = f"{p['peak_bytes'] / 2**20:.1f}" if p.get("peak_bytes") else "-"
                decode.append(f"| {r['experiment']} | {label} | {b} | {p['tok_s']:.1f} | {p['achieved_bytes_s'] / 1e9:.1f} | "
                              f"{share} | {p['kv_cache_bytes'] / 2**20:.1f} | {peak} |")
        for n, p in c.get("prefill", {}).items():
            if p.get("status") != "ok":
                prefill.append(f"| {r['experiment']} | {n} | {p.get('status')}: {p.get('reason', p.get('error', ''))} | - | - |")
                continue
            share = f"{100 * p['matmul_share']:.1f}" if p.get("matmul_share") else "-"
            prefill.append(f"| {r['experiment']} | {n} | {p['ttft_ms']:.1f} | {p['prefill_tok_s']:.0f} | {share} |")
    out = []
    if decode:
        out += ["## Decode sweep", "", "| experiment | mode | batch | tok/s | achieved GB/s | % of copy bandwidth | KV cache MiB | peak MiB |",
                "|---|---|---|---|---|---|---|---|", *decode, ""]
        out += [f"- Graph breaks in {name}'s compiled step (Python runs between its graphs): {why}" for name, why in breaks.items()]
        out += [""] if breaks else []
    if prefill:
        out += ["## Prefill sweep (batch 1)", "", "| experiment | prompt tokens | TTFT ms | prefill tok/s | % of matmul rate |",
                "|---|---|---|---|---|", *prefill, ""]
    return out


def _compiled_words(settings):
    """What compiled mode set (engine.compiled_settings), in words."""
    if not settings:
        return ""
    return (f": torch.compile mode {settings['mode']} (CUDA graphs), static shapes"
            + (", inductor's coordinate-descent tuning" if settings.get("coordinate_descent_tuning") else "")
            + (", programmatic dependent launch" if settings.get("programmatic_dependent_launch") else ""))


def protocol_lines(run, results):
    """How the numbers were produced, from the first result that has each part."""
    out = ["## Protocol", ""]
    info = next((r["quality_info"]["perplexity"] for r in results
                 if r.get("quality_info", {}).get("perplexity", {}).get("tokens_scored")), None)
    if info:
        out.append(f"- Perplexity: {info['corpus']}; {info['tokens_scored']} tokens scored in {info['windows']} "
                   f"non-overlapping windows of {info['window']} (of {info['corpus_tokens']} corpus tokens).")
    kld = next((r["quality_info"]["kld"] for r in results if r.get("quality_info", {}).get("kld", {}).get("tokens_scored")), None)
    if kld:
        out.append(f"- KLD: llama.cpp's protocol on {kld['corpus']}: {kld['chunks']} chunks of n_ctx = {kld['n_ctx']}, "
                   f"{kld['scored']}; {kld['tokens_scored']} tokens scored"
                   f"{', first token of each chunk replaced by BOS' if kld.get('bos_first') else ''}. "
                   f"KL(baseline || method) over the vocabulary per token, mean ± standard error; same top = "
                   f"share of tokens whose most likely next token is the baseline's; PPL ratio on the same tokens. "
                   f"Reference from {kld.get('reference')}: {kld['storage']}, {kld['bytes'] / 2**20:.1f} MiB in "
                   f"the run folder's reference/.")
    tasks = {t: i for r in results for t, i in r.get("quality_info", {}).items() if t != "perplexity" and i.get("source")}
    for t, i in tasks.items():
        kernels = i.get("attention_kernels")
        out.append(f"- {t}: lm-eval {i.get('lm_eval_task')} from {i['source']}; "
                   f"n = {i.get('n')} documents; ± is lm-eval's standard error"
                   + (f"; batch {i.get('batch_size')}, max_length {i.get('max_length')}, max_gen_toks "
                      f"{i.get('max_gen_toks')}" if i.get("batch_size") else "")
                   + (f"; attention kernels {', '.join(kernels) if isinstance(kernels, list) else kernels}" if kernels else "")
                   + (f"; {i['num_fewshot']}-shot" if i.get("num_fewshot") else "")
                   + ("; the tokenizer's chat template" + (", few-shot examples as turns" if i.get("fewshot_as_multiturn") else "")
                      if i.get("apply_chat_template") else "")
                   + ".")
    if tasks:
        out.append(f"- Δ task metric: the paired difference from the baseline on the same documents, ± the standard "
                   f"error of the per-document differences, with the two-sided p-value of McNemar's exact test on the "
                   f"discordant documents (0/1 scores) or of a paired bootstrap ({BOOTSTRAP_RESAMPLES} resamples, "
                   f"other scores); 'noise': p ≥ {SIGNIFICANCE}. Metrics lm-eval does not average per document "
                   "(perplexity) show the plain difference. Recovery: mean score over the baseline's on the same "
                   "documents x 100, its 95% interval by the delta method on the paired scores; the mean recovery "
                   "averages each task's primary metric (the first of " + ", ".join(PRIMARY_METRICS) + " it has), "
                   "its interval from theirs.")
    c = run["config"]
    timed = next((r["cost"] for r in results if "decode_runs" in r.get("cost", {}) and r.get("engine") in (None, "transformers")),
                 None)
    if timed:
        compiled = "compiled" in timed["decode_modes"]
        kernels = timed["attention_kernels"]["eager"]
        out.append("- Speed: eager `generate`" + (f" and compiled (greedy loop, static KV cache, compiled step"
                                                   f"{_compiled_words(timed.get('compiled_settings'))}; see the decode sweep)"
                                                   if compiled else "")
                   + f", greedy, each point after a warm-up run; TTFT = median of {timed['repeats']} runs of generate 1 "
                   f"token from a prompt of {', '.join(str(n) for n in c['prompt_lengths'])} tokens at batch 1 (prefill "
                   f"tok/s = prompt / TTFT); decode tok/s = batch / median step time over the {timed['new_tokens']} - 1 "
                   f"steps after the first token of {timed['decode_runs']} run(s), from {timed['decode_prompt_tokens']}-token "
                   f"prompts; eager attention kernels: {', '.join(kernels) if isinstance(kernels, list) else kernels}.")
    out += _llama_cpp_lines(results) + _vllm_lines(results)
    rates = run.get("device_rates") or {}
    if rates.get("copy_bytes_s"):
        out.append(f"- Roofline: measured copy bandwidth {rates['copy_bytes_s'] / 1e9:.0f} GB/s and matmul rate "
                   f"{rates['matmul_flops'] / 1e12:.1f} TFLOP/s ({rates['method']}). Decode reads every weight once a step "
                   "plus the KV cache: achieved = (weights as stored + KV cache at its mean length) x steps/s; prefill "
                   "FLOPs = 2 x linear weights x prompt + causal attention, over TTFT.")
    elif rates.get("error"):
        out.append(f"- Roofline: the device's rates could not be measured: {rates['error']}")
    dtypes = [f"{r['experiment']} {r['compute_dtype']} ({r['compute_dtype_why']})" for r in results if r.get("compute_dtype")]
    if dtypes:
        out.append("- Compute dtype: " + "; ".join(dtypes) + ".")
    cal = next((r["quantization"]["calibration"] for r in results if (r.get("quantization") or {}).get("calibration")), None)
    if cal:
        out.append(f"- Calibration (GPTQ/AWQ): {cal['samples']} samples of {cal['tokens_per_sample']} tokens from "
                   f"{cal['source']}; sha256 {cal['sha256'][:16]}.")
    out.append("- Quantized checkpoints are made once, cached and measured after a reload; "
               "quantize s is the one-time quantization ('(cached)': made by an earlier run), load s the reload.")
    out.append("- Weights: bytes as stored, quantization scales included (bitsandbytes, HQQ; torchao tensors by their parts). "
               "Peak: " + (results[0].get("cost", {}).get("peak_kind", "-") if results else "-")
               + " during the speed measurement (the quality evaluation's peak is `peak_eval_bytes` in the JSON).")
    return out + [""]


def _llama_cpp_lines(results):
    """How llama.cpp's experiments ran: its speed protocol, its tokenizer against the Hugging Face one,
    and the engine check (the float GGUF in llama.cpp against the float baseline in transformers)."""
    mine = [r for r in results if r.get("engine") == "llama.cpp" and r.get("backend")]
    if not mine:
        return []
    b = mine[0]["backend"]
    names = ", ".join(r["experiment"] for r in mine)
    out = [f"- Speed ({names}): llama.cpp through llama-cpp-python {b.get('library_version')}, fed the Hugging Face "
           f"tokenizer's ids, {b.get('threads')} threads, {b.get('n_gpu_layers')} layers on the GPU; TTFT and decode as "
           "above, greedy on llama.cpp's logits, batch 1 through llama-cpp-python's Llama and larger batches as parallel "
           "sequences of one context (one llama_decode of B tokens a step, as llama.cpp's server runs them); "
           "pp512 and tg128 as llama-bench measures them (a 512-token prompt at once; 128 tokens one by one from an "
           "empty cache; mean of 5 after a warm-up)."]
    check = b.get("tokenizer_check") or {}
    if check:
        out.append(f"- Tokenizers: the GGUF's own tokenizer gives the Hugging Face tokenizer's ids on {check['tokens']} tokens of "
                   f"{check['text']}" + ("." if check["agrees"] else f" up to position {check['first_difference']} only: "
                                         "a llama.cpp user's prompts are tokenized differently" +
                                         (f" ({check['error']})." if check.get("error") else ".")))
    return out + _engine_check(results, mine, ("gguf-f16",), "llama.cpp", "llama.cpp's own floor for BF16 against FP16 on "
                                                                          "Llama-3-8B: 2.5e-5")


def _engine_check(results, mine, methods, engine, note):
    """The engine check: a float method of `methods` in `engine` against the float baseline in transformers, on the
    same tokens (the KLD of the engines' arithmetic alone), as a line of the protocol; [] where none scored."""
    f16 = next((r for r in mine if r["method"] in methods and r["status"] == "ok" and r["quality"].get("kld")), None)
    base = f16 and baseline(results, f16["model"]["name"])
    if not base:
        return []
    k = f16["quality"]["kld"]
    bound = "≥ " if k.get("kld_is_lower_bound") else ""
    return [f"- Engine check: {f16['experiment']} in {engine} against {base['experiment']} in transformers, on the same "
            f"tokens: mean KLD {bound}{k['kld_mean']:.2e}" + (f" ± {k['kld_mean_stderr']:.1e}" if k.get("kld_mean_stderr") else "")
            + f", the same top token "
            f"{100 * k['same_top_p']:.2f}% of the time, perplexity ratio {k['ppl_ratio']:.4f} ({note})."]


def _vllm_lines(results):
    """How vLLM's experiments ran (docs/protocols.md, "vLLM"), and its engine check where fp16@vllm scored."""
    mine = [r for r in results if r.get("engine") == "vllm" and r.get("backend")]
    if not mine:
        return []
    b, names = mine[0]["backend"], ", ".join(r["experiment"] for r in mine)
    out = [f"- vLLM ({names}): vLLM {b.get('vllm')} serving each checkpoint as `vllm serve` opens it (its share of the GPU "
           f"{b.get('gpu_memory_utilization')}, prefix caching off), fed the Hugging Face tokenizer's ids; speed in its own "
           "compiled mode (torch.compile, CUDA graphs) by `vllm bench latency`'s protocol: TTFT = a generation of 1 token, a "
           "decode step = (a run's time to the new tokens - the median time to 1) / (new tokens - 1); weights = the "
           "parameters of the module it runs; peak = its whole share of the GPU (NVML), the KV cache pool "
           f"included. Perplexity exact from each prompt token's log-probability; KLD a lower bound (≥) from the top "
           f"{b.get('top_k_logprobs')} log-probabilities a position (log-sum inequality), the rest of the KLD summary exact."]
    return out + _engine_check(results, mine, ("fp16", "bf16"), "vLLM", "its KLD from vLLM's top log-probabilities")


def bench_lines(rows):
    """llama-bench's protocol, for the experiments whose engine has it (llama.cpp)."""
    lines = [f"| {r['experiment']} | {b['pp512']['tok_s']:.1f} ± {b['pp512']['tok_s_stdev']:.1f} | "
             f"{b['tg128']['tok_s']:.1f} ± {b['tg128']['tok_s_stdev']:.1f} | {b['threads']} | {b['n_gpu_layers']} |"
             for r in rows if (b := r["result"].get("cost", {}).get("standard_bench"))]
    if not lines:
        return []
    return ["## llama-bench's protocol", "", "| experiment | pp512 tok/s | tg128 tok/s | threads | GPU layers |",
            "|---|---|---|---|---|", *lines, ""]


def vllm_bench_lines(rows):
    """vLLM's own benchmarks (`vllm bench`) of each vLLM experiment, its latency beside quantbench's own figures
    of the same experiment (their ratio: the check), its offline throughput and its serving percentiles."""
    latency, serving, sizes = [], [], []
    for r in rows:
        cost = r["result"].get("cost", {})
        b = cost.get("vllm_bench")
        if not b:
            continue
        if b["status"] != "ok":
            latency.append(f"| {r['experiment']} | failed: {b['error'][:200]} | | |")
            continue
        through = b["throughput"]
        sizes = list(through) or sizes
        cells = _latency_cells(cost, b["latency"]) + [" / ".join(
            f"{t['output_tokens_per_s']:.0f}" if t.get("status") == "ok" else "failed" for t in through.values()) or "not run"]
        latency.append(f"| {r['experiment']} | " + " | ".join(cells) + " |")
        for rate, s in b["serve"].items():
            if s.get("status") != "ok":
                serving.append(f"| {r['experiment']} | {rate} | failed: {_last_line(s['error'])} | | | |")
                continue
            pct = {m: " / ".join(f"{s[m].get(q, float('nan')):.1f}" for q in ("p50", "p90", "p99")) for m in ("ttft_ms", "tpot_ms")}
            serving.append(f"| {r['experiment']} | {rate} | {s['completed']} of {s['num_prompts']} | {pct['ttft_ms']} | "
                           f"{pct['tpot_ms']} | {s['output_tokens_per_s']:.0f} |")
    if not latency:
        return []
    out = ["## vLLM's own benchmarks", "", "`vllm bench latency` at batch 1 against quantbench's own figures of the same "
           "experiment (quantbench / vllm bench, their ratio), and `vllm bench throughput`'s output tokens/s with at most "
           "b sequences in flight (prompt and decode lengths of the decode sweep).", "",
           f"| experiment | TTFT ms at prompt tokens | decode tok/s, batch 1 | offline output tok/s at b = {' / '.join(sizes) or '-'} |",
           "|---|---|---|---|", *latency, ""]
    if serving:
        out += ["`vllm bench serve` against `vllm serve`: Poisson arrivals at each rate, random prompts.", "",
                "| experiment | requests/s | completed | TTFT ms p50 / p90 / p99 | TPOT ms p50 / p90 / p99 | output tok/s |",
                "|---|---|---|---|---|---|", *serving, ""]
    return out


def _latency_cells(cost, lat):
    """The TTFT and batch-1 decode cells of a vLLM experiment: quantbench's own / `vllm bench latency`'s (ratio)."""
    if not lat:
        return ["not run", "-"]
    if lat["status"] == "failed":
        return ["failed: " + _last_line(lat["error"]), "-"]
    (p, theirs), = lat["prefill"].items()
    pairs = [(cost.get("prefill", {}).get(p, {}).get("ttft_ms"), theirs["ttft_ms"], 2),
             (cost.get("decode", {}).get("compiled", {}).get("1", {}).get("tok_s"), lat["decode"]["decode_tokens_per_s"], 1)]
    ttft, decode = (f"{ours:.{d}f} / {ref:.{d}f} ({ours / ref:.3f})" if ours else f"- / {ref:.{d}f}" for ours, ref, d in pairs)
    return [f"{p}: {ttft}", decode]


def _last_line(error):
    """The end of a benchmark's error, which ends with its output's last lines, for a table cell."""
    return (error.strip().splitlines() or ["(no output)"])[-1][:120]


def summary_markdown(run_dir):
    """summary.md: the comparison, the sweep point by point, the protocol, what failed and what the
    quantizers reported, from the run folder's files."""
    run_dir = Path(run_dir)
    run, results = load_run(run_dir)
    rows = rows_of(run_dir.name, run_dir, run, results)
    env = run["environment"]
    card = env.get("gpu") or f"CPU ({env.get('cpu_count')} cores)"
    lines = [f"# quantbench {run_dir.name}", "",
             f"Models: {', '.join(m['name'] for m in run['models'])}; device: {run['device']} ({card}); "
             f"started {run['started']}."]
    lines += [f"Note on {m['name']}: {m['note']}." for m in run["models"] if m.get("note")] + [""]
    first = answer(rows, limits_of(run))
    lines += (["## The answer", "", first, ""] if first else []) + [READING, ""]
    for title, head, body in comparison_tables(rows, False):
        lines += table(title, head, body)
    lines += notes(rows, False) + sweep_lines(rows) + bench_lines(rows) + vllm_bench_lines(rows) + protocol_lines(run, results) + failures(rows, False)
    lines += quantizer_lines(rows)
    skipped_tasks = {(t, i["reason"], i.get("fix")) for r in results
                     for t, i in r.get("quality_info", {}).items() if i.get("status") == "skipped"}
    if skipped_tasks:
        lines += ["## Tasks not run", ""] + [f"- {t}: {reason}. Fix: {fix}" for t, reason, fix in sorted(skipped_tasks)] + [""]
    missing = [e["id"] for e in run["experiments"] if e["id"] not in {r["experiment"] for r in results}]
    if missing:
        lines += [f"Not run yet: {', '.join(missing)} (finish with `quantbench run --resume {run_dir}`).", ""]
    return "\n".join(lines).rstrip() + "\n"


def measured(rows, runs):
    """What the page compares, from what the results hold: 'Quality: perplexity, KLD and 6 tasks (the
    standard suite: ...); cost: memory and speed.'"""
    ok = [r for r in rows if r["status"] == "ok"]
    tasks = sorted({t.split(" ")[0] for r in ok for t in r["tasks"]})
    parts = [name for name, has in [("perplexity", any(r["perplexity"] for r in ok)),
                                    ("KLD from the baseline", any(r["kld"] for r in ok))] if has]
    if tasks:
        suites = sorted({run["config"].get("suite") for _, run, _ in runs if run["config"].get("suite")})
        parts.append(f"{len(tasks)} task{'s' if len(tasks) > 1 else ''} ("
                     + (f"the {' and '.join(suites)} suite: " if suites else "") + ", ".join(tasks) + ")")
    quality = ("Quality: " + (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0])
               if parts else "Quality: not measured")
    return quality + "; cost: memory and speed."


def limits_of(run, given=None):
    """The pick's settings of a run (its config's "decide" fields), those given to `quantbench report` replacing them."""
    config = dataclasses.asdict(from_run(run))
    return {**{name: config[name] for name, f in FIELDS.items() if f.metadata["group"] == "decide"}, **(given or {})}


def answer(rows, limits):
    """The first paragraph: the pick under the limits, or without limits the Pareto set (None with fewer than two methods)."""
    return decide.pick_paragraph(rows, limits) or decide.pareto_paragraph(rows, limits.get("pick_batch") or 1)


def recommendation(rows):
    """A paragraph computed from the numbers: never a fixed sentence."""
    ok = [r for r in rows if r["status"] == "ok"]
    base = next((r for r in ok if r["is_baseline"]), None)
    quantized = [r for r in ok if not r["is_baseline"] and r["weights_mib"]]
    if not quantized:
        return "No quantized method finished in this run, so there is nothing to recommend yet."
    out = []
    with_tasks = [r for r in quantized if any(r["deltas"].values())]
    if base and with_tasks:
        paired = {id(r): [d for d in r["deltas"].values() if d and d["stderr"] is not None] for r in with_tasks}
        within = [r for r in with_tasks if paired[id(r)] and all(d["within_noise"] for d in paired[id(r)])]
        if within:
            pick = min(within, key=lambda r: r["weights_mib"])
            out.append(f"The smallest method within noise of {base['experiment']} on every task is {pick['experiment']} "
                       f"({mib(pick['weights_mib'])} MiB of weights, {100 * pick['weights_mib'] / base['weights_mib']:.0f}% "
                       f"of {base['experiment']}'s).")
        else:
            out.append(f"No quantized method is within noise of {base['experiment']} on every task.")
    scored = [r for r in quantized if r["kld"]]
    if scored:
        close = min(scored, key=lambda r: r["kld"]["kld_mean"])
        out.append(f"The closest to the baseline's next-token distributions is {close['experiment']} (mean KLD "
                   f"{close['kld']['kld_mean']:.4f}, same top token {100 * close['kld']['same_top_p']:.1f}% of the time).")
        four_bit = [r for r in scored if (r["bits"] or 16) <= 4]
        if four_bit:
            best4 = min(four_bit, key=lambda r: r["kld"]["kld_mean"])
            out.append(f"Among methods of 4 bits or fewer, {best4['experiment']} has the lowest KLD "
                       f"({best4['kld']['kld_mean']:.4f}) at {mib(best4['weights_mib'])} MiB.")
    for mode in ("eager", "compiled"):
        fast = [r for r in ok if r["decode"][mode].get(1)]
        if fast:
            top = max(fast, key=lambda r: r["decode"][mode][1]["tok_s"])
            ratio = (f", {top['decode'][mode][1]['tok_s'] / base['decode'][mode][1]['tok_s']:.2f}x {base['experiment']}"
                     if base and base["decode"][mode].get(1) and top is not base else "")
            out.append(f"Fastest {mode} decode at batch 1: {top['experiment']} ({top['decode'][mode][1]['tok_s']:.0f} tok/s){ratio}.")
    smallest = min(quantized, key=lambda r: r["weights_mib"])
    out.append(f"Smallest weights: {smallest['experiment']} ({mib(smallest['weights_mib'])} MiB).")
    return " ".join(out)


def _flatten(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differences(runs):
    """Configuration and environment entries whose values differ between the runs."""
    flat = [{**_flatten(run["config"], "config."), **_flatten(run["environment"], "environment."),
             "device": run["device"]} for _, run, _ in runs]
    keys = sorted(set().union(*flat))
    skip = ("environment.host", "config.out")
    return [(k, [f.get(k) for f in flat]) for k in keys
            if not k.startswith(skip) and len({repr(f.get(k)) for f in flat}) > 1]


def build(run_dirs, out=None, limits=None):
    """Write report.md (with its PNGs beside it) and a self-contained report.html; returns their paths.
    `limits`: the pick's settings given to `quantbench report`, replacing the runs' own."""
    runs = load_runs(run_dirs)
    out = Path(out) if out else Path(runs[0][0])
    out.mkdir(parents=True, exist_ok=True)
    several = len(runs) > 1
    names = [d.name for d, _, _ in runs]
    clash = len(set(names)) < len(names)  # run001 of two output folders: name them by folder too
    labels = [f"{d.parent.name}/{d.name}" if clash else d.name for d, _, _ in runs]
    rows, rates = [], {}
    for label, (d, run, results) in zip(labels, runs):
        rows += rows_of(label, d, run, results)
        rates[label] = run.get("device_rates") or {}

    models = sorted({m["name"] for _, run, _ in runs for m in run["models"]})
    cards = sorted({run["environment"].get("gpu") or f"CPU ({run['environment'].get('cpu_count')} cores)" for _, run, _ in runs})
    question = f"Which quantization of {', '.join(models)} on {', '.join(cards)}? {measured(rows, runs)}"
    figures = [("quality-vs-memory", "Quality against weight memory", plots.plot_quality_vs_memory(rows, labels)),
               ("decode-vs-batch", "Decode speed against batch size", plots.plot_decode_vs_batch(rows, labels, rates)),
               ("kld-distribution", "KL divergence per token", plots.plot_kld_distribution(rows, labels)),
               ("ttft-vs-prompt", "Time to first token against prompt length", plots.plot_ttft_vs_prompt(rows, labels))]
    model_notes = list(dict.fromkeys(f"{m['name']}: {m['note']}" for _, run, _ in runs for m in run["models"] if m.get("note")))
    advice = []
    for label, (_, run, _) in zip(labels, runs):  # the answer and the summary of each run
        mine = [r for r in rows if r["run"] == label]
        prefix = f"{label}: " if several else ""
        advice += [prefix + p for p in (answer(mine, limits_of(run, limits)), recommendation(mine)) if p]

    md = [f"# quantbench report: {', '.join(labels)}", "", question, ""]
    md += [f"> {n}" for n in model_notes] + ([""] if model_notes else [])
    md += ["## Recommendation", ""] + [line for paragraph in advice for line in (paragraph, "")] + ["## Comparison", "", READING, ""]
    for title, head, lines in comparison_tables(rows, several):
        md += table(title, head, lines)
    md += notes(rows, several) + failures(rows, True)
    for name, title, png in figures:
        if png:
            (out / f"report-{name}.png").write_bytes(png)
            md += [f"## {title}", "", f"![{title}](report-{name}.png)", ""]
    diffs = differences(runs) if several else []
    if diffs:
        md += ["## How the runs differ", "", "| setting | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        md += [f"| {k} | " + " | ".join(str(v) for v in values) + " |" for k, values in diffs] + [""]
    md += ["Protocols: see each run's summary.md; numbers come from the result files in " + ", ".join(str(d) for d, _, _ in runs) + "."]
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.html").write_text(_html(md, figures))
    return out / "report.md", out / "report.html"


def _html(md_lines, figures):
    """The Markdown above as a standalone HTML page: headings, paragraphs, tables and embedded images."""
    images = {f"report-{name}.png": png for name, _, png in figures if png}
    body, table = [], []

    def inline(text):
        text = html.escape(text)
        while "**" in text:
            text = text.replace("**", "<b>", 1).replace("**", "</b>", 1)
        return text

    def td(text):
        """A table cell; a paired difference goes on a line of its own, grey when within noise."""
        value, sep, delta = text.partition(" (Δ ")
        if not sep:
            return inline(text)
        return f"{inline(value)}<br><span class=\"d{' n' if 'noise' in delta else ''}\">Δ {inline(delta.rstrip(')'))}</span>"

    def flush():
        if table:
            rows = [r for r in table if not set(r.replace("|", "")) <= set("-")]
            cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
            body.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in cells[0]) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{td(c)}</td>" for c in row) + "</tr>" for row in cells[1:])
                        + "</table>")
            table.clear()

    for line in md_lines:
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("# "):
            body.append(f"<h1>{inline(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{inline(line[3:])}</h2>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](")
            data = base64.b64encode(images[src.rstrip(")")]).decode()
            body.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')
        elif line.startswith("> "):
            body.append(f"<p class=note>{inline(line[2:])}</p>")
        elif line.startswith("- "):
            body.append(f"<p>&bull; {inline(line[2:])}</p>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;"
             "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
             "td .d{font-size:11px;color:#000}td .d.n{color:#999}img{max-width:100%;display:block;margin:1em 0}.note{color:#8a5a00;background:#fff8e5;padding:.5em}")
    return ("<!DOCTYPE html>\n<html><head><meta charset=utf-8><title>quantbench report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
