"""One row per experiment, from the result files alone: the numbers every table, note and plot of
the pages shows (report.py), with the paired differences from the baseline worked out once; and the
comparison tables made from the rows, the same in summary.md and the report.

    >>> rows = rows_of("run001", run_dir, *load_run(run_dir))
"""
import math
import statistics
from pathlib import Path

import numpy as np

from quantbench.methods import BASELINE_METHODS, METHODS
from quantbench.results import documents, load_run

SIGNIFICANCE = 0.05  # a paired difference with a p-value at or above this is marked as noise
Z95 = 1.96
BOOTSTRAP_RESAMPLES = 10_000
# The metric a task is summarised by (its place in the mean recovery, its flips): the first of these it
# has, as the Open LLM Leaderboard and the quantized model cards that report recovery take them.
PRIMARY_METRICS = ("acc_norm", "acc", "exact_match", "em", "exact", "f1")
LOWER_IS_BETTER = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


# How to read the tables, above them on every page.
READING = ("Best value of each column in bold. ± is a standard error; Δ is the paired difference from the baseline "
           "on the same documents with the p-value of a paired test (McNemar's exact test where every score is 0 or 1, "
           "a paired bootstrap otherwise), 'noise' when p ≥ 0.05. Recovery: the method's score over the baseline's "
           "x 100 on the same documents, [95% interval]; lost and gained: the documents the baseline got right and the "
           "method wrong, and the reverse (equal accuracy can hide many of both).")


def _paired(base, other):
    """The per-document scores both have, as two float64 arrays in document order."""
    common = sorted(set(base) & set(other))
    return np.array([base[i] for i in common], float), np.array([other[i] for i in common], float)


def binary(b, q):
    """Whether every paired score is 0 or 1 (accuracy, exact match), so McNemar's test and flips apply."""
    return bool(np.isin(b, (0.0, 1.0)).all() and np.isin(q, (0.0, 1.0)).all())


