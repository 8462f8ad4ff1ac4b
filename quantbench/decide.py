"""From the rows to an answer: the method to ship under the user's limits, or without limits the
methods no other beats (the Pareto set).

    quantbench report results/run003 --max-weight-mib 100 --min-recovery 99 --pick-batch 8

The limits are `--max-weight-mib`, `--min-recovery` (percent, the mean recovery over the run's tasks)
and `--max-kld`; `--pick-batch` is the decode batch size that matters. Every finished experiment of
the model that meets every limit is a candidate, the baseline included (not quantizing is an answer).
With a quality limit, quality is then good enough and speed is what is left to win: the pick is the
fastest decode at that batch (the smaller weights where speed was not measured there). With only a
memory limit, the pick is the best quality: the lowest mean KLD, else the highest mean recovery.

    >>> decision(rows, {"max_weight_mib": 100, "min_recovery": 99, "max_kld": None, "pick_batch": 1})
"""
import math

from quantbench.rows import mib

# Ties: two numbers closer than this are the same for a choice (the Pareto set, the plot's frontier):
# formats of one kind differ in memory by their scales' bytes, decode timings by run-to-run noise.
MEMORY_TIE, SPEED_TIE, QUALITY_TIE_Z = 0.01, 0.05, 2.0
LIMITS = ("max_weight_mib", "min_recovery", "max_kld")
FLAGS = {"max_weight_mib": "--max-weight-mib", "min_recovery": "--min-recovery", "max_kld": "--max-kld"}


def speed(r, batch):
    """Decode tokens/s at `batch`: the faster of the modes measured there (what a user would deploy), or None."""
    rates = [r["decode"][mode][batch]["tok_s"] for mode in ("eager", "compiled") if batch in r["decode"][mode]]
    return max(rates) if rates else None


def kld(r):
    """(mean KLD, its standard error); the baseline's is 0 by construction."""
    if r["is_baseline"]:
        return 0.0, 0.0
    return (r["kld"]["kld_mean"], r["kld"]["kld_mean_stderr"] or 0.0) if r["kld"] else (None, None)


def recovery(r):
    """(mean recovery %, its standard error); the baseline's is 100."""
    if r["is_baseline"]:
        return 100.0, 0.0
    return (r["recovery"]["recovery_pct"], r["recovery"]["stderr_pct"]) if r["recovery"] else (None, None)


def misses(r, limits):
    """[(limit, how far off as a share of the limit, words)] for each limit `r` does not meet."""
    out = []
    if limits.get("max_weight_mib") is not None and r["weights_mib"] > limits["max_weight_mib"]:
        lim = limits["max_weight_mib"]
        out.append(("max_weight_mib", r["weights_mib"] / lim - 1, f"{mib(r['weights_mib'])} MiB of weights"))
    if limits.get("min_recovery") is not None:
        rec, lim = recovery(r)[0], limits["min_recovery"]
        if rec is None:
            out.append(("min_recovery", math.inf, "no task compared with the baseline"))
        elif rec < lim:
            out.append(("min_recovery", (lim - rec) / lim, f"mean recovery {rec:.1f}%, {lim - rec:.1f} points short"))
    if limits.get("max_kld") is not None:
        k, lim = kld(r)[0], limits["max_kld"]
        if k is None:
            out.append(("max_kld", math.inf, "no KLD measured"))
        elif k > lim:
            out.append(("max_kld", (k - lim) / lim if lim else math.inf, f"mean KLD {k:.4f}"))
    return out


def _quality(rows):
    """How the rows' quality is compared: KLD where every row has it, else mean recovery, else None."""
    if rows and all(kld(r)[0] is not None for r in rows):
        return "kld"
    if rows and all(recovery(r)[0] is not None for r in rows):
        return "recovery"
    return None


