"""A run: a numbered folder under --out, every experiment in its own process, results kept.

    >>> run_dir = create_run(config)          # results/run001/run.json
    >>> execute(run_dir)                      # one child process per experiment, summary.md at the end

Each experiment runs in a process of its own, forked from a server that has imported torch,
transformers and lm-eval once for the run (quantbench.forkserver; where it cannot run, as `python -m
quantbench.experiment RUN_DIR ID`), so a crash, a CUDA error or an out-of-memory in one method
cannot take the sweep down or leave memory behind for the next.
The child writes its own result; if it dies without finishing (killed, segfault), the parent
records it as failed with the signal or exit code and whatever the child had measured. `--resume`
runs the experiments whose result is missing or not finished; Ctrl-C stops the current child,
keeps everything finished and says how to resume.
"""
import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from quantbench import forkserver
from quantbench.config import SUITES
from quantbench.methods import BASELINE_METHODS, BASELINE_OF, METHODS, checkpoint_dtype, group_size_problem, why_not_runnable
from quantbench.models import model_slug, resolve_model
from quantbench.results import environment, read_json, summary_markdown, write_json
from quantbench.tasks import hub_reachable, resolve_task

FINISHED = ("ok", "skipped")
RUN_FORMAT = 2  # run.json's format: 2 records each model's compute dtype


class RunError(Exception):
    """The run cannot start or resume; the message says why and what to do."""


def now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def resolve_device(requested):
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    return requested


def next_run_dir(out):
    """results/run001, run002, ...: numbered in order, created here so two runs never share one."""
    out.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in out.iterdir() if (m := re.fullmatch(r"run(\d+)", p.name))]
    n = max(numbers, default=0) + 1
    while True:
        path = out / f"run{n:03d}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1


