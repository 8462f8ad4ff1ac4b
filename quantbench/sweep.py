"""A run: a numbered folder under --out, every experiment in its own process, results kept.

    >>> run_dir = new_run(config)                 # results/run001/run.json
    >>> execute(run_dir, local.local_launcher())  # each experiment, summary.md and the report at the end

The one run loop (execute) sends each unfinished experiment to a launcher: a process of its own on
this machine (local.local_launcher), a Ray task (remote.ray_launcher) or a Modal call
(modal_app.modal_launcher). The baselines go first (the others' KLD needs their reference),
every result is written the moment it comes back, a crash or a lost worker is recorded as failed
with what it had measured, Ctrl-C stops what runs (recorded as interrupted) and keeps the rest, and
`--resume` runs whatever is not finished.
"""
import concurrent.futures
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from quantbench import rows
from quantbench.config import SUITES, ConfigError, from_args, from_run, make_experiment
from quantbench.methods import (BASELINE_METHODS, BASELINE_OF, METHODS, checkpoint_dtype, engine_of, group_size_problem,
                                vllm_serves, why_not_runnable)
from quantbench.models import ModelError, cache_folder, model_slug, resolve_model
from quantbench.results import (SCHEMA, ResultsError, documents, environment, load_run, read_json, read_run_file,
                                write_files, write_json)
from quantbench.tasks import check_tasks, hub_reachable, include_path_tasks, resolve_task

FINISHED = ("ok", "skipped")


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


