"""`quantbench report`: one page to decide from, built from the result files alone.

    quantbench report results/run003                  # report.md + report.html in the run folder
    quantbench report results/run003 results/run007 --out cmp/   # several runs side by side

The page says what was asked (model, card, tasks), shows the comparison table with error bars and
the best value of each column in bold, lists what failed or was skipped and why, draws four plots
(quality against weight memory with the Pareto frontier, decode tokens/s against batch size with
the bandwidth roofline, the KLD distribution per method, time to first token against prompt
length), and ends with a recommendation computed from the numbers. `report.html` embeds its plots
and has no scripts or links to fetch: it opens offline. Each method keeps one colour in every plot.
"""
import base64
import html
import io
from pathlib import Path

from quantbench.methods import METHODS
from quantbench.results import baseline, documents, held_beyond_weights, load_experiments, paired_difference, problem

# One colour per method, fixed by the method's place in METHODS (matplotlib's tab20, then grey).
TAB20 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
         "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
         "#dbdb8d", "#9edae5"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X"]  # one per run when several are compared


def color_of(method):
    names = list(METHODS)
    return TAB20[names.index(method) % len(TAB20)] if method in names else "#555555"


def load_runs(run_dirs):
    """[(run folder, run.json, [results with their per-document scores])] for each folder given."""
    runs = []
    for d in run_dirs:
        d = Path(d)
        if not (d / "run.json").exists():
            raise FileNotFoundError(f"{d} is not a quantbench run folder (no run.json)")
        run, results = load_experiments(d)
        for r in results:
            r["_docs"] = documents(d, r)
        runs.append((d, run, results))
    return runs


def rows_of(label, run, results):
    """One flat row per experiment: what the table and the plots show."""
    rows = []
    for r in results:
        q, c = r.get("quality", {}), r.get("cost", {})
        base = baseline(results, r["model"]["name"])
        row = {"run": label, "experiment": r["experiment"], "method": r["method"], "model": r["model"]["name"],
               "status": r["status"], "is_baseline": r is base,
               "weights_mib": c.get("weight_bytes", 0) / 2**20 if c.get("weight_bytes") else None,
               "peak_mib": c.get("peak_bytes", 0) / 2**20 if c.get("peak_bytes") else None,
               "held_beyond_weights_bytes": held_beyond_weights(c), "shared_host_with": r.get("shared_host_with") or [],
               "perplexity": q.get("perplexity"), "kld": q.get("kld"), "tasks": {}, "deltas": {},
               "decode": {int(b): p for b, p in c.get("decode", {}).items() if p.get("status") == "ok"},
               "decode_compiled": {int(b): p for b, p in c.get("decode_compiled", {}).items() if p.get("status") == "ok"},
               "prefill": {int(n): p for n, p in c.get("prefill", {}).items() if p.get("status") == "ok"}}
        row["error"], row["fix"] = problem(r, run.get("run_dir", label))
        if not row["prefill"] and c.get("ttft_ms"):  # results from before the prompt-length sweep
            row["prefill"] = {c.get("ttft_prompt_tokens"): {"ttft_ms": c["ttft_ms"]}}
        if not row["decode"] and c.get("decode_tok_s"):
            row["decode"] = {int(b): {"tok_s": v} for b, v in c["decode_tok_s"].items()}
        for task, metrics in q.items():
            if task in ("perplexity", "kld"):
                continue
            for m, v in metrics.items():
                if m == "n" or m.endswith("_stderr") or not isinstance(v, (int, float)):
                    continue
                row["tasks"][f"{task} {m}"] = (v, metrics.get(f"{m}_stderr"))
                if base is not None and r is not base:
                    row["deltas"][f"{task} {m}"] = paired_difference(base["_docs"].get(task, {}).get(m, {}),
                                                                     r["_docs"].get(task, {}).get(m, {}))
        rows.append(row)
    return rows


LOWER_IS_BETTER = ("perplexity",)


def _values(rows, key):
    return [key(r) for r in rows if r["status"] == "ok" and key(r) is not None]


