"""Result files: atomic JSON and folder writes, the environment record, and the summary table.

A run folder holds `run.json` (config as used, environment, experiments, times), one
`<experiment>.json` per experiment, and `summary.md`, the comparison table built from those files.

    >>> print(summary_markdown(Path("results/run001")))
"""
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

from quantbench.config import prompt_lengths

LIBRARIES = ["torch", "transformers", "accelerate", "bitsandbytes", "lm_eval", "datasets",
             "safetensors", "gguf", "huggingface_hub", "optimum", "gptqmodel", "torchao", "hqq"]


def write_json(path, data):
    """Write JSON so that a reader never sees half a file: a temp file in the same folder, renamed.
    Strict JSON: a NaN or infinity is written as null (see finite)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(finite(data), f, indent=1, default=str, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def finite(data):
    """`data` with every NaN or infinity replaced by null, which JSON has (its NaN and Infinity
    tokens are not JSON: strict parsers, jq and JSON.parse reject them); in a dict the key
    `<key>_nonfinite` beside it says what the value was. The measurements that produce such a value
    fail their experiment with the reason (quality.NonFinite); this keeps the file readable anyway."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out[k] = finite(v)
            if isinstance(v, float) and not math.isfinite(v):
                out[f"{k}_nonfinite"] = str(v)
        return out
    if isinstance(data, (list, tuple)):
        return [finite(v) for v in data]
    return data


@contextmanager
def atomic_folder(dst):
    """Fill a temporary folder beside `dst`; when the block ends it replaces `dst` in one rename, so a
    half-written folder (a checkpoint, a reference) is never taken for a finished one. On an error
    the temporary folder is removed and `dst` is left as it was.

        with atomic_folder(cache / "model") as tmp:
            model.save_pretrained(tmp)
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def read_json(path):
    return json.loads(Path(path).read_text())


def environment():
    """Library versions, GPU, driver, CUDA, host: enough to explain a number later."""
    import torch

    import quantbench
    from quantbench.methods import library_version

    versions = {"quantbench": quantbench.__version__}
    versions.update({lib: library_version(lib.replace("_", "-")) for lib in LIBRARIES})
    env = {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
           "cpu_count": os.cpu_count(), "libraries": versions, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update({"gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
                    "gpu_memory_bytes": props.total_memory, "compute_capability": f"{props.major}.{props.minor}",
                    "cuda_runtime": torch.version.cuda})
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            env["driver"] = None
    return env


def _mib(b):
    return f"{b / 2**20:.1f}" if isinstance(b, (int, float)) else "-"


def _num(x, fmt="{:.3f}"):
    return fmt.format(x) if isinstance(x, (int, float)) else "-"


def kernel_of(result):
    """A short name for what ran the matmuls: the quantized layer class, torchao tensor or HQQ backend."""
    b = result.get("backend") or {}
    parts = [c for c in b.get("linear_classes", []) if c != "Linear"]
    if b.get("torchao_tensor"):
        parts.append(b["torchao_tensor"])
    if b.get("backend_fallback"):
        parts.append(f"fallback {b['backend_fallback']['backend']}")
    if b.get("hqq_backend"):
        parts.append(b["hqq_backend"].replace("HQQBackend.", "HQQ "))
    return ", ".join(parts) or ("torch Linear" if b else "-")


def load_experiments(run_dir):
    """The experiment results of a run folder, in the order run.json lists them (missing ones absent)."""
    run = read_json(Path(run_dir) / "run.json")
    results = []
    for exp in run["experiments"]:
        path = Path(run_dir) / f"{exp['id']}.json"
        if path.exists():
            results.append(read_json(path))
    return run, results


def baseline(results, model_name):
    """The model's first finished fp16/bf16 result: what deltas are measured against (None if none)."""
    from quantbench.methods import BASELINE_METHODS

    for r in results:
        if r["model"]["name"] == model_name and r["method"] in BASELINE_METHODS and r["status"] == "ok":
            return r
    return None


NOISE_Z = 1.96  # a delta within this many standard errors of 0 is marked as noise (95%)


