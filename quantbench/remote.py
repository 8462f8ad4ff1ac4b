"""Experiments on other machines: the Ray launcher, and what every remote launcher (Ray; Modal, in
modal_app.py) shares: packing a run for a worker and running an experiment there.

    quantbench run --backend ray                          # $RAY_ADDRESS's cluster, or a local one
    quantbench run --backend ray --ray-address ray://head:10001

The launching machine keeps the run folder. Each experiment travels as the run's files (run.json,
the task files, the data directory and, for every experiment but the baseline, the baseline's
reference log-probabilities), runs on a worker exactly as it runs locally (`local.run_child`: its own
process, in a scratch copy of the run folder), and its result files come back and are written here
the moment it finishes, so `--resume` and `quantbench report` work unchanged. The baseline runs
first; its reference is computed once and shared with the others (in Ray's object store). A worker
lost mid-experiment is recorded as failed, and `quantbench run --resume` runs it again.

Nothing from the environment travels in either direction: a hub token stays in the worker's
environment (Modal: a secret) and never reaches a result file or a log.

    >>> files = pack(run_dir, run)                        # {'run/run.json': b'...', 'data/...': b'...'}
    >>> outputs = run_packed(files, "nf4", reference)     # on the worker: {'nf4.json': b'...', ...}
"""
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import quantbench
from quantbench.models import cache_folder, model_slug, resolve_model
from quantbench.results import read_json, write_json
from quantbench.local import run_child
from quantbench.sweep import RunError, measure_device_rates


def _files_under(folder, prefix):
    folder = Path(folder)
    return {f"{prefix}/{p.relative_to(folder).as_posix()}": p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.is_dir() else {}


def pack(run_dir, run):
    """The files every experiment of the run needs: run.json, the task files, the data directory, the
    include path (the user's task YAMLs and whatever data lies beside them)."""
    files = {"run/run.json": (Path(run_dir) / "run.json").read_bytes(), **_files_under(Path(run_dir) / "tasks", "run/tasks")}
    if run["config"].get("data_dir"):
        files.update(_files_under(run["config"]["data_dir"], "data"))
    if run["config"].get("include_path"):
        files.update(_files_under(run["config"]["include_path"], "include"))
    return files


def reference_files(run_dir, model_name):
    """The baseline's reference log-probabilities of one model (empty when it has none)."""
    return _files_under(Path(run_dir) / "reference" / model_slug(model_name), f"run/reference/{model_slug(model_name)}")


def inputs(run_dir, run, exp, kept, put=lambda files: files):
    """(the run's files, the baseline's reference or None for a baseline) that `exp`'s worker needs,
    each read once into `kept` and passed through `put` (Ray: into its object store)."""
    if "files" not in kept:
        kept["files"] = put(pack(run_dir, run))
    if exp["id"] == next(m for m in run["models"] if m["name"] == exp["model"]).get("reference_experiment"):
        return kept["files"], None
    if exp["model"] not in kept:
        kept[exp["model"]] = put(reference_files(run_dir, exp["model"]))
    return kept["files"], kept[exp["model"]]


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
        here_run, here_data, here_include = scratch / "run", scratch / "data", scratch / "include"
        there_run, there_data, there_include = run["run_dir"], run["config"].get("data_dir"), run["config"].get("include_path")
        there = [(there_run, str(here_run)), (there_data, str(here_data)), (there_include, str(here_include))]
        for name, data in {**files, **(reference or {})}.items():
            path = scratch / name
            path.parent.mkdir(parents=True, exist_ok=True)
            task_file = name.startswith(("run/tasks/", "include/")) and name.endswith(".yaml")
            path.write_bytes(_translate(data, there) if task_file else data)
        run["run_dir"], run["config"]["data_dir"] = str(here_run), there_data and str(here_data)
        run["config"]["include_path"] = there_include and str(here_include)
        cache = Path(run["cache_dir"])
        if not (cache.is_dir() and os.access(cache, os.W_OK)):
            run["cache_dir"] = str(cache_folder())
        back = [(str(here_run), there_run), (str(here_data), there_data or str(here_data)),
                (str(here_include), there_include or str(here_include))]
        for m in run["models"]:
            if not Path(m["path"]).exists():
                m.update(resolve_model(m["name"], cache_dir=Path(run["cache_dir"])))  # keeps reference_experiment
        write_json(here_run / "run.json", run)
        exp = next(e for e in run["experiments"] if e["id"] == exp_id)
        _children_import_this_quantbench()
        import multiprocessing

        run_child(here_run, exp, run, multiprocessing.get_context("spawn"))  # a fresh interpreter: what the worker holds stays out
        result = read_json(here_run / f"{exp_id}.json")
        result["worker"] = {"host": socket.gethostname(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
        write_json(here_run / f"{exp_id}.json", result)
        model = next(m for m in run["models"] if m["name"] == exp["model"])
        out = {f"{exp_id}.json": (here_run / f"{exp_id}.json").read_bytes()}
        if (here_run / f"{exp_id}.docs.json").exists():
            out[f"{exp_id}.docs.json"] = (here_run / f"{exp_id}.docs.json").read_bytes()
        if exp_id == model.get("reference_experiment"):
            out.update({k.removeprefix("run/"): v for k, v in reference_files(here_run, exp["model"]).items()})
        return {k: _translate(v, back) if k.endswith(".json") else v for k, v in out.items()}  # paths in the run folder
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


def flag_shared_hosts(run_dir, run):
    """Record in each result the experiments that ran on the same worker host at the same time
    (`shared_host_with`): side by side on one host they slow each other's timings (docs/benchmarks.md);
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


def ray_device(address=None):
    """The device the experiments will see on the Ray cluster: 'cuda' where it has GPUs."""
    import ray

    _ray_init(address)
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


def ray_launcher(address=None):
    """Every experiment as a Ray task: one GPU each where the cluster has GPUs (so they spread over all
    of them), one CPU otherwise; no retries, so a lost worker is recorded, not rerun. What every
    experiment needs travels once through Ray's object store."""
    import ray

    _ray_init(address)
    refs, shared = {}, {}

    def need(run):
        return {"num_gpus": 1} if run["device"] == "cuda" else {"num_cpus": 1}

    def facts(run):
        got = ray.get(ray.remote(max_retries=0, **need(run))(worker_facts).remote(run["device"]))
        return {**got, "launcher_environment": run["environment"]}

    def submit(run_dir, run, exp):
        files, reference = inputs(run_dir, run, exp, shared, put=ray.put)
        ref = ray.remote(max_retries=0, **need(run))(run_packed).remote(files, exp["id"], reference)
        future = ref.future()
        refs[future] = ref
        print(f"[{exp['id']}] ({exp['method']} on {exp['model']}): sent to ray", flush=True)
        return future

    def cancel(future):
        ray.cancel(refs[future], force=True)
        return True

    return {"name": "ray", "facts": facts, "submit": submit, "cancel": cancel, "close": lambda: None,
            "after": flag_shared_hosts}


if __name__ == "__main__":
    sys.exit("run experiments remotely with `quantbench run --backend ray|modal`")