def summary_tables(rows, several_runs):
    """The comparison as two Markdown tables, quality and cost, each [(title, header, rows)], with
    the best of each column in bold; a task cell holds the value, its standard error and its paired
    difference from the baseline."""
    ok = [r for r in rows if r["status"] == "ok"]
    task_cols = sorted({t for r in ok for t in r["tasks"]})
    # Decode tokens/s of each mode at each batch size measured: (the row's key, column name, batch).
    speed_cols = [(mode, f"{name} tok/s b={b}", b) for mode, name in [("decode", "eager"), ("decode_compiled", "compiled")]
                  for b in sorted({b for r in ok for b in r[mode]})]
    first = (["run"] if several_runs else []) + ["experiment"]
    quality_head = first + ["KLD mean", "same top %", "perplexity"] + task_cols
    shortest = min((n for r in ok for n in r["prefill"] if n), default=None)
    cost_head = first + ["weights MiB", "peak MiB"] + [name for _, name, _ in speed_cols]
    cost_head += [f"TTFT ms @{shortest}" if shortest else "TTFT ms"]

    def kld(r):
        return r["kld"]["kld_mean"] if r["kld"] else None

    def first_ttft(r):
        return r["prefill"][min(r["prefill"])]["ttft_ms"] if r["prefill"] else None  # the shortest prompt

    # The baseline's KLD is 0 by construction: the best KLD is among the other methods.
    columns = [("KLD mean", lambda r: None if r["is_baseline"] else kld(r), min),
               ("same top %", lambda r: r["kld"]["same_top_p"] if r["kld"] and not r["is_baseline"] else None, max),
               ("perplexity", lambda r: r["perplexity"], min), ("weights MiB", lambda r: r["weights_mib"], min),
               ("peak MiB", lambda r: r["peak_mib"], min), ("TTFT ms", first_ttft, min)]
    columns += [(name, lambda r, mode=mode, b=b: r[mode].get(b, {}).get("tok_s"), max) for mode, name, b in speed_cols]
    columns += [(t, lambda r, t=t: r["tasks"].get(t, (None,))[0],
                 min if t.split(" ")[-1] in LOWER_IS_BETTER else max) for t in task_cols]
    best = {}  # the best value of each column: the lowest memory, KLD, time, perplexity; the highest speed, accuracy
    for name, key, pick in columns:
        values = _values(ok, key)
        best[name] = pick(values) if values else None

    def cell(name, value, text):
        return f"**{text}**" if value is not None and value == best.get(name) else text

    def task_cell(r, t):
        v, se = r["tasks"].get(t, (None, None))
        if v is None:
            return "-"
        text = cell(t, v, f"{v:.4f}" + (f" ± {se:.4f}" if se is not None else ""))
        d = r["deltas"].get(t)
        if d and d["stderr"] is not None:
            text += f" (Δ {d['delta']:+.4f} ± {d['stderr']:.4f}{', noise' if d['within_noise'] else ''})"
        return text

    quality_lines, cost_lines = [], []
    for r in rows:
        if r["status"] != "ok":
            continue
        k = r["kld"]
        cells = ([r["run"]] if several_runs else []) + [r["experiment"] + (" (baseline)" if r["is_baseline"] else "")]
        q = cells + [cell("KLD mean", kld(r), f"{k['kld_mean']:.5f} ± {k['kld_mean_stderr'] or 0:.5f}") if k else "-"]
        q.append(cell("same top %", k["same_top_p"] if k else None, f"{100 * k['same_top_p']:.2f}") if k else "-")
        q.append(cell("perplexity", r["perplexity"], f"{r['perplexity']:.3f}") if r["perplexity"] else "-")
        q += [task_cell(r, t) for t in task_cols]
        c = cells[:-1] + [cells[-1] + (" †" if r["shared_host_with"] else "")]  # † timed beside others on its host
        c.append(cell("weights MiB", r["weights_mib"], f"{r['weights_mib']:.1f}") if r["weights_mib"] else "-")
        c.append(cell("peak MiB", r["peak_mib"], f"{r['peak_mib']:.1f}") if r["peak_mib"] else "-")
        for mode, name, b in speed_cols:
            v = r[mode].get(b, {}).get("tok_s")
            c.append("-" if v is None else cell(name, v, f"{v:.1f}"))
        v = first_ttft(r)
        c.append("-" if v is None else cell("TTFT ms", v, f"{v:.1f}"))
        quality_lines.append("| " + " | ".join(q) + " |")
        cost_lines.append("| " + " | ".join(c) + " |")
    has_quality = any(r["kld"] or r["perplexity"] or r["tasks"] for r in ok)
    return ([("Quality", quality_head, quality_lines)] if has_quality else []) + [("Cost", cost_head, cost_lines)]


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