def new_run(config, *, sweep_file=None, device=None):
    """The run folder for `config`: the methods `--all` adds, task names checked, run.json written, the
    sweep file copied in. `device`: the workers' when the experiments run elsewhere (Ray, Modal)."""
    if config.all_methods:
        have = {e["name"] for e in config.experiments}
        device = device or resolve_device(config.device)
        here = config.backend == "local"  # elsewhere, a missing library is found (and recorded as skipped) on the worker
        config.experiments += [make_experiment(n) for n in METHODS  # the baselines by name, not `baseline`
                               if n not in have and n != "baseline" and METHODS[n]["family"] != "checkpoint"
                               and METHODS[n]["engine"] in config.engines and why_not_runnable(n, device, libraries=here) is None]
    hub = hub_reachable()
    check_tasks(config.tasks, include_path=config.include_path, hub=hub)
    cache_dir = cache_folder(config.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    run_dir = create_run(config, cache_dir, device=device, hub=hub)
    if sweep_file:
        shutil.copy(sweep_file, run_dir / ("sweep" + Path(sweep_file).suffix))
    print(f"Run folder: {run_dir}", flush=True)
    return run_dir


def create_run(config, cache_dir, device=None, hub=None):
    """Resolve models and tasks, make the run folder and write run.json; returns the folder. `hub`:
    whether the hub answers (default: asked here)."""
    out = Path(config.out)
    check_writable(out)
    device = device or resolve_device(config.device)
    models = [resolve_model(m, cache_dir=cache_dir) for m in config.models]
    if config.apply_chat_template and config.tasks:
        check_chat_templates(models, config.trust_remote_code)
    user = include_path_tasks(config.include_path)[0] if config.include_path else {}
    run_dir = next_run_dir(out)
    hub = hub_reachable() if hub is None else hub
    names = config.tasks
    if config.suite and not hub and names == SUITES[config.suite]["tasks"]:  # offline stand-ins: CoQA -> SQuAD v1.1
        names = [SUITES[config.suite].get("offline", {}).get(t, t) for t in names]
    tasks = [resolve_task(t, data_dir=config.data_dir, hub=hub, task_dir=run_dir / "tasks", user=user) for t in names]
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
        # Each quantized KV cache beside each transformers experiment (llama.cpp keeps its own cache).
        own = list(mine)
        mine += [{**e, "id": f"{e['id']}-kv-{kv}", "name": f"{e['name']}-kv-{kv}", "kv_cache": kv, "kv_of": e["id"]}
                 for kv in config.kv_cache if kv != "fp16" for e in own if engine_of(e) == "transformers"]
        # Each method vLLM serves again in vLLM, on the checkpoint its transformers experiment made.
        if "vllm" in config.engines:
            mine += [{**e, "id": f"{e['id']}@vllm", "name": f"{e['name']}@vllm", "engine": "vllm"}
                     for e in own if vllm_serves(e["method"])]
        experiments += sorted(mine, key=lambda e: e is not reference)
    run = {"schema": SCHEMA, "run_dir": str(run_dir.resolve()), "started": now(), "finished": None, "status": "running",
           "device": device, "hub_reachable": hub, "cache_dir": str(cache_dir), "config": dataclasses.asdict(config),
           "environment": environment(), "models": models, "tasks": tasks, "experiments": experiments}
    write_json(run_dir / "run.json", run)
    return run_dir


def check_chat_templates(models, trust_remote_code):
    """--apply-chat-template needs each model's tokenizer to have a chat template (both engines apply the
    Hugging Face tokenizer's); ConfigError naming the model that has none. Architecture-only models
    measure no quality."""
    from transformers import AutoTokenizer

    for m in models:
        if m["kind"] != "arch" and not AutoTokenizer.from_pretrained(m["path"], trust_remote_code=trust_remote_code).chat_template:
            raise ConfigError(f"--apply-chat-template: the tokenizer of {m['name']} has no chat template (none in "
                              f"{m['path']}'s tokenizer files); drop the flag, or compare a chat model")


def for_model(exp, model):
    """The experiment as it runs on `model`: `baseline` becomes the float method of the model's compute
    dtype (fp16, bf16 or fp32), named so unless the experiment has a name of its own."""
    if exp["method"] != "baseline":
        return exp
    method = BASELINE_OF[model["compute_dtype"]]
    name = method if exp["name"] == "baseline" else exp["name"]
    return {**exp, "name": name, "method": method, "baseline_from": model["compute_dtype_why"]}


def check_resumable(run_dir):
    """The run.json of a quantbench run that can be finished; RunError for a missing, corrupt or foreign
    folder, one of another schema, or one whose model checkpoint is gone."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"--resume {run_dir}: no such folder")
    if not (run_dir / "run.json").exists():
        raise RunError(f"--resume {run_dir}: no run.json there, so it is not a quantbench run folder")
    try:
        run = read_run_file(run_dir / "run.json")
    except ResultsError as e:
        raise RunError(f"--resume {run_dir}: {e}; start a new run instead") from None
    for m in run["models"]:
        if not Path(m["path"]).exists():
            raise RunError(f"--resume {run_dir}: the model checkpoint {m['path']} is gone; run it again from scratch")
    return run


def status_of(run_dir, exp_id):
    try:
        return read_json(Path(run_dir) / f"{exp_id}.json").get("status")
    except (OSError, ValueError):
        return None


def empty_result(run, exp):
    """The result of an experiment that measured nothing (skipped, or ended before it wrote one)."""
    model = next(m for m in run["models"] if m["name"] == exp["model"])
    return {"schema": SCHEMA, "experiment": exp["id"], "method": exp["method"], "engine": engine_of(exp),
            "settings": exp["settings"], "model": model, "device": run["device"], "quality": {}, "quality_info": {},
            "cost": {}, "phases_s": {}}


def record_unfinished(run_dir, exp, run, status, error, duration, fix=None):
    """The experiment ended without a final result: keep what it measured, say why it stopped (and what to
    do: `fix`, else run it again)."""
    path = Path(run_dir) / f"{exp['id']}.json"
    try:
        result = read_json(path)
    except (OSError, ValueError):
        result = empty_result(run, exp)
    result.update(status=status, error=error, duration_s=round(duration, 3), finished=now(),
                  fix=fix or f"run again with: quantbench run --resume {run_dir}")
    write_json(path, result)


def skip_unrunnable(run_dir, exp, run, libraries=True):
    """Record `exp` as skipped, before its process starts, when it cannot run here: a group size that does
    not tile the model (first: installing a library would not help), a GPU it needs, a missing library
    (`libraries`: looked for on this machine; a worker elsewhere finds its own)."""
    from quantbench.engines import vllm

    model = next(m for m in run["models"] if m["name"] == exp["model"])
    group = exp["settings"].get("group_size", METHODS[exp["method"]]["group_size"])
    shape = group_size_problem(model["path"], exp["method"], group)
    problems = [p for p in [shape and (shape, "pick another method for this model"),
                            why_not_runnable(exp["method"], run["device"], libraries=libraries),
                            engine_of(exp) == "vllm" and vllm.why_not_runnable(run["device"])] if p]
    if not problems:
        return False
    write_json(Path(run_dir) / f"{exp['id']}.json", {**empty_result(run, exp), "status": "skipped",
                                                      "error": "; and ".join(p[0] for p in problems),
                                                      "fix": "; ".join(p[1] for p in problems), "finished": now()})
    return True


def measure_device_rates(device):
    """The device's copy bandwidth and matmul rate (the roofline's ceilings), measured once per run in
    a child process so this one never holds the GPU; an error is recorded instead of the rates."""
    print("Measuring the device's copy bandwidth and matmul rate...", flush=True)
    r = subprocess.run([sys.executable, "-m", "quantbench.cost", device], capture_output=True, text=True, timeout=600,
                       preexec_fn=_ignore_sigint)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": (r.stderr.strip().splitlines() or ["no output"])[-1][:300], "device": device}


def _ignore_sigint():
    """In a child of the sweep, before Python starts: Ctrl-C is the sweep's to handle (it stops the child
    itself), and on Linux the child dies with its parent (no orphan keeps the GPU)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def compare_with_baseline(run_dir, result):
    """The result with its comparison with the model's baseline on the same documents added
    (`against_baseline`: recovery, flips and paired tests, rows.against_baseline) and written, when
    both have per-document task scores; as it was otherwise."""
    base = rows.baseline(load_run(run_dir)[1], result["model"]["name"])
    if result["status"] != "ok" or base is None or base["experiment"] == result["experiment"]:
        return result
    docs, base_docs = documents(run_dir, result), documents(run_dir, base)
    if docs and base_docs:
        result["against_baseline"] = {"baseline": base["experiment"], **rows.against_baseline(base_docs, docs)}
        write_json(run_dir / f"{result['experiment']}.json", result)
    return result