def _rank(rows, by, batch):
    """The rows best first: by quality (then smaller weights), or by speed at `batch`, where speeds
    within SPEED_TIE of a faster one count as equal to it and the better quality of those comes first
    (those not timed at `batch` last, the smaller first)."""
    if by != "speed":
        def key(r):
            value = kld(r)[0] if by == "kld" else recovery(r)[0]
            return value is None, (value or 0) * (1 if by == "kld" else -1), r["weights_mib"]
        return sorted(rows, key=key)

    def quality(r):
        k, rec = kld(r)[0], recovery(r)[0]
        return k if k is not None else -(rec or 0), r["weights_mib"]

    timed = sorted((r for r in rows if speed(r, batch) is not None), key=lambda r: -speed(r, batch))
    out = []
    while timed:  # the fastest left and those within the tie of it, the better quality first
        group = [r for r in timed if speed(r, batch) >= speed(timed[0], batch) * (1 - SPEED_TIE)]
        out += sorted(group, key=quality)
        timed = timed[len(group):]  # the group is the head of the speed order
    return out + sorted((r for r in rows if speed(r, batch) is None), key=lambda r: r["weights_mib"])


def _facts(r, batch):
    """'106 MiB, mean KLD 0.0584, mean recovery 98.1%, 87 tok/s at batch 1'."""
    parts = [f"{mib(r['weights_mib'])} MiB"]
    if kld(r)[0] is not None and not r["is_baseline"]:
        parts.append(f"mean KLD {kld(r)[0]:.4f}")
    if recovery(r)[0] is not None and not r["is_baseline"]:
        parts.append(f"mean recovery {recovery(r)[0]:.1f}%")
    if speed(r, batch) is not None:
        parts.append(f"{speed(r, batch):.0f} tok/s at batch {batch}")
    return ", ".join(parts)


def candidates(rows):
    """The finished experiments a choice is made from: those of the baseline's model with weights counted."""
    base = next((r for r in rows if r["is_baseline"] and r["status"] == "ok"), None)
    return [r for r in rows if r["status"] == "ok" and r["weights_mib"] and (base is None or r["model"] == base["model"])]


def decision(rows, limits):
    """{'pick', 'runner_up', 'by', 'changes'} under the limits, {'pick': None, 'closest', 'misses'} when
    none meets them, or None without limits."""
    if all(limits.get(k) is None for k in LIMITS):
        return None
    batch = limits.get("pick_batch") or 1
    pool = candidates(rows)
    meeting = [r for r in pool if not misses(r, limits)]
    if not meeting:
        scored = [(sum(m[1] for m in misses(r, limits)), r) for r in pool]
        closest = min(scored, key=lambda x: x[0], default=(None, None))[1]
        return {"pick": None, "closest": closest, "misses": misses(closest, limits) if closest else []}
    quality_limit = limits.get("min_recovery") is not None or limits.get("max_kld") is not None
    by = "speed" if quality_limit else _quality(meeting) or "speed"
    ranked = _rank(meeting, by, batch)
    pick = ranked[0]
    changes = []
    # The two best-ranked methods that some limit keeps out: the limit values that would let each in.
    admitted = {id(r) for r in meeting}
    better = [r for r in _rank(pool, by, batch) if id(r) not in admitted and _rank([r, pick], by, batch)[0] is r]
    for r in better[:2]:
        needed = []
        for key, _, words in misses(r, limits):
            if key == "max_weight_mib":
                needed.append(f"{FLAGS[key]} {math.ceil(r['weights_mib'] * 10) / 10:g}")
            elif key == "min_recovery" and recovery(r)[0] is not None:
                needed.append(f"{FLAGS[key]} {math.floor(recovery(r)[0] * 10) / 10:g}")
            elif key == "max_kld" and kld(r)[0] is not None:  # rounded up, so the value given admits it
                step = 10 ** (math.floor(math.log10(kld(r)[0])) - 3)
                needed.append(f"{FLAGS[key]} {math.ceil(kld(r)[0] / step) * step:.4g}")
        if needed and len(needed) == len(misses(r, limits)):
            changes.append(f"{' and '.join(needed)} would pick {r['experiment']} ({_facts(r, batch)})")
    if by == "speed":
        for b in sorted({b for r in meeting for mode in ("eager", "compiled") for b in r["decode"][mode]} - {batch}):
            top = _rank([r for r in meeting if speed(r, b) is not None], "speed", b)
            if top and top[0] is not pick:
                changes.append(f"at batch {b} (--pick-batch {b}) {top[0]['experiment']} is the fastest "
                               f"({speed(top[0], b):.0f} tok/s, {pick['experiment']} {speed(pick, b) or 0:.0f})")
    return {"pick": pick, "runner_up": ranked[1] if len(ranked) > 1 else None, "by": by, "changes": changes}