def _mib(v):
    return f"{v:.0f}" if v >= 10 else f"{v:.2f}"


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
        paired = {id(r): [d for d in r["deltas"].values() if d] for r in with_tasks}  # metrics with per-document scores
        within = [r for r in with_tasks if paired[id(r)] and all(d["within_noise"] for d in paired[id(r)])]
        if within:
            pick = min(within, key=lambda r: r["weights_mib"])
            out.append(f"The smallest method within noise of {base['experiment']} on every task is {pick['experiment']} "
                       f"({_mib(pick['weights_mib'])} MiB of weights, {100 * pick['weights_mib'] / base['weights_mib']:.0f}% "
                       f"of {base['experiment']}'s).")
        else:
            out.append(f"No quantized method is within noise of {base['experiment']} on every task.")
    scored = [r for r in quantized if r["kld"]]
    if scored:
        close = min(scored, key=lambda r: r["kld"]["kld_mean"])
        out.append(f"The closest to the baseline's next-token distributions is {close['experiment']} (mean KLD "
                   f"{close['kld']['kld_mean']:.4f}, same top token {100 * close['kld']['same_top_p']:.1f}% of the time).")
        four_bit = [r for r in scored if METHODS.get(r["method"], {}).get("bits", 16) <= 4]
        if four_bit:
            best4 = min(four_bit, key=lambda r: r["kld"]["kld_mean"])
            out.append(f"Among methods of 4 bits or fewer, {best4['experiment']} has the lowest KLD "
                       f"({best4['kld']['kld_mean']:.4f}) at {_mib(best4['weights_mib'])} MiB.")
    fast = [r for r in ok if r["decode"].get(1)]
    if fast:
        top = max(fast, key=lambda r: r["decode"][1]["tok_s"])
        out.append(f"Fastest eager decode at batch 1: {top['experiment']} ({top['decode'][1]['tok_s']:.0f} tok/s)"
                   + (f", {top['decode'][1]['tok_s'] / base['decode'][1]['tok_s']:.2f}x {base['experiment']}."
                      if base and base["decode"].get(1) and top is not base else "."))
    compiled = [r for r in ok if r["decode_compiled"].get(1)]
    if compiled:
        top = max(compiled, key=lambda r: r["decode_compiled"][1]["tok_s"])
        out.append(f"Fastest compiled decode at batch 1: {top['experiment']} ({top['decode_compiled'][1]['tok_s']:.0f} tok/s).")
    smallest = min(quantized, key=lambda r: r["weights_mib"])
    out.append(f"Smallest weights: {smallest['experiment']} ({_mib(smallest['weights_mib'])} MiB).")
    return " ".join(out)


def _png(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.2))


def _finish(fig, ax, xlabel, ylabel, title):
    """Axes of a size sweep (log2 x), labelled, with a legend and grid; the figure as PNG bytes."""
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _legend(ax)
    ax.grid(alpha=0.3, which="both")
    return _png(fig)