def execute(run_dir, launcher):
    """Run every unfinished experiment of the run through `launcher` (baselines first, then the rest);
    returns the exit code. A launcher is a dict of plain functions: facts(run) -> what run.json adds
    (the device's rates); submit(run_dir, run, exp) -> a future of the result files to write here (None
    when the experiment wrote them itself); cancel(future); close(); and optionally after(run_dir, run)."""
    run_dir = Path(run_dir)
    run = read_run_file(run_dir / "run.json")
    todo = [e for e in run["experiments"] if status_of(run_dir, e["id"]) not in FINISHED]
    total, done = len(run["experiments"]), len(run["experiments"]) - len(todo)
    if done:
        print(f"Resuming {run_dir}: {done} experiment(s) already finished, {len(todo)} to run.", flush=True)
    # The folder may have moved since it was made; the experiments read their task files from here.
    run.update(status="running", resumed=now() if done else None, run_dir=str(run_dir.resolve()))
    write_json(run_dir / "run.json", run)
    references = {m["reference_experiment"] for m in run["models"] if m.get("reference_experiment")}
    pending, interrupted = {}, False
    try:
        if todo and "device_rates" not in run:
            try:
                run.update(launcher["facts"](run))
            except Exception as e:  # noqa: BLE001 - no roofline then; the experiments still run
                run["device_rates"] = {"error": f"{type(e).__name__}: {str(e).strip()[:300]}", "device": run["device"]}
            write_json(run_dir / "run.json", run)
        for wave in ([e for e in todo if e["id"] in references], [e for e in todo if e["id"] not in references]):
            for exp in wave:
                if skip_unrunnable(run_dir, exp, run, libraries=launcher["name"] == "local"):
                    done += 1
                    print(f"[{done}/{total}] {exp['id']} ({exp['method']} on {exp['model']}): skipped: "
                          f"{read_json(run_dir / (exp['id'] + '.json'))['error']}", flush=True)
                    continue
                pending[launcher["submit"](run_dir, run, exp)] = (exp, time.perf_counter())
            while pending:
                finished, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in finished:
                    exp, started = pending.pop(future)
                    try:
                        write_files(run_dir, future.result() or {})
                    except Exception as e:  # noqa: BLE001 - a lost worker, a dead node, a cancelled call
                        why = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                        record_unfinished(run_dir, exp, run, "failed", f"the {launcher['name']} worker running it "
                                          f"failed or was lost: {type(e).__name__}: {why}", time.perf_counter() - started)
                    result = compare_with_baseline(run_dir, read_json(run_dir / f"{exp['id']}.json"))
                    run.setdefault("phases_s", {})[exp["id"]] = {**result.get("phases_s", {}),
                                                                "total": round(time.perf_counter() - started, 3)}
                    write_json(run_dir / "run.json", run)
                    done += 1
                    extra = f": {result['error']}" if result.get("error") else ""
                    # its own time where it has one: since submission counts the wait behind the others too
                    took = result.get("duration_s") or time.perf_counter() - started
                    print(f"[{done}/{total}] {exp['id']} ({exp['method']} on {exp['model']}): {result['status']} "
                          f"in {took:.1f} s{extra}", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        # A second Ctrl-C (or the group's copy of the first) must not cut the record short: the stopped
        # experiments, run.json and the summary are written first.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("quantbench: stopping (the experiment running is stopped, what finished is kept; "
              "Ctrl-C again is ignored until the run folder is written)", flush=True)
        stopped = [(exp, started) for future, (exp, started) in pending.items() if launcher["cancel"](future)]
        launcher["close"]()
        for exp, started in stopped:
            record_unfinished(run_dir, exp, run, "interrupted", "stopped by Ctrl-C", time.perf_counter() - started)
    finally:
        launcher["close"]()
    if launcher.get("after"):
        launcher["after"](run_dir, run)
    try:
        return finish(run_dir, interrupted)
    finally:
        if interrupted:  # only the main thread gets KeyboardInterrupt, so only it set SIG_IGN above
            signal.signal(signal.SIGINT, signal.default_int_handler)


