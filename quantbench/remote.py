"""Experiments on other machines: a Ray cluster or Modal's cloud GPUs, results back in the local run folder.

    quantbench run --backend ray                          # $RAY_ADDRESS's cluster, or a local one
    quantbench run --backend ray --ray-address ray://head:10001
    quantbench run --backend modal --gpu A100             # Modal (an account and `modal token new` once)

The launching machine keeps the run folder. Each experiment travels as the run's files (run.json,
the task files, the data directory and, for every experiment but the baseline, the baseline's
reference log-probabilities), runs on a worker exactly as it runs locally (`sweep.run_child`: its own
process, in a scratch copy of the run folder), and its result files come back and are written here
the moment it finishes, so `--resume` and `quantbench report` work unchanged. The baseline runs
first; its reference is computed once and shared with the others (in Ray's object store). A worker
lost mid-experiment is recorded as failed, and `quantbench run --resume` runs it again.

Nothing from the environment travels in either direction: a hub token stays in the worker's
environment (Modal: a secret) and never reaches a result file or a log.

    >>> files = pack(run_dir, run)                        # {'run/run.json': b'...', 'data/...': b'...'}
    >>> outputs = run_packed(files, "nf4", reference)     # on the worker: {'run/nf4.json': b'...', ...}
"""
import concurrent.futures
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import quantbench
from quantbench.models import cache_folder, model_slug, resolve_model
from quantbench.results import read_json, write_json
from quantbench.sweep import RunError, empty_result, finish, measure_device_rates, record_phases, run_child, unfinished


def _files_under(folder, prefix):
    folder = Path(folder)
    return {f"{prefix}/{p.relative_to(folder).as_posix()}": p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.is_dir() else {}


def pack(run_dir, run):
    """The files every experiment of the run needs: run.json, the task files, the data directory."""
    files = {"run/run.json": (Path(run_dir) / "run.json").read_bytes(), **_files_under(Path(run_dir) / "tasks", "run/tasks")}
    if run["config"].get("data_dir"):
        files.update(_files_under(run["config"]["data_dir"], "data"))
    return files


def reference_files(run_dir, model_name):
    """The baseline's reference log-probabilities of one model (empty when it has none)."""
    return _files_under(Path(run_dir) / "reference" / model_slug(model_name), f"run/reference/{model_slug(model_name)}")


def _translate(data, pairs):
    """Replace path prefixes in a text file's bytes (paths inside task YAMLs and result JSON)."""
    text = data.decode()
    for old, new in pairs:
        if old:
            text = text.replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1])
    return text.encode()


def run_packed(files, exp_id, reference=None):
    """On a worker: unpack the run into a scratch folder, run experiment `exp_id` there as a local run
    would, and return its result files (paths in them translated back to the launching machine's).
    The model checkpoint is used where run.json says when this machine has it (one host, a shared
    file system); otherwise it is resolved here (hub id, demo or arch:) into this machine's cache."""
    scratch = Path(tempfile.mkdtemp(prefix="quantbench-worker-"))
    try:
        run = json.loads(files["run/run.json"])
        here_run, here_data = scratch / "run", scratch / "data"
        there_run, there_data = run["run_dir"], run["config"].get("data_dir")
        there = [(there_run, str(here_run)), (there_data, str(here_data))]
        for name, data in {**files, **(reference or {})}.items():
            path = scratch / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_translate(data, there) if name.startswith("run/tasks/") and name.endswith(".yaml") else data)
        run["run_dir"], run["config"]["data_dir"] = str(here_run), there_data and str(here_data)
        cache = Path(run["cache_dir"])
        if not (cache.is_dir() and os.access(cache, os.W_OK)):
            run["cache_dir"] = str(cache_folder())
        back = [(str(here_run), there_run), (str(here_data), there_data or str(here_data))]
        for m in run["models"]:
            if not Path(m["path"]).exists():
                m.update(resolve_model(m["name"], cache_dir=Path(run["cache_dir"])))  # keeps reference_experiment
        write_json(here_run / "run.json", run)
        exp = next(e for e in run["experiments"] if e["id"] == exp_id)
        _children_import_this_quantbench()
        result = run_child(here_run, exp, run)
        result["worker"] = {"host": socket.gethostname(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
        write_json(here_run / f"{exp_id}.json", result)
        model = next(m for m in run["models"] if m["name"] == exp["model"])
        out = {f"run/{exp_id}.json": (here_run / f"{exp_id}.json").read_bytes()}
        if (here_run / f"{exp_id}.docs.json").exists():
            out[f"run/{exp_id}.docs.json"] = (here_run / f"{exp_id}.docs.json").read_bytes()
        if exp_id == model.get("reference_experiment"):
            out.update(reference_files(here_run, exp["model"]))
        return {k: _translate(v, back) if k.endswith(".json") else v for k, v in out.items()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _children_import_this_quantbench():
    """Processes this worker starts import the quantbench it runs, wherever the worker found it (Ray's
    py_modules, a Modal image), not another installed copy."""
    here = str(Path(quantbench.__file__).resolve().parent.parent)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if here not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, *paths]))