def _legend(ax):
    """The legend beside the axes, where it hides no point or line."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)


def _label_points(ax, points):
    """Name each point next to it, moving a name to another side of its point when it would cover one
    already placed (names of methods with close memory and quality otherwise print over each other)."""
    fig = ax.figure
    fig.canvas.draw()  # fixes the axes' scales, so data map to display positions
    points_per_px = 72 / fig.dpi
    points = sorted(points, key=lambda p: (p[0], p[1]))
    at = [[v * points_per_px for v in ax.transData.transform((x, y))] for x, y, _ in points]  # in points
    placed = [(px - 4, py - 4, px + 4, py + 4) for px, py in at]  # the markers, then the names drawn so far
    offsets = [(4, 3), (4, -10), (-4, 3), (-4, -10), (4, 12), (4, -19), (-4, 12), (-4, -19)]
    for (x, y, name), (px, py) in zip(points, at):
        width, height = 4.6 * len(name), 8  # 8-point text, roughly
        for dx, dy in offsets:
            left = px + dx if dx > 0 else px + dx - width
            box = (left, py + dy, left + width, py + dy + height)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8,
                    ha="left" if dx > 0 else "right")


def _marker(r, run_labels):
    return MARKERS[run_labels.index(r["run"]) % len(MARKERS)]


def plot_quality_vs_memory(rows, run_labels):
    """Mean KLD (or perplexity when there is no KLD) against weight memory, the Pareto frontier drawn."""
    ok = [r for r in rows if r["status"] == "ok" and r["weights_mib"]]
    use_kld = any(r["kld"] for r in ok)
    pts = [(r["weights_mib"], r["kld"]["kld_mean"] if use_kld else r["perplexity"], r) for r in ok
           if (r["kld"] if use_kld else r["perplexity"])]
    if not pts:
        return None
    fig, ax = _figure()
    for x, y, r in pts:
        ax.scatter(x, y, color=color_of(r["method"]), marker=_marker(r, run_labels), s=60, zorder=3,
                   label=r["experiment"] if len(run_labels) == 1 else f"{r['run']}/{r['experiment']}")
    frontier, best = [], float("inf")  # lower memory and lower divergence are both better
    for x, y, _ in sorted(pts, key=lambda p: (p[0], p[1])):
        if y < best:
            frontier.append((x, y))
            best = y
    ax.plot([p[0] for p in frontier], [p[1] for p in frontier], "--", color="black", lw=1, label="Pareto frontier", zorder=2)
    ax.set_xlabel("weight memory (MiB, as stored)")
    ax.set_ylabel("mean KL divergence from the baseline (nats/token)" if use_kld else "perplexity")
    if use_kld and all(y > 0 for _, y, _ in pts if y):
        positive = [y for _, y, _ in pts if y > 0]
        if positive and max(positive) / min(positive) > 20:
            ax.set_yscale("symlog", linthresh=min(positive))
    ax.set_title("Quality against memory (lower left is better)")
    _legend(ax)
    _label_points(ax, [(x, y, r["experiment"]) for x, y, r in pts])
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_decode_vs_batch(rows, run_labels, rates):
    """Decode tokens/s against batch size per method (eager solid, compiled dashed), with each method's
    bandwidth roofline: copy bandwidth x batch / bytes read per step."""
    ok = [r for r in rows if r["status"] == "ok" and (r["decode"] or r["decode_compiled"])]
    if not ok:
        return None
    fig, ax = _figure()
    for r in ok:
        color = color_of(r["method"])
        label = r["experiment"] if len(run_labels) == 1 else f"{r['run']}/{r['experiment']}"
        for points, style, suffix in [(r["decode"], "-", ""), (r["decode_compiled"], "--", " (compiled)")]:
            if points:
                bs = sorted(points)
                ax.plot(bs, [points[b]["tok_s"] for b in bs], style, marker=_marker(r, run_labels), color=color,
                        label=label + suffix)
        rate = (rates.get(r["run"]) or {}).get("copy_bytes_s")
        steps = {b: p["bytes_per_step"] for b, p in r["decode"].items() if p.get("bytes_per_step")}
        if rate and steps:
            bs = sorted(steps)
            ax.plot(bs, [rate * b / steps[b] for b in bs], ":", color=color, lw=1)
    ax.set_yscale("log")
    return _finish(fig, ax, "batch size (sequences)", "decode tokens/s", "Decode speed; dotted: bandwidth roofline of each method")


def plot_kld_distribution(rows, run_labels):
    """The per-token KLD distribution of each method: box (quartiles), whiskers (5th-95th percentile),
    and the 99th percentile and maximum as points."""
    ok = [r for r in rows if r["status"] == "ok" and r["kld"] and r["kld"].get("kld_percentiles") and not r["is_baseline"]]
    if not ok:
        return None
    fig, ax = _figure()
    stats = []
    for r in ok:
        p = r["kld"]["kld_percentiles"]
        stats.append({"med": p[50], "q1": p[25], "q3": p[75], "whislo": p[5], "whishi": p[95],
                      "fliers": [p[99], r["kld"]["kld_max"]],
                      "label": r["experiment"] if len(run_labels) == 1 else f"{r['run']}/{r['experiment']}"})
    boxes = ax.bxp(stats, showfliers=True, patch_artist=True)
    for patch, r in zip(boxes["boxes"], ok):
        patch.set_facecolor(color_of(r["method"]))
        patch.set_alpha(0.7)
    ax.set_yscale("log")
    ax.set_ylabel("KL divergence per token (nats)")
    ax.set_title("Where the divergence from the baseline lies (box: quartiles; whiskers: 5-95%; points: 99%, max)")
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def plot_ttft_vs_prompt(rows, run_labels):
    """Time to first token against prompt length (batch 1), per method."""
    ok = [r for r in rows if r["status"] == "ok" and r["prefill"]]
    if not ok:
        return None
    fig, ax = _figure()
    for r in ok:
        ns = sorted(n for n in r["prefill"] if n)
        ax.plot(ns, [r["prefill"][n]["ttft_ms"] for n in ns], "-", marker=_marker(r, run_labels),
                color=color_of(r["method"]), label=r["experiment"] if len(run_labels) == 1 else f"{r['run']}/{r['experiment']}")
    return _finish(fig, ax, "prompt length (tokens)", "time to first token (ms)", "Time to first token, batch 1")


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


def build(run_dirs, out=None):
    """Write report.md (with its PNGs beside it) and a self-contained report.html; returns their paths."""
    runs = load_runs(run_dirs)
    out = Path(out) if out else Path(runs[0][0])
    out.mkdir(parents=True, exist_ok=True)
    several = len(runs) > 1
    names = [d.name for d, _, _ in runs]
    clash = len(set(names)) < len(names)  # run001 of two output folders: name them by folder too
    labels = [f"{d.parent.name}/{d.name}" if clash else d.name for d, _, _ in runs]
    rows, rates = [], {}
    for label, (d, run, results) in zip(labels, runs):
        rows += rows_of(label, run, results)
        rates[label] = run.get("device_rates") or {}

    models = sorted({m["name"] for _, run, _ in runs for m in run["models"]})
    cards = sorted({run["environment"].get("gpu") or f"CPU ({run['environment'].get('cpu_count')} cores)" for _, run, _ in runs})
    question = f"Which quantization of {', '.join(models)} on {', '.join(cards)}? {measured(rows, runs)}"
    tables = summary_tables(rows, several)
    plots = [("quality-vs-memory", "Quality against weight memory", plot_quality_vs_memory(rows, labels)),
             ("decode-vs-batch", "Decode speed against batch size", plot_decode_vs_batch(rows, labels, rates)),
             ("kld-distribution", "KL divergence per token", plot_kld_distribution(rows, labels)),
             ("ttft-vs-prompt", "Time to first token against prompt length", plot_ttft_vs_prompt(rows, labels))]
    problems = [r for r in rows if r["status"] != "ok"]
    notes = list(dict.fromkeys(f"{m['name']}: {m['note']}" for _, run, _ in runs for m in run["models"] if m.get("note")))
    diffs = differences(runs) if several else []
    advice = [recommendation(rows)] if not several else [
        f"{label}: {recommendation([r for r in rows if r['run'] == label])}" for label in labels]  # a paragraph per run

    md = [f"# quantbench report: {', '.join(labels)}", "", question, ""]
    md += [f"> {n}" for n in notes] + ([""] if notes else [])
    md += ["## Recommendation", ""] + [line for paragraph in advice for line in (paragraph, "")] + ["## Comparison", "",
           "Best value of each column in bold. ± is a standard error; Δ is the paired difference from the baseline on "
           "the same documents, 'noise' when within 1.96 standard errors.", ""]
    for title, head, lines in tables:
        md += [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|", *lines, ""]
    shared = [f"{r['experiment']}" + (f" ({r['run']})" if several else "") for r in rows if r["shared_host_with"]]
    if shared:
        md += ["† Timed while other experiments ran on the same host (a Ray run), which slows eager timings: compare "
               "speed from experiments that ran alone. " + ", ".join(shared) + ".", ""]
    held = [f"{r['experiment']}" + (f" ({r['run']})" if several else "") + f" +{r['held_beyond_weights_bytes'] / 2**20:.0f} MiB"
            for r in rows if r["held_beyond_weights_bytes"] is not None]
    if held:
        md += ["Held after loading beyond the weights' count (kernel workspaces or repacked copies the loaded layers "
               "keep outside their parameters; part of the peak): " + ", ".join(held) + ".", ""]
    if problems:
        md += ["## Failed and skipped", ""]
        md += [f"- **{r['experiment']}** ({r['run']}) {r['status']}: {str(r['error']).rstrip('.')}."
               + (f" Fix: {r['fix']}" if r.get("fix") else "") for r in problems] + [""]
    for name, title, png in plots:
        if png:
            (out / f"report-{name}.png").write_bytes(png)
            md += [f"## {title}", "", f"![{title}](report-{name}.png)", ""]
    if diffs:
        md += ["## How the runs differ", "", "| setting | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        md += [f"| {k} | " + " | ".join(str(v) for v in values) + " |" for k, values in diffs] + [""]
    md += ["Protocols: see each run's summary.md; numbers come from the result files in " + ", ".join(str(d) for d, _, _ in runs) + "."]
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.html").write_text(_html(md, plots))
    return out / "report.md", out / "report.html"


def _html(md_lines, plots):
    """The Markdown above as a standalone HTML page: headings, paragraphs, tables and embedded images."""
    images = {f"report-{name}.png": png for name, _, png in plots if png}
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