def run_command(args, launcher_for):
    """`quantbench run` with its parsed flags: finish the run of --resume (its settings, unless a flag
    names another backend) or make a new run folder, then run it through the launcher that
    `launcher_for(config)` gives with the device its experiments see."""
    if args.resume:
        config = from_run(check_resumable(args.resume))
        config.backend, config.ray_address = args.backend or config.backend, args.ray_address or config.ray_address
        config.gpu = args.gpu or config.gpu
        return execute(Path(args.resume), launcher_for(config)[0])
    config = from_args(args)
    launcher, device = launcher_for(config)  # first: a local forkserver's imports overlap the set-up below
    try:
        run_dir = new_run(config, sweep_file=args.config, device=device)
    except BaseException:
        launcher["close"]()
        raise
    return execute(run_dir, launcher)


def finish(run_dir, interrupted):
    """Close the run: status in run.json, summary.md (printed), the report; returns the exit code."""
    from quantbench import report

    run = read_json(run_dir / "run.json")
    run.update(status="interrupted" if interrupted else "finished", finished=now())
    write_json(run_dir / "run.json", run)
    summary = report.summary_markdown(run_dir)
    (run_dir / "summary.md").write_text(summary)
    try:  # the page to decide from; a failure here never costs the results
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


USER_ERRORS = (ConfigError, RunError, ModelError, ResultsError, FileNotFoundError)  # one line and exit code 2, no traceback