def paired_difference(base, other):
    """other - base on the documents both scored: {doc_id: value} each -> mean difference, its standard
    error (of the per-document differences), the documents used, and whether it is within noise."""
    common = sorted(set(base) & set(other))
    if not common:
        return None
    d = [other[i] - base[i] for i in common]
    mean = statistics.fmean(d)
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else None
    noise = se is not None and abs(mean) <= NOISE_Z * se
    return {"delta": mean, "stderr": se, "n": len(common), "within_noise": noise}


def documents(run_dir, result):
    """The experiment's per-document task scores ({task: {metric: {doc_id: value}}}), or {}."""
    path = Path(run_dir) / f"{result['experiment']}.docs.json"
    if not path.exists():
        return {}
    out = {}
    for task, cols in read_json(path).items():
        ids = cols.pop("doc_ids")
        out[task] = {m: dict(zip(ids, values)) for m, values in cols.items()}
    return out


def _delta_cell(r, base, t, m, docs, base_docs):
    """The task delta vs the baseline: paired on the same documents when both have per-document
    scores (± its standard error, '(noise)' when within NOISE_Z of 0), else the plain difference."""
    if base is None or r is base:
        return "-"
    pair = paired_difference(base_docs.get(t, {}).get(m, {}), docs.get(t, {}).get(m, {}))
    if pair and pair["stderr"] is not None:
        return f"{pair['delta']:+.4f} ± {pair['stderr']:.4f}" + (" (noise)" if pair["within_noise"] else "")
    v, b = r.get("quality", {}).get(t, {}).get(m), base["quality"].get(t, {}).get(m)
    return f"{v - b:+.4f}" if isinstance(v, (int, float)) and isinstance(b, (int, float)) else "-"


def _task_columns(results):
    """(task, metric) pairs present in any result, metrics in lm-eval's order, stderr and n left out."""
    cols = []
    for r in results:
        for task, metrics in r.get("quality", {}).items():
            if task in ("perplexity", "kld"):
                continue
            for m in metrics:
                if m == "n" or m.endswith("_stderr") or (task, m) in cols:
                    continue
                cols.append((task, m))
    return cols