def check_writable(out):
    """Fail early, before any work and without creating anything, if --out cannot hold results."""
    existing = out.resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RunError(f"cannot write results to {out}: {existing} is a file, not a folder; pass another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunError(f"cannot write results to {out}: no write permission on {existing}; pass another --out")


def create_run(config, cache_dir, device=None):
    """Resolve models and tasks, make the run folder and write run.json; returns the folder.
    `device`: the workers' device when the experiments run elsewhere (Ray, Modal)."""
    out = Path(config.out)
    check_writable(out)
    device = device or resolve_device(config.device)
    models = [resolve_model(m, cache_dir=cache_dir) for m in config.models]
    run_dir = next_run_dir(out)
    hub = hub_reachable()
    names = config.tasks
    if config.suite and not hub and names == SUITES[config.suite]["tasks"]:  # offline stand-ins: CoQA -> SQuAD v1.1
        names = [SUITES[config.suite].get("offline", {}).get(t, t) for t in names]
    tasks = [resolve_task(t, data_dir=config.data_dir, hub=hub, task_dir=run_dir / "tasks") for t in names]
    experiments = []
    for m in models:
        m["dtype"], m["dtype_from"] = checkpoint_dtype(m["path"])
        m["compute_dtype"] = config.compute_dtype or m["dtype"]
        m["compute_dtype_why"] = (f"--compute-dtype {config.compute_dtype}" if config.compute_dtype else
                                  f"the checkpoint's dtype ({m['dtype_from']}: {m['dtype']})")
        mine = []
        for e in map(for_model, config.experiments, [m] * len(config.experiments)):
            if any(x["name"] == e["name"] for x in mine):  # baseline on a float16 model beside fp16
                continue
            exp_id = e["name"] if len(models) == 1 else f"{model_slug(m['name'])}--{e['name']}"
            mine.append({"id": exp_id, "model": m["name"], **e})
        # The baseline whose next-token distributions the others are compared with (the KL divergence)
        # runs first: the float method of the model's compute dtype, else the first float method.
        reference = next((e for e in mine if e["method"] == BASELINE_OF[m["compute_dtype"]]),
                         next((e for e in mine if e["method"] in BASELINE_METHODS), None))
        m["reference_experiment"] = reference and reference["id"]
        experiments += sorted(mine, key=lambda e: e is not reference)
    run = {"quantbench_run": RUN_FORMAT, "run_dir": str(run_dir.resolve()), "started": now(), "finished": None,
           "status": "running", "device": device, "hub_reachable": hub, "cache_dir": str(cache_dir), "config": dataclasses.asdict(config),
           "environment": environment(), "models": models, "tasks": tasks, "experiments": experiments}
    write_json(run_dir / "run.json", run)
    return run_dir


def for_model(exp, model):
    """The experiment as it runs on `model`: `baseline` becomes the float method of the model's compute
    dtype (fp16, bf16 or fp32), named so unless the experiment has a name of its own."""
    if exp["method"] != "baseline":
        return exp
    method = BASELINE_OF[model["compute_dtype"]]
    name = method if exp["name"] == "baseline" else exp["name"]
    return {**exp, "name": name, "method": method, "baseline_from": model["compute_dtype_why"]}


def check_resumable(run_dir):
    """Check that run_dir is a quantbench run that can be finished; RunError for a missing, corrupt or
    foreign folder, or one whose model checkpoint is gone."""
    run_dir = Path(run_dir)
    path = run_dir / "run.json"
    if not run_dir.is_dir():
        raise RunError(f"--resume {run_dir}: no such folder")
    if not path.exists():
        raise RunError(f"--resume {run_dir}: no run.json there, so it is not a quantbench run folder")
    try:
        run = read_json(path)
    except ValueError as e:
        raise RunError(f"--resume {run_dir}: run.json is corrupt ({e}); start a new run instead") from None
    if not isinstance(run, dict) or "quantbench_run" not in run or "experiments" not in run:
        raise RunError(f"--resume {run_dir}: run.json was not written by quantbench; start a new run instead")
    if run["quantbench_run"] != RUN_FORMAT:
        raise RunError(f"--resume {run_dir}: its run.json is format {run['quantbench_run']}, this quantbench writes "
                       f"format {RUN_FORMAT}; start a new run instead")
    for m in run["models"]:
        if not Path(m["path"]).exists():
            raise RunError(f"--resume {run_dir}: the model checkpoint {m['path']} is gone; run it again from scratch")


def _status_of(run_dir, exp_id):
    path = run_dir / f"{exp_id}.json"
    try:
        return read_json(path).get("status")
    except (OSError, ValueError):
        return None


def _describe_exit(code):
    """How an experiment's process ended without its result; None: its forking server ended first."""
    if code is None:
        return "the preloaded server that forked the experiment's process ended, and the process with it"
    if code < 0:
        name = signal.Signals(-code).name
        why = {"SIGKILL": " (killed: out of host memory, or by hand)", "SIGSEGV": " (segmentation fault in native code)",
               "SIGABRT": " (aborted in native code)"}.get(name, "")
        return f"the experiment process died by {name}{why}"
    return f"the experiment process exited with code {code} before writing its result"


def empty_result(run, exp):
    """The result of an experiment that measured nothing (skipped, or ended before it wrote one)."""
    model = next(m for m in run["models"] if m["name"] == exp["model"])
    return {"experiment": exp["id"], "method": exp["method"], "settings": exp["settings"], "model": model,
            "device": run["device"], "quality": {}, "quality_info": {}, "cost": {}, "phases_s": {}}


def _record_unfinished(run_dir, exp, run, status, error, duration):
    """The child ended without a final result: keep what it measured, say why it stopped."""
    path = run_dir / f"{exp['id']}.json"
    try:
        result = read_json(path)
    except (OSError, ValueError):
        result = empty_result(run, exp)
    result.update(status=status, error=error, duration_s=round(duration, 3), finished=now(),
                  fix=f"run again with: quantbench run --resume {run_dir}")
    write_json(path, result)


def run_child(run_dir, exp, run, server=None):
    """Run one experiment in its own process and return its result: a child forked from the preloaded
    `server` (quantbench.forkserver, ready) when there is one, else `python -m quantbench.experiment
    RUN_DIR ID`. A child that ends without a result is recorded as failed with the reason, and Ctrl-C
    stops it, records it as interrupted and propagates."""
    started = time.perf_counter()
    try:
        if server is not None:
            code = forkserver.run(server, run_dir, exp["id"])
        else:
            child = subprocess.Popen([sys.executable, "-m", "quantbench.experiment", str(run_dir), exp["id"]],
                                     preexec_fn=forkserver.ignore_sigint)
            try:
                code = child.wait()
            except KeyboardInterrupt:
                child.terminate()
                child.wait()
                raise
    except KeyboardInterrupt:
        _record_unfinished(run_dir, exp, run, "interrupted", "stopped by Ctrl-C", time.perf_counter() - started)
        raise
    if _status_of(run_dir, exp["id"]) not in ("ok", "failed", "skipped"):
        _record_unfinished(run_dir, exp, run, "failed", _describe_exit(code), time.perf_counter() - started)
    return read_json(run_dir / f"{exp['id']}.json")


def _skip_unrunnable(run_dir, exp, run):
    """Record `exp` as skipped, before its process starts, when it cannot run here: a group size that does
    not tile the model (first: installing a library would not help), a GPU it needs, a missing library."""
    model = next(m for m in run["models"] if m["name"] == exp["model"])
    group = exp["settings"].get("group_size", METHODS[exp["method"]]["group_size"])
    shape = group_size_problem(model["path"], exp["method"], group)
    problems = [p for p in [shape and (shape, "pick another method for this model"),
                            why_not_runnable(exp["method"], run["device"])] if p]
    if not problems:
        return False
    write_json(run_dir / f"{exp['id']}.json", {**empty_result(run, exp), "status": "skipped",
                                                "error": "; and ".join(p[0] for p in problems),
                                                "fix": "; ".join(p[1] for p in problems), "finished": now()})
    return True


def measure_device_rates(device):
    """The device's copy bandwidth and matmul rate (the roofline's ceilings), measured once per run in
    a child process so this one never holds the GPU; an error is recorded instead of the rates."""
    import json

    print("Measuring the device's copy bandwidth and matmul rate...", flush=True)
    r = subprocess.run([sys.executable, "-m", "quantbench.cost", device], capture_output=True, text=True,
                       timeout=600, preexec_fn=forkserver.ignore_sigint)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": (r.stderr.strip().splitlines() or ["no output"])[-1][:300], "device": device}


def unfinished(run_dir, run):
    """The experiments still to run, after saying how many are done; marks the run as running."""
    todo = [e for e in run["experiments"] if _status_of(run_dir, e["id"]) not in FINISHED]
    done = len(run["experiments"]) - len(todo)
    if done:
        print(f"Resuming {run_dir}: {done} experiment(s) already finished, {len(todo)} to run.", flush=True)
    # The folder may have moved since it was made; the experiments read their task files from here.
    run.update(status="running", resumed=now() if done else None, run_dir=str(run_dir.resolve()))
    write_json(run_dir / "run.json", run)
    return todo


def record_phases(run_dir, run, exp, result, seconds):
    """The time of each phase of each experiment, in run.json (only the launching process writes it)."""
    run.setdefault("phases_s", {})[exp["id"]] = {**result.get("phases_s", {}), "total": round(seconds, 3)}
    write_json(run_dir / "run.json", run)


def execute(run_dir, server=None):
    """Run every unfinished experiment of the run in its own process; returns the exit code.
    `server`: the preloaded server, if the caller started it already (`quantbench run` does, first
    thing, so that its imports overlap the run's set-up); it is stopped here either way."""
    run_dir = Path(run_dir)
    run = read_json(run_dir / "run.json")
    todo = unfinished(run_dir, run)
    done = len(run["experiments"]) - len(todo)
    interrupted = False
    try:
        if todo and server is None:
            server = forkserver.start()
        if todo and "device_rates" not in run:
            # The server imports while a GPU's rates are measured; on a CPU its imports would take a
            # core from the matmul rate being measured, so there they are waited for first.
            if run["device"] != "cuda":
                forkserver.ready(server)
            run["device_rates"] = measure_device_rates(run["device"])
            write_json(run_dir / "run.json", run)
        for i, exp in enumerate(todo, done + 1):
            label = f"[{i}/{len(run['experiments'])}] {exp['id']} ({exp['method']} on {exp['model']})"
            if _skip_unrunnable(run_dir, exp, run):
                print(f"{label}: skipped: {read_json(run_dir / (exp['id'] + '.json'))['error']}", flush=True)
                continue
            print(f"{label}: running", flush=True)
            started = time.perf_counter()
            if server and not forkserver.ready(server):
                print(f"quantbench: {server['problem']}; each experiment starts its own interpreter instead", flush=True)
                server = None
            if server and "forkserver_import_s" not in run:  # what the experiments did not each pay
                run["forkserver_import_s"] = server["ready"].get("import_s")
            result = run_child(run_dir, exp, run, server)
            record_phases(run_dir, run, exp, result, time.perf_counter() - started)
            extra = f": {result['error']}" if result.get("error") else ""
            print(f"{label}: {result['status']} in {time.perf_counter() - started:.1f} s{extra}", flush=True)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        forkserver.stop(server)
    return finish(run_dir, interrupted)


def finish(run_dir, interrupted):
    """Close the run: status in run.json, summary.md, the report; returns the exit code."""
    run = read_json(run_dir / "run.json")
    run.update(status="interrupted" if interrupted else "finished", finished=now())
    write_json(run_dir / "run.json", run)
    summary = summary_markdown(run_dir)
    (run_dir / "summary.md").write_text(summary)
    try:  # the page to decide from; a failure here never costs the results
        from quantbench import report

        report_md, report_html = report.build([run_dir])
        summary += f"\nThe page to decide from: {report_html} (and {report_md.name}).\n"
    except Exception as e:  # noqa: BLE001 - any plotting or file error is reported, the run stands
        print(f"quantbench: the report could not be written ({type(e).__name__}: {e}); "
              f"the results are in {run_dir}; retry with `quantbench report {run_dir}`", file=sys.stderr)
    print("\n" + summary, flush=True)
    if interrupted:
        print(f"Stopped. Finished results are kept; continue with: quantbench run --resume {run_dir}", flush=True)
        return 130
    return 0