def worker_facts(device):
    """On a worker: the device's roofline rates and the worker's environment, both measured in child
    processes, so the long-lived worker process never holds a CUDA context."""
    _children_import_this_quantbench()
    code = "import json; from quantbench.results import environment; print(json.dumps(environment()))"
    env = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    try:
        worker_env = json.loads(env.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        worker_env = {"host": socket.gethostname(), "error": (env.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return {"device_rates": measure_device_rates(device), "environment": worker_env}


def unpack(run_dir, outputs):
    """Write a finished experiment's files into the launching machine's run folder."""
    for name, data in outputs.items():
        path = Path(run_dir) / name.removeprefix("run/")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(data)
        tmp.replace(path)


def _lost(run_dir, exp, run, status, error, seconds):
    """An experiment whose worker sent no result back (lost, or stopped by Ctrl-C): recorded, to be resumed."""
    write_json(Path(run_dir) / f"{exp['id']}.json", {
        **empty_result(run, exp), "status": status, "error": error,
        "fix": f"run again with: quantbench run --resume {run_dir}", "duration_s": round(seconds, 3)})


def execute_remote(run_dir, backend, submit, facts, share=lambda files: files, cancel=lambda future: future.cancel()):
    """The launching side, for any backend. facts() -> worker_facts of a worker, measured first (the
    experiments' roofline shares need its rates in run.json); share(files) -> what a worker is sent
    for a dict of files (Ray: one copy in its object store); submit(files, exp, reference) -> a
    concurrent.futures.Future of run_packed's output. Baselines first, then every other experiment
    at once, each written here as it finishes. Returns the exit code."""
    run_dir = Path(run_dir)
    run = read_json(run_dir / "run.json")
    todo = unfinished(run_dir, run)
    total, done = len(run["experiments"]), len(run["experiments"]) - len(todo)
    interrupted, running = False, {}
    try:
        if todo and "device_rates" not in run:
            print(f"Measuring the device's copy bandwidth and matmul rate on a {backend} worker...", flush=True)
            try:
                got = facts()
            except Exception as e:  # noqa: BLE001 - no roofline then; the experiments still run
                got = {"device_rates": {"error": f"{type(e).__name__}: {str(e).strip()[:300]}", "device": run["device"]},
                       "environment": run["environment"]}
            run.update(device_rates=got["device_rates"], environment=got["environment"],
                       launcher_environment=run["environment"])
            write_json(run_dir / "run.json", run)
        files = share(pack(run_dir, run)) if todo else None  # after the facts: run.json with the rates
        references = {m["reference_experiment"] for m in run["models"] if m.get("reference_experiment")}
        shared = {}  # model -> its baseline's reference files, read and shared once
        for wave in ([e for e in todo if e["id"] in references], [e for e in todo if e["id"] not in references]):
            for exp in wave:
                reference = None
                if exp["id"] not in references:
                    if exp["model"] not in shared:
                        shared[exp["model"]] = share(reference_files(run_dir, exp["model"]))
                    reference = shared[exp["model"]]
                running[submit(files, exp, reference)] = (exp, time.perf_counter())
                print(f"[{exp['id']}] ({exp['method']} on {exp['model']}): sent to {backend}", flush=True)
            while running:
                finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in finished:
                    exp, started = running.pop(future)
                    try:
                        unpack(run_dir, future.result())
                    except Exception as e:  # noqa: BLE001 - a lost worker, a dead node, a cancelled call
                        why = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                        _lost(run_dir, exp, run, "failed", f"the {backend} worker running it failed or was lost: "
                              f"{type(e).__name__}: {why}", time.perf_counter() - started)
                    result = read_json(run_dir / f"{exp['id']}.json")
                    record_phases(run_dir, run, exp, result, time.perf_counter() - started)
                    done += 1
                    extra = f": {result['error']}" if result.get("error") else ""
                    print(f"[{done}/{total}] {exp['id']} ({exp['method']} on {exp['model']}): {result['status']} "
                          f"in {time.perf_counter() - started:.1f} s{extra}", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        for future, (exp, started) in running.items():
            cancel(future)
            _lost(run_dir, exp, run, "interrupted", "stopped by Ctrl-C", time.perf_counter() - started)
    flag_shared_hosts(run_dir, run)
    return finish(run_dir, interrupted)


def flag_shared_hosts(run_dir, run):
    """Record in each result the experiments that ran on the same worker host at the same time
    (`shared_host_with`): side by side on one host they slow each other's timings (on two H200s
    of one host, eager decode lost 30-48% at batch 8 and 32: docs/verification/issue-7-gpu.md);
    the summary and the report mark such speed numbers."""
    spans = {}
    for exp in run["experiments"]:
        path = Path(run_dir) / f"{exp['id']}.json"
        r = read_json(path) if path.exists() else {}
        host = (r.get("worker") or {}).get("host")
        if host and r.get("started") and r.get("finished"):
            spans[exp["id"]] = (host, datetime.datetime.fromisoformat(r["started"]),
                                datetime.datetime.fromisoformat(r["finished"]), r, path)
    for exp_id, (host, start, end, r, path) in spans.items():
        others = sorted(o for o, (h, s, e, _, _) in spans.items() if o != exp_id and h == host and s < end and start < e)
        if others or "shared_host_with" in r:
            r["shared_host_with"] = others
            write_json(path, r)


def cluster_device(backend, *, ray_address=None):
    """The device the experiments will see: 'cuda' on Modal (always a card) and where the Ray cluster has GPUs."""
    if backend == "modal":
        return "cuda"
    import ray

    _ray_init(ray_address)
    return "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"


def _ray_init(address):
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    host, _, port = (address or "").removeprefix("ray://").rpartition(":")
    if host and port.isdigit():  # Ray waits minutes for an unreachable head node; a second says enough
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as e:
            raise RunError(f"no Ray cluster answers at {address} ({e}); check --ray-address / $RAY_ADDRESS "
                           "(`ray status` on the head node), or leave both unset for a local cluster") from None
    try:  # ship this quantbench to the workers, so a cluster runs the same code as the launching machine
        ray.init(address=address, log_to_driver=False, runtime_env={"py_modules": [str(Path(quantbench.__file__).parent)]})
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise RunError(f"could not start or reach {where} ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); "
                       "check --ray-address / $RAY_ADDRESS (`ray status` on the head node), or leave both unset "
                       "for a local cluster") from None


def execute_ray(run_dir, address=None):
    """Every unfinished experiment as a Ray task: one GPU each where the cluster has GPUs (so they
    spread over all of them), one CPU otherwise; no retries, so a lost worker is recorded, not rerun."""
    import ray

    _ray_init(address)
    run = read_json(Path(run_dir) / "run.json")
    need = {"num_gpus": 1} if run["device"] == "cuda" else {"num_cpus": 1}
    task = ray.remote(max_retries=0, **need)(run_packed)
    refs = {}

    def submit(files, exp, reference):  # files and reference: object refs, each put in the store once
        ref = task.remote(files, exp["id"], reference)
        future = ref.future()
        refs[future] = ref
        return future

    def facts():
        return ray.get(ray.remote(max_retries=0, **need)(worker_facts).remote(run["device"]))

    return execute_remote(run_dir, "ray", submit, facts, share=ray.put, cancel=lambda f: ray.cancel(refs[f], force=True))


def execute_modal(run_dir, gpu):
    """Every unfinished experiment as a call of the Modal app's `run_experiment` on the card `gpu`,
    all at once (Modal starts a container per call)."""
    import modal

    from quantbench import modal_app

    run = read_json(Path(run_dir) / "run.json")
    function = modal_app.run_experiment.with_options(gpu=gpu)
    facts_function = modal_app.worker_facts.with_options(gpu=gpu)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(run["experiments"])))

    def go():
        return execute_remote(run_dir, "modal", lambda files, exp, ref: pool.submit(function.remote, files, exp["id"], ref),
                              lambda: facts_function.remote(run["device"]))
    try:
        if modal_app.RUNNING:  # `modal run` has started the app already
            return go()
        with modal_app.app.run():
            return go()
    except (modal.exception.AuthError, modal.exception.ConnectionError) as e:
        raise RunError(f"Modal refused or could not be reached ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                       f"set up an account and token with `modal token new`, then `quantbench run --resume {run_dir} "
                       f"--backend modal`") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


if __name__ == "__main__":
    sys.exit("run experiments remotely with `quantbench run --backend ray|modal`")