def paired_test(b, q):
    """(test name, two-sided p-value) for "q and b score the same on average", on paired per-document
    scores: McNemar's exact test (a binomial test on the discordant documents) where every score is
    0 or 1, else a paired bootstrap of the mean difference (the resampled differences centred on 0)."""
    from scipy.stats import binomtest

    if binary(b, q):
        lost, gained = int(((b == 1) & (q == 0)).sum()), int(((b == 0) & (q == 1)).sum())
        return "McNemar exact", (binomtest(lost, lost + gained, 0.5).pvalue if lost + gained else 1.0)
    d = q - b
    rng = np.random.default_rng(0)
    # in blocks of 1000 resamples: all at once holds 10,000 x documents indices (GBs for a full task)
    means = np.concatenate([d[rng.integers(0, len(d), (1000, len(d)))].mean(axis=1)
                            for _ in range(BOOTSTRAP_RESAMPLES // 1000)])
    extreme = np.abs(means - d.mean()) >= abs(d.mean())
    return "paired bootstrap", float((extreme.sum() + 1) / (BOOTSTRAP_RESAMPLES + 1))


def paired_difference(base, other):
    """other - base on the documents both scored: {doc_id: value} each -> mean difference, its standard
    error (of the per-document differences), the documents used, the paired test and its p-value, and
    whether it is within noise (p >= SIGNIFICANCE)."""
    b, q = _paired(base, other)
    if not len(b):
        return None
    d = q - b
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None
    test, p = paired_test(b, q) if len(d) > 1 else (None, None)
    return {"delta": float(d.mean()), "stderr": se, "n": len(d), "test": test, "p_value": p,
            "within_noise": p is not None and p >= SIGNIFICANCE}


def recovery(base, other):
    """other's mean score over base's, x 100, on the documents both scored (as published: quantized /
    baseline x 100), with a 95% interval by the delta method on the paired per-document scores (the
    ratio's standard error is that of the mean of q - R b, over the mean of b)."""
    b, q = _paired(base, other)
    if len(b) < 2 or b.mean() == 0:
        return None
    r = q.mean() / b.mean()
    se = (q - r * b).std(ddof=1) / math.sqrt(len(b)) / b.mean()
    return {"recovery_pct": float(100 * r), "low_pct": float(100 * (r - Z95 * se)), "high_pct": float(100 * (r + Z95 * se)),
            "stderr_pct": float(100 * se), "n": len(b)}


def flips(base, other):
    """For 0/1 scores: the share of documents the baseline got right and other wrong (lost), and the
    reverse (gained), each with its standard error; None for other scores."""
    b, q = _paired(base, other)
    if len(b) < 2 or not binary(b, q):
        return None
    n = len(b)
    out = {"n": n}
    for name, hit in (("lost", (b == 1) & (q == 0)), ("gained", (b == 0) & (q == 1))):
        share = float(hit.mean())
        out[f"{name}_p"], out[f"{name}_p_stderr"] = share, math.sqrt(share * (1 - share) / n)
    return out


def primary_metric(metrics):
    """The metric a task is summarised by, of those it has per document (PRIMARY_METRICS' order)."""
    return next((m for m in PRIMARY_METRICS if m in metrics), None)


def against_baseline(base_docs, docs):
    """Each task's comparison with the baseline on the same documents, from per-document scores
    ({task: {metric: {doc_id: value}}} each): per metric the paired difference and its test, the
    recovery of metrics where higher is better, the flips of 0/1 metrics; and the mean recovery over
    the tasks' primary metrics, its interval from theirs (tasks taken as independent samples)."""
    out = {"tasks": {}}
    for task, metrics in docs.items():
        base = base_docs.get(task, {})
        per = {}
        for m, scores in metrics.items():
            if m not in base:
                continue
            pair = paired_difference(base[m], scores)
            if pair is None:
                continue
            higher = m not in LOWER_IS_BETTER
            per[m] = {**pair, "recovery": recovery(base[m], scores) if higher else None, "flips": flips(base[m], scores)}
        if per:
            out["tasks"][task] = {"primary": primary_metric(per) or next(iter(per)), "metrics": per}
    recs = [t["metrics"][t["primary"]]["recovery"] for t in out["tasks"].values()]
    recs = [r for r in recs if r]
    if recs:
        mean = statistics.fmean(r["recovery_pct"] for r in recs)
        se = math.sqrt(sum(r["stderr_pct"] ** 2 for r in recs)) / len(recs)
        out["recovery_mean"] = {"recovery_pct": mean, "low_pct": mean - Z95 * se, "high_pct": mean + Z95 * se,
                                "stderr_pct": se, "tasks": sorted(t for t, v in out["tasks"].items()
                                                                  if v["metrics"][v["primary"]]["recovery"])}
    return out


def baseline(results, model_name):
    """The model's first finished float result (its KLD reference runs first): what deltas are measured against."""
    return next((r for r in results if r["model"]["name"] == model_name and r["method"] in BASELINE_METHODS
                 and r["status"] == "ok" and r.get("engine") != "vllm"), None)  # fp16@vllm scores against it


def kernel_of(result):
    """A short name for what ran the matmuls: the quantized layer class, torchao tensor or HQQ backend."""
    b = result.get("backend") or {}
    parts = [c for c in b.get("linear_classes", []) if c != "Linear"]
    if parts and b.get("linear_modules"):  # which library's QuantLinear: qlinear_tritonv2, marlin, ...
        parts = [", ".join(parts) + f" ({', '.join(m.rsplit('.', 1)[-1] for m in b['linear_modules'])})"]
    if b.get("torchao_tensor"):
        parts.append(b["torchao_tensor"])
    if b.get("quanto_tensor"):
        parts.extend(b["quanto_tensor"])
    if b.get("backend_fallback"):
        parts.append(f"fallback {b['backend_fallback']['backend']}")
    if b.get("hqq_backend"):
        parts.append(b["hqq_backend"].replace("HQQBackend.", "HQQ "))
    if b.get("quant_methods"):  # what vLLM put on the layers (AutoGPTQLinearMethod, UnquantizedEmbeddingMethod, ...)
        parts.append("vLLM " + ", ".join(b["quant_methods"]))
    if b.get("kernels"):  # and the kernels those chose (MacheteLinearKernel, ...)
        parts.append(", ".join(b["kernels"]))
    return ", ".join(parts) or ("torch Linear" if b else "-")


def problem(result, run_dir):
    """(error, fix) of a result that is not ok; a result still "running" without an error is one whose
    process has not finished or was stopped with its run."""
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


def load_runs(run_dirs):
    """[(run folder, run.json, [results])] for each folder given."""
    return [(Path(d), *load_run(d)) for d in run_dirs]


def rows_of(label, run_dir, run, results):
    """One flat row per experiment: what every table, note and plot shows."""
    docs = {r["experiment"]: documents(run_dir, r) for r in results}
    rows = []
    for r in results:
        q, c = r.get("quality", {}), r.get("cost", {})
        base = baseline(results, r["model"]["name"])
        qz = r.get("quantization") or {}
        decode = c.get("decode", {})
        row = {"run": label, "experiment": r["experiment"], "method": r["method"], "model": r["model"]["name"],
               "status": r["status"], "is_baseline": r is base, "result": r,
               # a checkpoint someone else made says its bits when loaded (METHODS cannot)
               "bits": METHODS.get(r["method"], {}).get("bits") or (r.get("backend") or {}).get("bits"),
               "weights_mib": c["weight_bytes"] / 2**20 if c.get("weight_bytes") else None,
               "peak_mib": c["peak_bytes"] / 2**20 if c.get("peak_bytes") else None,
               "quantize_s": qz.get("quantize_s"), "cached": qz.get("reused_from_cache"), "load_s": c.get("load_s"),
               "held_beyond_weights_bytes": held_beyond_weights(c), "shared_host_with": r.get("shared_host_with") or [],
               "perplexity": q.get("perplexity"), "kld": q.get("kld"), "tasks": {}, "deltas": {},
               "kv_cache": r.get("kv_cache"), "kv_bytes": c.get("kv_cache") or {},
               "ppl_delta": None, "kernel": kernel_of(r), "sanity": r.get("sanity"),
               "decode": {mode: {int(b): p for b, p in decode.get(mode, {}).items() if p.get("status") == "ok"}
                          for mode in ("eager", "compiled")},
               "prefill": {int(n): p for n, p in c.get("prefill", {}).items() if p.get("status") == "ok"}}
        row["error"], row["fix"] = problem(r, run_dir)
        compared = base is not None and r is not base
        if compared and row["perplexity"] and base["quality"].get("perplexity"):
            row["ppl_delta"] = row["perplexity"] / base["quality"]["perplexity"] - 1
        row["against"] = against_baseline(docs[base["experiment"]], docs[r["experiment"]]) if compared else None
        # The same method in transformers, for a vLLM experiment (`<id>@vllm`): the engines' parity.
        twin = r.get("engine") == "vllm" and next((x for x in results if x["status"] == "ok" and
                                                   x["experiment"] == r["experiment"].removesuffix("@vllm")), None)
        row["twin"] = twin or None
        row["parity"] = twin and against_baseline(docs[twin["experiment"]], docs[r["experiment"]])
        row["recovery"] = row["against"] and row["against"].get("recovery_mean")
        # A float format against the baseline (bf16 against fp16, f16 in llama.cpp): the KLD of rounding alone.
        row["is_floor"] = compared and r["status"] == "ok" and bool(row["kld"]) and (row["bits"] or 0) >= 16 \
            and not row["kv_cache"]
        row["long"] = {int(n): v for n, v in (q.get("long_context") or {}).items()}
        row["window"] = (r.get("quality_info", {}).get("perplexity") or {}).get("window")
        for task, metrics in q.items():
            if task in ("perplexity", "kld", "long_context"):
                continue
            for m, v in metrics.items():
                if m == "n" or m.endswith("_stderr") or not isinstance(v, (int, float)):
                    continue
                row["tasks"][f"{task} {m}"] = (v, metrics.get(f"{m}_stderr"))
                if compared:
                    pair = row["against"]["tasks"].get(task, {}).get("metrics", {}).get(m)
                    b = base["quality"].get(task, {}).get(m)
                    # metrics lm-eval does not average per document (LAMBADA's perplexity): the plain difference
                    row["deltas"][f"{task} {m}"] = pair or ({"delta": v - b, "stderr": None, "p_value": None, "test": None,
                                                             "within_noise": False} if isinstance(b, (int, float)) else None)
        rows.append(row)
    return rows




def mib(v):
    return f"{v:.0f}" if v >= 10 else f"{v:.2f}"


def comparison_tables(rows, several_runs):
    """The comparison as two Markdown tables, quality and cost, each (title, header, lines), of the
    experiments that finished (the others are listed with their reasons): the best of each column in
    bold, a task cell with its value, standard error and paired difference from the baseline, decode
    cells with their share of the measured copy bandwidth."""
    ok = [r for r in rows if r["status"] == "ok"]
    task_cols = sorted({t for r in ok for t in r["tasks"]})
    speed_cols = [(mode, f"{mode} tok/s b={b}", b) for mode in ("eager", "compiled")
                  for b in sorted({b for r in ok for b in r["decode"][mode]})]
    first = (["run"] if several_runs else []) + ["experiment"]
    quality_head = first + ["KLD mean", "KLD p99", "same top %", "PPL(Q)/PPL(base)", "perplexity"] + task_cols + ["sanity"]
    shortest = min((n for r in ok for n in r["prefill"]), default=None)
    cost_head = first + ["weights MiB", "peak MiB", "quantize s", "load s"] + [name for _, name, _ in speed_cols]
    cost_head += [f"TTFT ms @{shortest}" if shortest else "TTFT ms", "kernel"]

    def kld(r, key="kld_mean"):
        return r["kld"][key] if r["kld"] and not r["is_baseline"] else None  # the baseline's is 0 by construction

    def ttft(r):
        return r["prefill"][shortest]["ttft_ms"] if shortest in r["prefill"] else None

    columns = [("KLD mean", kld, min), ("KLD p99", lambda r: kld(r, "kld_p99"), min),
               ("same top %", lambda r: kld(r, "same_top_p"), max), ("perplexity", lambda r: r["perplexity"], min),
               ("weights MiB", lambda r: r["weights_mib"], min), ("peak MiB", lambda r: r["peak_mib"], min),
               ("TTFT ms", ttft, min)]
    columns += [(name, lambda r, mode=mode, b=b: r["decode"][mode].get(b, {}).get("tok_s"), max) for mode, name, b in speed_cols]
    columns += [(t, lambda r, t=t: r["tasks"].get(t, (None,))[0], min if t.split(" ")[-1] in LOWER_IS_BETTER else max)
                for t in task_cols]
    best = {}
    for name, key, pick in columns:
        values = [key(r) for r in ok if key(r) is not None]
        best[name] = pick(values) if values else None

    def cell(name, value, text):
        return f"**{text}**" if value is not None and value == best.get(name) else text

    def pm(value, se, fmt):
        return fmt.format(value) + (f" ± {fmt.format(se)}" if isinstance(se, (int, float)) else "")

    def task_cell(r, t):
        v, se = r["tasks"].get(t, (None, None))
        if v is None:
            return "-"
        text = cell(t, v, pm(v, se, "{:.4f}"))
        d = r["deltas"].get(t)
        if d and d["stderr"] is not None:
            text += f" (Δ {d['delta']:+.4f} ± {d['stderr']:.4f}, {p_text(d['p_value'])}{', noise' if d['within_noise'] else ''})"
        elif d:
            text += f" (Δ {d['delta']:+.4f})"
        return text

    def decode_cell(r, mode, name, b):
        p = r["decode"][mode].get(b)
        if p is None:
            return "-"
        share = 100 * (p.get("bandwidth_share") or 0)
        return cell(name, p["tok_s"], f"{p['tok_s']:.1f}") + (f" ({share:.{0 if share >= 10 else 1}f}% BW)" if share else "")

    quality_lines, cost_lines = [], []
    for r in ok:
        k = r["kld"]
        cells = ([r["run"]] if several_runs else []) + [r["experiment"] + (" (baseline)" if r["is_baseline"] else
                                                                           " (noise floor)" if r["is_floor"] else "")]
        bound = "≥ " if k and k.get("kld_is_lower_bound") else ""  # vLLM's, from its top k (engines/vllm.py)
        q = cells + ([cell("KLD mean", kld(r), bound + pm(k["kld_mean"], k["kld_mean_stderr"], "{:.5f}")),
                      cell("KLD p99", kld(r, "kld_p99"), f"{k['kld_p99']:.4f}"),
                      cell("same top %", kld(r, "same_top_p"), pm(100 * k["same_top_p"], k["same_top_p_stderr"] and
                                                                  100 * k["same_top_p_stderr"], "{:.2f}")),
                      pm(k["ppl_ratio"], k["ppl_ratio_stderr"], "{:.4f}")] if k else ["-"] * 4)
        q.append(cell("perplexity", r["perplexity"], f"{r['perplexity']:.3f}")
                 + (f" ({100 * r['ppl_delta']:+.1f}%)" if r["ppl_delta"] is not None else "") if r["perplexity"] else "-")
        q += [task_cell(r, t) for t in task_cols]
        s = r["sanity"]
        q.append("-" if not s else f"DEGENERATE: {s['problem']}" if s["degenerate"] else "ok")
        c = cells[:-1] + [cells[-1] + (" †" if r["shared_host_with"] else "")]  # † timed beside others on its host
        c.append(cell("weights MiB", r["weights_mib"], f"{r['weights_mib']:.1f}") if r["weights_mib"] else "-")
        c.append(cell("peak MiB", r["peak_mib"], f"{r['peak_mib']:.1f}") if r["peak_mib"] else "-")
        c.append("-" if r["quantize_s"] is None else f"{r['quantize_s']:.1f}" + (" (cached)" if r["cached"] else ""))
        c.append("-" if r["load_s"] is None else f"{r['load_s']:.1f}")
        c += [decode_cell(r, mode, name, b) for mode, name, b in speed_cols]
        v = ttft(r)
        c += ["-" if v is None else cell("TTFT ms", v, f"{v:.1f}"), r["kernel"]]
        quality_lines.append("| " + " | ".join(q) + " |")
        cost_lines.append("| " + " | ".join(c) + " |")
    has_quality = any(r["kld"] or r["perplexity"] or r["tasks"] for r in ok)
    return ([("Quality", quality_head, quality_lines)] if has_quality else []) + against_table(ok, several_runs) + \
        parity_table(ok, several_runs) + long_table(ok, several_runs) + kv_table(ok, several_runs) + \
        [("Cost", cost_head, cost_lines)]


def kv_table(ok, several_runs):
    """Each quantized KV cache beside its method with the model's own cache: the bytes it holds at each of
    the sweep's context lengths, its KLD against the method's, and decode at batch 1: [(title, header, lines)], or []."""
    quantized = [r for r in ok if r["kv_cache"]]
    if not quantized:
        return []
    lengths = sorted({int(n) for r in quantized for n in r["kv_bytes"]})
    head = (["run"] if several_runs else []) + ["experiment", "cache", *(f"KV MiB @{n}" for n in lengths), "KLD mean",
                                                "KLD mean, model's cache", "eager tok/s b=1", "model's cache tok/s b=1"]
    lines = []
    for r in quantized:
        kv, same = r["kv_cache"], next((x for x in ok if x["experiment"] == r["kv_cache"]["of"]), None)

        def mib(n):
            b = r["kv_bytes"].get(str(n))
            return "-" if not b else f"{b['bytes'] / 2**20:.2f} of {b['model_cache_bytes'] / 2**20:.2f} " \
                                     f"({100 * (b['bytes'] / b['model_cache_bytes'] - 1):+.0f}%)"

        def kld(x):
            if not (x and x["kld"]) or x["is_baseline"]:
                return "-"
            se = x["kld"]["kld_mean_stderr"]
            return f"{x['kld']['kld_mean']:.5f}" + (f" ± {se:.5f}" if se is not None else "")

        def tok_s(x):
            p = x and x["decode"]["eager"].get(1)
            return f"{p['tok_s']:.1f}" if p else "-"

        cells = ([r["run"]] if several_runs else []) + [r["experiment"], f"{kv['precision']} ({kv['backend']})"]
        cells += [mib(n) for n in lengths] + [kld(r), "0 (the baseline)" if same and same["is_baseline"] else kld(same),
                                              tok_s(r), tok_s(same)]
        lines.append("| " + " | ".join(cells) + " |")
    return [("Quantized KV cache", head, lines)]


def long_table(ok, several_runs):
    """Perplexity and KLD at the run's own window against each --long-context length, each perplexity
    with its change from the baseline's at the same length: [(title, header, lines)], or []."""
    lengths = sorted({n for r in ok for n in r["long"]})
    if not lengths:
        return []
    base = {r["model"]: r for r in ok if r["is_baseline"]}
    window = next((r["window"] for r in ok if r["window"]), None)
    head = (["run"] if several_runs else []) + ["experiment", f"perplexity @{window}", "KLD mean"]
    head += [x for n in lengths for x in (f"perplexity @{n}", f"KLD mean @{n}")]

    def ppl(value, reference):
        if value is None:
            return "-"
        change = f" ({100 * (value / reference - 1):+.1f}%)" if reference else ""
        return f"{value:.3f}{change}"

    def kld_text(k, r):
        return f"{k['kld_mean']:.5f} ± {k['kld_mean_stderr']:.5f}" if k and not r["is_baseline"] else "-"

    lines = []
    for r in ok:
        b = base.get(r["model"])
        cells = ([r["run"]] if several_runs else []) + [r["experiment"] + (" (baseline)" if r["is_baseline"] else "")]
        cells += [ppl(r["perplexity"], None if r is b or b is None else b["perplexity"]), kld_text(r["kld"], r)]
        for n in lengths:
            mine, theirs = r["long"].get(n, {}), (b["long"].get(n, {}) if b else {})
            cells += [ppl(mine.get("perplexity"), None if r is b else theirs.get("perplexity")), kld_text(mine.get("kld"), r)]
        lines.append("| " + " | ".join(cells) + " |")
    return [("Long context", head, lines)]


def p_text(p):
    return "p < 0.001" if p < 0.001 else f"p {p:.2g}" if p < 0.995 else "p 1"


def against_table(ok, several_runs):
    """Recovery, flips and the paired test of each task's primary metric, and the mean recovery, per
    experiment compared with its baseline: [(title, header, lines)], or [] where no task was compared."""
    compared = [r for r in ok if r["against"] and r["against"]["tasks"]]
    tasks = sorted({t for r in compared for t in r["against"]["tasks"]})
    if not tasks:
        return []
    primary = {t: next(r["against"]["tasks"][t]["primary"] for r in compared if t in r["against"]["tasks"]) for t in tasks}
    head = (["run"] if several_runs else []) + ["experiment", "mean recovery %"] + [f"{t} {primary[t]}" for t in tasks]

    def recovery_text(c):
        return f"{c['recovery_pct']:.1f} [{c['low_pct']:.1f}, {c['high_pct']:.1f}]"

    def task_text(t):
        c = t["metrics"][t["primary"]]
        parts = [recovery_text(c["recovery"]) + "%" if c["recovery"] else f"Δ {c['delta']:+.4f}"]
        f = c["flips"]
        if f:
            parts.append(f"lost {100 * f['lost_p']:.1f} ± {100 * f['lost_p_stderr']:.1f}%, "
                         f"gained {100 * f['gained_p']:.1f} ± {100 * f['gained_p_stderr']:.1f}%")
        if c["p_value"] is not None:
            parts.append(f"{p_text(c['p_value'])} ({c['test']}){', noise' if c['within_noise'] else ''}")
        return "; ".join(parts)

    lines = []
    for r in compared:
        cells = ([r["run"]] if several_runs else []) + [r["experiment"] + (" (noise floor)" if r["is_floor"] else "")]
        cells.append(recovery_text(r["recovery"]) if r["recovery"] else "-")
        cells += [task_text(r["against"]["tasks"][t]) if t in r["against"]["tasks"] else "-" for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return [("Against the baseline", head, lines)]


def parity_table(ok, several_runs):
    """Each method in vLLM against the same method in transformers, on the same tokens and documents: the
    perplexity ratio, both KLDs from the baseline (vLLM's a lower bound), and each task's primary metric's
    paired difference, flips and test: [(title, header, lines)], or [] where no method ran in both."""
    pairs = [r for r in ok if r["twin"] and (r["perplexity"] or r["kld"] or r["parity"]["tasks"])]
    if not pairs:
        return []
    tasks = sorted({t for r in pairs for t in r["parity"]["tasks"]})
    head = (["run"] if several_runs else []) + ["vLLM experiment", "PPL vLLM / transformers", "KLD mean vLLM / transformers"]
    head += [f"{t} Δ" for t in tasks]

    def kld_text(r):
        mine, theirs = r["kld"], r["twin"]["quality"].get("kld")
        if not mine:
            return "-"
        return f"≥ {mine['kld_mean']:.5f} / " + (f"{theirs['kld_mean']:.5f}" if theirs else "-")

    def task_text(t):
        c = t["metrics"][t["primary"]]
        f = c["flips"]
        return (f"{t['primary']} {c['delta']:+.4f}" + (f" ± {c['stderr']:.4f}" if c["stderr"] is not None else "")
                + (f", {p_text(c['p_value'])}" if c["p_value"] is not None else "")
                + (f"; lost {100 * f['lost_p']:.1f}%, gained {100 * f['gained_p']:.1f}%" if f else ""))

    lines = []
    for r in pairs:
        theirs = r["twin"]["quality"].get("perplexity")
        ratio = r["perplexity"] / theirs if r["perplexity"] and theirs else None
        cells = ([r["run"]] if several_runs else []) + [r["experiment"], "-" if ratio is None else f"{ratio:.4f}", kld_text(r)]
        cells += [task_text(r["parity"]["tasks"][t]) if t in r["parity"]["tasks"] else "-" for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return [("vLLM against transformers, the same method", head, lines)]


def table(title, head, lines):
    return [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|", *lines, ""]