def summary_markdown(run_dir):
    """The comparison table, with quality deltas against the model's fp16/bf16 baseline."""
    run, results = load_experiments(run_dir)
    cols = _task_columns(results)
    batch_sizes = [str(b) for b in run["config"]["batch_sizes"]]
    several_models = len({r["model"]["name"] for r in results}) > 1
    head = (["model"] if several_models else []) + ["experiment", "status", "perplexity", "Δ ppl"]
    has_kld = any("kld" in r.get("quality", {}) for r in results)
    if has_kld:
        head += ["KLD mean", "KLD p99", "same top %", "PPL(Q)/PPL(base)"]
    head += [f"{t} {m}" for t, m in cols] + [f"Δ {t} {m}" for t, m in cols]
    first_prompt = prompt_lengths(run["config"])[0]
    head += ["weights MiB", "peak MiB", "quantize s", "load s", f"TTFT ms @{first_prompt}"]
    head += [f"decode tok/s b={b}" for b in batch_sizes] + ["kernel", "sanity"]
    docs = {r["experiment"]: documents(run_dir, r) for r in results}  # each file read once
    rows = []
    for r in results:
        if r["status"] != "ok":  # listed below with the reason: its numbers are not compared
            continue
        base = baseline(results, r["model"]["name"])
        q, c = r.get("quality", {}), r.get("cost", {})
        ppl = q.get("perplexity")
        base_ppl = base["quality"].get("perplexity") if base else None
        d_ppl = f"{100 * (ppl / base_ppl - 1):+.1f}%" if ppl and base_ppl and r is not base else "-"
        row = ([r["model"]["name"]] if several_models else []) + [r["experiment"], r["status"], _num(ppl, "{:.3f}"), d_ppl]
        if has_kld:
            row += _kld_cells(q.get("kld"))
        for t, m in cols:
            v, se = q.get(t, {}).get(m), q.get(t, {}).get(f"{m}_stderr")
            row.append(_num(v, "{:.4f}") + (f" ± {se:.4f}" if isinstance(se, (int, float)) else ""))
        base_docs = docs[base["experiment"]] if base else {}
        row += [_delta_cell(r, base, t, m, docs[r["experiment"]], base_docs) for t, m in cols]
        qz = r.get("quantization") or {}
        quantize = "-" if not qz else _num(qz.get("quantize_s"), "{:.1f}") + (" (cached)" if qz.get("reused_from_cache") else "")
        shared = " †" if r.get("shared_host_with") else ""  # timed beside other experiments on its host
        row += [_mib(c.get("weight_bytes")), _mib(c.get("peak_bytes")), quantize, _num(c.get("load_s"), "{:.1f}"),
                _num(c.get("ttft_ms"), "{:.1f}") + shared]
        row += [_decode_cell(c, b) + shared for b in batch_sizes]
        row.append(kernel_of(r) if r["status"] == "ok" else "-")
        s = r.get("sanity")
        row.append("-" if not s else ("DEGENERATE: " + s["problem"]) if s["degenerate"] else "ok")
        rows.append(row)

    lines = [f"# quantbench {Path(run_dir).name}", ""]
    env = run["environment"]
    device = env.get("gpu") or f"CPU ({env.get('cpu_count')} cores)"
    lines.append(f"Models: {', '.join(m['name'] for m in run['models'])}; device: {run['device']} ({device}); "
                 f"started {run['started']}.")
    for m in run["models"]:
        if m.get("note"):
            lines.append(f"Note on {m['name']}: {m['note']}.")
    lines.append("")
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" for _ in head) + "|")
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    lines.append("")
    lines += _sweep_lines(results)
    lines += _protocol_lines(run, results)
    problems = [r for r in results if r["status"] != "ok"]
    if problems:
        lines += ["", "## Failed and skipped", ""]
        for r in problems:
            error, fix = problem(r, run_dir)
            lines.append(f"- **{r['experiment']}** {r['status']}: {error}." + (f" Fix: {fix}" if fix else ""))
    complaints = _quantizer_lines(results)
    if complaints:
        lines += ["", "## What the quantizers reported", ""] + complaints
    skipped_tasks = {(t, i["reason"], i.get("fix")) for r in results
                     for t, i in r.get("quality_info", {}).items() if i.get("status") == "skipped"}
    if skipped_tasks:
        lines += ["", "## Tasks not run", ""]
        lines += [f"- {t}: {reason}. Fix: {fix}" for t, reason, fix in sorted(skipped_tasks)]
    missing = [e["id"] for e in run["experiments"] if e["id"] not in {r["experiment"] for r in results}]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)} (finish with `quantbench run --resume {run_dir}`)."]
    return "\n".join(lines) + "\n"


def _quantizer_lines(results):
    """Per experiment: the warnings and errors its quantization library gave (counted, the first few
    shown) and the linear layers it left in float."""
    out = []
    for r in results:
        said = (r.get("quantization") or {}).get("messages") or {}
        left = (r.get("backend") or {}).get("unquantized_linears") or {}
        parts = []
        if said.get("warnings") or said.get("errors"):
            parts.append(f"{said['errors']} error(s) and {said['warnings']} warning(s) while quantizing"
                         + ("" if (r.get("quantization") or {}).get("at_load") is None else " (at load)") + ": "
                         + "; ".join(f"{m['level']} {m['message'].rstrip('.')}" + (f" (x{m['count']})" if m["count"] > 1 else "")
                                     for m in said["messages"][:3]))
        if left.get("count"):
            parts.append(f"{left['count']} of {left['of']} linear layers left unquantized ({', '.join(left['names'][:3])}"
                         + (", ..." if left["count"] > 3 else "") + ")")
        if parts:
            out.append(f"- **{r['experiment']}**: " + "; ".join(parts) + ".")
    return out


