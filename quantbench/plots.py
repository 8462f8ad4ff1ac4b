"""The report's plots, from its rows (report.rows_of): quality against weight memory with the Pareto
frontier and the noise floor, decode tokens/s against batch size with each method's bandwidth roofline, the per-token KLD
distribution, and time to first token against prompt length. Each method keeps one colour in every
plot; each plot is PNG bytes (None when the rows hold nothing to draw).

    >>> png = plot_quality_vs_memory(rows, ["run001"])
"""
import io

from quantbench import decide
from quantbench.methods import METHODS

# One colour per method, fixed by the method's place in METHODS (matplotlib's tab20, then grey).
TAB20 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
         "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
         "#dbdb8d", "#9edae5"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X"]  # one per run when several are compared


def color_of(method):
    names = list(METHODS)
    return TAB20[names.index(method) % len(TAB20)] if method in names else "#555555"


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
    if use_kld:  # points within measurement noise of a better one are off it (decide.dominates)
        front = {id(r) for r in decide.pareto([r for _, _, r in pts], with_speed=False)[0]}
        frontier = sorted((x, y) for x, y, r in pts if id(r) in front)
    else:
        frontier, best = [], float("inf")  # lower memory and lower perplexity are both better
        for x, y, _ in sorted(pts, key=lambda p: (p[0], p[1])):
            if y < best:
                frontier.append((x, y))
                best = y
    for r in (r for _, _, r in pts if r["is_floor"] and use_kld):
        ax.axhline(r["kld"]["kld_mean"], ls=":", color="grey", lw=1, label=f"noise floor ({r['experiment']})", zorder=1)
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
    ok = [r for r in rows if r["status"] == "ok" and (r["decode"]["eager"] or r["decode"]["compiled"])]
    if not ok:
        return None
    fig, ax = _figure()
    for r in ok:
        color = color_of(r["method"])
        label = r["experiment"] if len(run_labels) == 1 else f"{r['run']}/{r['experiment']}"
        for points, style, suffix in [(r["decode"]["eager"], "-", ""), (r["decode"]["compiled"], "--", " (compiled)")]:
            if points:
                bs = sorted(points)
                ax.plot(bs, [points[b]["tok_s"] for b in bs], style, marker=_marker(r, run_labels), color=color,
                        label=label + suffix)
        rate = (rates.get(r["run"]) or {}).get("copy_bytes_s")
        steps = {b: p["bytes_per_step"] for b, p in r["decode"]["eager"].items() if p.get("bytes_per_step")}
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
    for r in (r for r in ok if r["is_floor"]):
        ax.axhline(r["kld"]["kld_mean"], ls=":", color="grey", lw=1, label=f"noise floor: mean KLD of {r['experiment']}")
    if any(r["is_floor"] for r in ok):
        ax.legend(fontsize=7, loc="upper left")
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
