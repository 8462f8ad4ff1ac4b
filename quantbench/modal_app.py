"""quantbench on Modal's cloud GPUs: the app the course project ran, built from quantbench's own code path.

    quantbench run --backend modal --gpu A100 --methods fp16,nf4,fp4     # from a checkout of quantbench
    modal run -m quantbench.modal_app --args "--gpu H100 --methods fp16,nf4 --tasks coqa"

Every experiment is one call of `run_experiment` in its own container on the card asked for, which
runs `remote.run_packed` (the same code as a local run) and sends the result files back to the run
folder on the launching machine. A persistent volume holds the hub cache and quantbench's cache
(demo and quantized checkpoints) between calls; the hub token comes from the Modal secret
`huggingface` (key HF_TOKEN) into the container's environment only, never into a result or a log.

A real run needs a Modal account: `pip install 'quantbench[modal]'`, `modal token new` (stores the
credentials in ~/.modal.toml), and, for gated hub models, `modal secret create huggingface
HF_TOKEN=hf_...` (an empty secret, `modal secret create huggingface HF_TOKEN=`, will do otherwise).
Importing this module and calling its functions with `.local()` needs neither network nor
credentials: that is how the tests run it.
"""
import shlex
import sys
from pathlib import Path

import modal

from quantbench import remote

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"  # a checkout: the image installs its dependencies
CACHE = "/cache"
DEFAULT_GPU = "A100"          # the course project's card; `--gpu` picks another (H100, L40S, A10G, T4, ...)
TIMEOUT_S = 3 * 3600          # one experiment; a 7B model with GPTQ calibration and the standard suite fits

app = modal.App("quantbench")
image = (modal.Image.debian_slim(python_version="3.11")
         .pip_install_from_pyproject(str(PYPROJECT), optional_dependencies=["all"])
         .add_local_python_source("quantbench"))
cache_volume = modal.Volume.from_name("quantbench-cache", create_if_missing=True)
hub_secret = modal.Secret.from_name("huggingface")
OPTIONS = dict(image=image, gpu=DEFAULT_GPU, timeout=TIMEOUT_S, volumes={CACHE: cache_volume}, secrets=[hub_secret],
               env={"QUANTBENCH_CACHE": f"{CACHE}/quantbench", "HF_HOME": f"{CACHE}/hf"})
RUNNING = False  # set by `modal run`'s entrypoint, which has started the app already


@app.function(**OPTIONS)
def run_experiment(files: dict, exp_id: str, reference: dict | None = None) -> dict:
    """One experiment of the packed run, in this container; returns its result files."""
    return remote.run_packed(files, exp_id, reference)


@app.function(**OPTIONS)
def worker_facts(device: str) -> dict:
    """The card's copy bandwidth and matmul rate, and the container's environment."""
    return remote.worker_facts(device)


@app.local_entrypoint()
def main(args: str = ""):
    """`modal run -m quantbench.modal_app --args "..."`: `quantbench run --backend modal ...` inside the started app."""
    global RUNNING
    from quantbench import cli

    RUNNING = True
    code = cli.main(["run", "--backend", "modal", *shlex.split(args)])
    if code:
        sys.exit(code)