def _decode_cell(c, b):
    """Decode tokens/s at batch b, with its share of the measured copy bandwidth when known."""
    point = c.get("decode", {}).get(b, {})
    if point.get("status") == "out of memory":
        return "OOM"
    cell = _num(c.get("decode_tok_s", {}).get(b), "{:.1f}")
    share = 100 * (point.get("bandwidth_share") or 0)
    return cell + (f" ({share:.{0 if share >= 10 else 1}f}% BW)" if share else "")


def _compiled_words(settings):
    """What compiled mode set (cost.compiled_settings), in words; older results recorded none."""
    if not settings:
        return " with CUDA graphs"
    return (f": torch.compile mode {settings['mode']} (CUDA graphs), static shapes"
            + (", inductor's coordinate-descent tuning" if settings.get("coordinate_descent_tuning") else "")
            + (", programmatic dependent launch" if settings.get("programmatic_dependent_launch") else ""))


def _sweep_lines(results):
    """The speed sweep point by point: decode (batch sizes) and prefill (prompt lengths)."""
    decode, prefill, breaks = [], [], {}
    for r in results:
        c = r.get("cost", {})
        for mode, points in [("eager", c.get("decode", {})), ("compiled", c.get("decode_compiled", {}))]:
            for b, p in points.items():
                label = mode if p.get("compiled", mode == "eager") else f"static cache, not compiled: {p.get('why_not_compiled')}"
                said = (["generate would not compile it"] if p.get("note") else []) + \
                    ([f"{p['graph_breaks']} graph breaks"] if p.get("graph_breaks") else [])
                label += f" ({'; '.join(said)})" if said else ""
                if p.get("graph_break_reasons"):
                    breaks.setdefault(r["experiment"], p["graph_break_reasons"][0])
                if p.get("status") != "ok":
                    why = f": {p['error']}" if p.get("error") else ""
                    decode.append(f"| {r['experiment']} | {mode} | {b} | {p.get('status')}{why} | - | - | - | - |")
                    continue
                share = f"{100 * p['bandwidth_share']:.1f}" if p.get("bandwidth_share") else "-"
                decode.append(f"| {r['experiment']} | {label} | {b} | {p['tok_s']:.1f} | {p['achieved_bytes_s'] / 1e9:.1f} | "
                              f"{share} | {_mib(p['kv_cache_bytes'])} | {_mib(p.get('peak_bytes'))} |")
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


def _kld_cells(k):
    """KLD mean ± se, its 99th percentile, top-1 agreement in % ± se, PPL ratio ± se."""
    if not k:
        return ["-"] * 4
    def pm(value, se, fmt):
        return fmt.format(value) + (f" ± {fmt.format(se)}" if isinstance(se, (int, float)) else "")
    return [pm(k["kld_mean"], k["kld_mean_stderr"], "{:.5f}"), f"{k['kld_p99']:.4f}",
            pm(100 * k["same_top_p"], 100 * k["same_top_p_stderr"] if k["same_top_p_stderr"] is not None else None, "{:.2f}"),
            pm(k["ppl_ratio"], k["ppl_ratio_stderr"], "{:.4f}")]


