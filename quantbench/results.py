"""Result files: strict, atomic JSON and folder writes, reading a run folder, the environment record.

A run folder holds `run.json` (the configuration as used, the environment, the experiments, their
times), one `<experiment>.json` per experiment and `<experiment>.docs.json` with its per-document task
scores. Every JSON file carries the result schema's version (`schema`, docs/results.md); a reader
given a folder of another version says so in one line.

    >>> run, results = load_run(Path("results/run001"))
"""
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

SCHEMA = 2  # docs/results.md; 2: engines, cost.decode by mode, a version in every file
LIBRARIES = ["torch", "transformers", "accelerate", "bitsandbytes", "lm_eval", "datasets",
             "safetensors", "gguf", "huggingface_hub", "optimum", "gptqmodel", "torchao", "hqq",
             "llmcompressor", "compressed-tensors", "auto-round", "optimum-quanto"]


class ResultsError(Exception):
    """A run folder quantbench cannot read: not one, or of another schema version; the message says what to do."""


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


def read_run_file(path):
    """A JSON file of a run folder, checked to be of this schema version; ResultsError otherwise."""
    path = Path(path)
    try:
        data = read_json(path)
    except ValueError as e:
        raise ResultsError(f"{path} is corrupt: not JSON ({e})") from None
    if not isinstance(data, dict) or not {"schema", "quantbench_run", "experiment"} & set(data):
        raise ResultsError(f"{path} was not written by quantbench")
    if data.get("schema") != SCHEMA:  # files from before schema versions are schema 1
        raise ResultsError(f"{path} has result schema {data.get('schema', 1)}, this quantbench reads schema {SCHEMA} "
                           "(docs/results.md): run it again with this quantbench")
    return data


def load_run(run_dir):
    """(run.json, the experiment results in the order run.json lists them; missing ones absent)."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").exists():
        raise ResultsError(f"{run_dir} is not a quantbench run folder (no run.json)")
    run = read_run_file(run_dir / "run.json")
    results = [read_run_file(run_dir / f"{e['id']}.json") for e in run["experiments"]
               if (run_dir / f"{e['id']}.json").exists()]
    return run, results


def documents(run_dir, result):
    """The experiment's per-document task scores ({task: {metric: {doc_id: value}}}), or {}."""
    path = Path(run_dir) / f"{result['experiment']}.docs.json"
    if not path.exists():
        return {}
    out = {}
    for task, cols in read_run_file(path).items():
        if task == "schema":
            continue
        ids = cols.pop("doc_ids")
        out[task] = {m: dict(zip(ids, values)) for m, values in cols.items()}
    return out


def write_files(run_dir, files):
    """Write {relative path: bytes} into the run folder, each file whole or not at all (results that
    came back from a worker)."""
    for name, data in files.items():
        path = Path(run_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(data)
        tmp.replace(path)
