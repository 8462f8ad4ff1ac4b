"""The same comparison two ways, timed: the naive way and quantbench's way.

Naive, as the course project did it: one method after another in one process, each loaded and
evaluated with lm-eval's defaults through an HFLM at batch size 1 (no bound on generation beyond
lm-eval's own default, max_length left to lm-eval). quantbench: `quantbench run` with its defaults
(batched evaluation, explicit max_length and generation bound, one process per method, plus the
perplexity, KLD and speed measurements the naive way does not make). Each way runs as a fresh
`python` process, timed from outside from its start to its end (interpreter, imports and all), so
neither pays for the other's imports. The script checks that each method's task metric agrees
between the two within their error bars and prints both wall times and their ratio. Meant for the
GPU machine; on a CPU use a small --limit.

    python benchmarks/naive_vs_quantbench.py --methods fp16,nf4,fp4 --task squad_v1 --metric f1 \\
        --limit 200 --data-dir ../shared/data
"""
import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def naive(model_path, methods, task, limit, data_dir, device):
    """One method after another, lm-eval at batch 1 with its defaults.
    Returns ({method: metrics}, seconds in all, seconds in lm-eval)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from quantbench import tasks
    from quantbench.methods import METHODS

    task_dir = Path(tempfile.mkdtemp())
    resolved = tasks.resolve_task(task, data_dir=data_dir, hub=tasks.hub_reachable(), task_dir=task_dir)
    if resolved.get("status") == "skipped":
        sys.exit(f"naive_vs_quantbench: {task}: {resolved['reason']}; {resolved['fix']}")
    scores, start, evaluating = {}, time.perf_counter(), 0.0
    for m in methods:
        model, _ = METHODS[m]["load"](model_path, device=device)
        lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(model_path), batch_size=1)
        t = time.perf_counter()
        out = simple_evaluate(model=lm, tasks=[resolved["lm_eval_task"]], limit=limit,
                              task_manager=TaskManager(include_path=str(task_dir)), verbosity="WARNING")
        evaluating += time.perf_counter() - t
        scores[m] = {k.split(",")[0]: v for k, v in out["results"][resolved["lm_eval_task"]].items() if "," in k}
        del model, lm
    return scores, time.perf_counter() - start, evaluating


def naive_way(model_path, methods, task, limit, data_dir, device):
    """`naive` in a fresh interpreter (this script with --naive-json), timed from outside as
    quantbench's run is. Returns ({method: metrics}, seconds in all, seconds in lm-eval)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "naive.json"
        cmd = [sys.executable, __file__, "--naive-json", str(path), "--model", model_path, "--methods", ",".join(methods),
               "--task", task, "--limit", str(limit), "--data-dir", str(data_dir), "--device", device]
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        seconds = time.perf_counter() - start
        out = json.loads(path.read_text())
    return out["scores"], seconds, out["eval_s"]


def quantbench_way(model, methods, task, limit, data_dir, out):
    """`quantbench run` with its defaults. Returns ({method: metrics}, seconds in all, seconds in its
    task phases (lm-eval, from each result's phases_s), run folder)."""
    cmd = [sys.executable, "-m", "quantbench", "run", "--model", model, "--methods", ",".join(methods),
           "--tasks", task, "--limit", str(limit), "--data-dir", str(data_dir), "--out", str(out)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - start
    run_dir = sorted(Path(out).glob("run*"))[-1]
    results = {m: json.loads((run_dir / f"{m}.json").read_text()) for m in methods}
    evaluating = sum(r["phases_s"].get("tasks", 0) for r in results.values())
    return {m: r["quality"].get(task, {}) for m, r in results.items()}, seconds, evaluating, run_dir


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="fp16,nf4,fp4")
    p.add_argument("--task", default="squad_v1", help="a CoQA-style generation task (coqa online)")
    p.add_argument("--metric", default="f1")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda where there is one)")
    p.add_argument("--out", default=None, help="folder for quantbench's run (default: a temporary one)")
    p.add_argument("--naive-json", help=argparse.SUPPRESS)  # internal: run the naive way here, write its scores
    args = p.parse_args()
    methods = [m.strip() for m in args.methods.split(",")]
    if args.naive_json:  # the naive way's own process: --model is the checkpoint's path
        scores, _, evaluating = naive(args.model, methods, args.task, args.limit, args.data_dir, args.device)
        Path(args.naive_json).write_text(json.dumps({"scores": scores, "eval_s": evaluating}))
        return
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out or tempfile.mkdtemp())
    # The checkpoint both ways load (for the demo: the GGUF converted once), made before either clock starts.
    from quantbench import models

    models.resolve_model(args.model, cache_dir=models.cache_folder())

    ours, ours_s, ours_eval_s, run_dir = quantbench_way(args.model, methods, args.task, args.limit, args.data_dir, out)
    run = json.loads((run_dir / "run.json").read_text())
    model_path = run["models"][0]["path"]  # the same checkpoint
    theirs, theirs_s, theirs_eval_s = naive_way(model_path, methods, args.task, args.limit, args.data_dir, args.device)

    print(f"\n| method | naive {args.metric} | quantbench {args.metric} | difference | agree (within 2 combined s.e.) |")
    print("|---|---|---|---|---|")
    agree = True
    for m in methods:
        a, b = theirs[m].get(args.metric), ours[m].get(args.metric)
        se = math.hypot(theirs[m].get(f"{args.metric}_stderr") or 0, ours[m].get(f"{args.metric}_stderr") or 0)
        ok = a is not None and b is not None and abs(a - b) <= 2 * se + 1e-12
        agree &= ok
        if a is None or b is None:
            print(f"| {m} | {a} | {b} | - | NO (a side has no {args.metric}) |")
            continue
        print(f"| {m} | {a:.4f} | {b:.4f} | {b - a:+.4f} ± {se:.4f} | {'yes' if ok else 'NO'} |")
    print(f"\nwhole comparison, each a fresh process: naive {theirs_s:.1f} s (loading and evaluation only); quantbench {ours_s:.1f} s "
          f"(the same evaluation plus perplexity, KLD and the speed sweep); ratio {theirs_s / ours_s:.2f}x")
    phases = {}
    for per in run["phases_s"].values():
        for k, v in per.items():
            phases[k] = phases.get(k, 0) + v
    print("quantbench's phases, summed over methods (s): " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
          + f"; outside the experiments' processes (set-up, device rates, report) {ours_s - phases.get('total', 0):.1f}")
    without_speed = ours_s - phases.get("speed", 0)  # derived from the phases, not a separate run
    print(f"quantbench less its speed sweep (which the naive way does not run): {without_speed:.1f} s; "
          f"ratio {theirs_s / without_speed:.2f}x")
    print(f"evaluation alone (lm-eval, {args.task}, {len(methods)} methods): naive {theirs_eval_s:.1f} s, quantbench "
          f"{ours_eval_s:.1f} s; ratio {theirs_eval_s / ours_eval_s:.2f}x. quantbench's run: {run_dir}")
    sys.exit(0 if agree else 1)


if __name__ == "__main__":
    main()