def _protocol_lines(run, results):
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
    tasks = {}
    for r in results:
        for t, i in r.get("quality_info", {}).items():
            if t != "perplexity" and i.get("source"):
                tasks[t] = i
    for t, i in tasks.items():
        kernels = i.get("attention_kernels")
        out.append(f"- {t}: lm-eval {i.get('lm_eval_task')} from {i['source']}; "
                   f"n = {i.get('n')} documents; ± is lm-eval's standard error"
                   + (f"; batch {i.get('batch_size')}, max_length {i.get('max_length')}, max_gen_toks "
                      f"{i.get('max_gen_toks')}" if i.get("batch_size") else "")
                   + (f"; attention kernels {', '.join(kernels) if isinstance(kernels, list) else kernels}" if kernels else "")
                   + ".")
    if tasks:
        out.append(f"- Δ task metric: the paired difference from the baseline on the same documents, ± the standard "
                   f"error of the per-document differences; '(noise)': within {NOISE_Z} standard errors of 0. "
                   "Metrics lm-eval does not average per document (perplexity) show the plain difference.")
    c = run["config"]
    lengths = ", ".join(str(n) for n in prompt_lengths(c))
    settings = next((r["cost"]["compiled_settings"] for r in results if r.get("cost", {}).get("compiled_settings")), None)
    modes = "eager `generate`" + (f" and compiled (greedy loop, static KV cache, compiled step{_compiled_words(settings)}; "
                                  "see the decode sweep)" if any(r.get("cost", {}).get("decode_compiled") for r in results) else "")
    # Each result records the protocol it ran: every decode step timed (since 2026-11-27, `decode_runs`
    # in its cost) or whole calls (a resumed older run may hold both).
    stepped = [r for r in results if "decode_runs" in r.get("cost", {})]
    whole = [r for r in results if r.get("cost", {}).get("decode") and "decode_runs" not in r["cost"]]

    def which(rs):  # name the experiments only where the run holds both protocols
        return f" ({', '.join(r['experiment'] for r in rs)})" if stepped and whole else ""
    if stepped or not whole:
        kernels = next((r["cost"]["attention_kernels"]["eager"] for r in stepped if "attention_kernels" in r["cost"]), None)
        attention = f"; eager attention kernels: {', '.join(kernels) if isinstance(kernels, list) else kernels}" if kernels else ""
        runs = stepped[0]["cost"]["decode_runs"] if stepped else c.get("decode_runs", 1)
        out.append(f"- Speed{which(stepped)}: {modes}, greedy, each point after a warm-up run; TTFT = median of {c['repeats']} "
                   f"runs of generate 1 token from a prompt of {lengths} tokens at batch 1 (prefill tok/s = prompt / TTFT); "
                   f"decode tok/s = batch / median step time over the {c['new_tokens']} - 1 steps after the first token "
                   f"of {runs} run(s), from {c['decode_prompt_tokens']}-token prompts{attention}.")
    if whole:
        out.append(f"- Speed{which(whole)}: {modes}, greedy, median of {c['repeats']} runs after a warm-up; TTFT = generate 1 "
                   f"token from a prompt of {lengths} tokens at batch 1 (prefill tok/s = prompt / TTFT); decode tok/s = "
                   f"batch x ({c['new_tokens']} - 1) / (t({c['new_tokens']} tokens) - t(1 token)) from "
                   f"{c['decode_prompt_tokens']}-token prompts.")
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
    shared = [f"{r['experiment']} (with {', '.join(r['shared_host_with'])})" for r in results if r.get("shared_host_with")]
    if shared:
        out.append("- †: timed while other experiments ran on the same host, which slows eager timings (up to 48% "
                   "at batch 8 and 32 on two H200s of one host); compare speed from experiments that ran alone: "
                   + "; ".join(shared) + ".")
    held = [f"{r['experiment']} +{_mib(extra)} MiB" for r in results
            if (extra := held_beyond_weights(r.get("cost", {}))) is not None]
    if held:
        out.append("- Held after loading beyond the weights' count (GPU memory allocated once the load is done and "
                   "garbage collected, minus the weights as stored: kernel workspaces or repacked copies the "
                   "loaded layers keep outside their parameters; it counts in the peak): " + ", ".join(held) + ".")
    return out


def problem(result, run_dir):
    """(error, fix) of a result that is not ok; a result still "running" without an error is one whose
    process has not finished or was stopped with its run (summary and report say the same)."""
    if result["status"] == "running" and not result.get("error"):
        return ("not finished: still running, or the run was stopped while it ran",
                f"when the run has stopped: quantbench run --resume {run_dir}")
    return result.get("error"), result.get("fix")


def held_beyond_weights(cost):
    """Bytes the loaded model holds beyond its weights as counted, when more than 5% (CUDA only)."""
    resident, weights = cost.get("resident_after_load_bytes"), cost.get("weight_bytes")
    if resident is None or not weights or resident - weights <= 0.05 * weights:
        return None
    return resident - weights