def _limits_words(limits):
    words = {"max_weight_mib": "at most {} MiB of weights", "min_recovery": "a mean recovery of at least {}%",
             "max_kld": "a mean KLD of at most {}"}
    return " and ".join(words[k].format(f"{limits[k]:g}") for k in LIMITS if limits.get(k) is not None)


def pick_paragraph(rows, limits):
    """The report's first paragraph under the limits: the pick, the numbers that decided it, the runner-up
    and what would change it; or that no method meets them and which came closest. None without limits."""
    d = decision(rows, limits)
    if d is None:
        return None
    batch = limits.get("pick_batch") or 1
    asked = _limits_words(limits)
    if d["pick"] is None:
        if d["closest"] is None:
            return f"No experiment finished, so none can be picked for {asked}."
        return (f"No method meets {asked}. The closest is {d['closest']['experiment']}: "
                + "; ".join(words for _, _, words in d["misses"]) + ".")
    p = d["pick"]
    why = {"speed": f"the fastest decode at batch {batch} (speeds within {SPEED_TIE:.0%} count as equal, then the "
                    "better quality)", "kld": "the lowest mean KLD", "recovery": "the highest mean recovery"}[d["by"]]
    text = f"**Ship {p['experiment']}** for {asked}: {_facts(p, batch)}. Of the methods that meet them it has {why}."
    if p["is_baseline"]:
        text += " That is the unquantized baseline: no quantized method beats it under these limits."
    if d["by"] == "speed" and speed(p, batch) is None:
        text += f" No candidate's decode was measured at batch {batch}, so the smallest weights decided."
    r = d["runner_up"]
    text += f" Runner-up: {r['experiment']} ({_facts(r, batch)})." if r else " No other method meets them."
    if d["changes"]:
        text += " What would change the pick: " + "; ".join(d["changes"]) + "."
    return text


def dominates(a, b, batch, dims):
    """a is no worse than b on every dimension (within the ties) and better on one."""
    better = False
    for dim in dims:
        if dim == "memory":
            x, y, tie = a["weights_mib"], b["weights_mib"], MEMORY_TIE * max(a["weights_mib"], b["weights_mib"])
        elif dim == "speed":
            x, y = -(speed(a, batch) or 0), -(speed(b, batch) or 0)
            tie = SPEED_TIE * max(abs(x), abs(y))
        else:
            value = kld if dim == "kld" else recovery
            (x, sx), (y, sy) = value(a), value(b)
            if dim == "recovery":
                x, y = -x, -y
            tie = QUALITY_TIE_Z * math.hypot(sx or 0, sy or 0)
        if x > y + tie:
            return False
        better = better or x < y - tie
    return better


def pareto(rows, batch=1, with_speed=True):
    """(the non-dominated rows, {experiment: the row that dominates it}) over quality (KLD, else mean
    recovery), weight memory and, where every row has it at `batch`, decode speed."""
    pool = candidates(rows)
    quality = _quality(pool)
    dims = ([quality] if quality else []) + ["memory"]
    if with_speed and pool and all(speed(r, batch) is not None for r in pool):
        dims.append("speed")
    beaten = {}
    for b in pool:
        by = next((a for a in pool if a is not b and dominates(a, b, batch, dims)), None)
        if by is not None:
            beaten[b["experiment"]] = by
    return [r for r in pool if r["experiment"] not in beaten], beaten, dims


def pareto_paragraph(rows, batch=1):
    """Without limits: the methods no other beats, and each dominated one with what beats it."""
    front, beaten, dims = pareto(rows, batch)
    if len(front) + len(beaten) < 2:
        return None
    names = {"kld": "KLD", "recovery": "mean recovery", "memory": "weight memory", "speed": f"decode speed at batch {batch}"}
    text = (f"Without limits (--max-weight-mib, --min-recovery, --max-kld), the methods no other beats on "
            f"{', '.join(names[d] for d in dims)}: " + "; ".join(f"{r['experiment']} ({_facts(r, batch)})" for r in
                                                              sorted(front, key=lambda r: r["weights_mib"])) + ".")
    if beaten:
        text += " Beaten: " + ", ".join(f"{e} by {r['experiment']}" for e, r in beaten.items()) + \
                f" (ties: memory within {MEMORY_TIE:.0%}, speed within {SPEED_TIE:.0%}, quality within " \
                f"{QUALITY_TIE_Z:g} standard errors)."
    return text
