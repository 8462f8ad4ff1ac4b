"""quantbench on Modal's cloud GPUs: the app the course project ran, built from quantbench's own code path.

    quantbench run --backend modal --gpu A100 --methods fp16,nf4,fp4     # from a checkout of quantbench
    modal run -m quantbench.modal_app --args "--gpu L40S --methods fp16,nf4 --tasks coqa"

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
import concurrent.futures
import contextlib
import shlex
import sys
from pathlib import Path

import modal

from quantbench import config as settings
from quantbench import remote, sweep

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"  # a checkout: the image installs its dependencies
CACHE = "/cache"
DEFAULT_GPU = "A100"          # the course project's card; `--gpu` picks another Modal offers
TIMEOUT_S = 3 * 3600          # one experiment; a 7B model with GPTQ calibration and the standard suite fits

app = modal.App("quantbench")
image = (modal.Image.debian_slim(python_version="3.11")
         .pip_install_from_pyproject(str(PYPROJECT), optional_dependencies=["all"])
         .add_local_python_source("quantbench"))
cache_volume = modal.Volume.from_name("quantbench-cache", create_if_missing=True)
hub_secret = modal.Secret.from_name("huggingface")
OPTIONS = dict(image=image, gpu=DEFAULT_GPU, timeout=TIMEOUT_S, volumes={CACHE: cache_volume}, secrets=[hub_secret],
               env={"QUANTBENCH_CACHE": f"{CACHE}/quantbench", "HF_HOME": f"{CACHE}/hf"})


@app.function(**OPTIONS)
def run_experiment(files: dict, exp_id: str, reference: dict | None = None) -> dict:
    """One experiment of the packed run, in this container; returns its result files."""
    return remote.run_packed(files, exp_id, reference)


@app.function(**OPTIONS)
def worker_facts(device: str) -> dict:
    """The card's copy bandwidth and matmul rate, and the container's environment."""
    return remote.worker_facts(device)


def modal_launcher(gpu=None, app_running=False):
    """Every experiment as a call of `run_experiment` on the card `gpu`, all at once (Modal starts a
    container per call); the app is started here unless `modal run` has started it (`app_running`)."""
    gpu = gpu or DEFAULT_GPU
    function, facts_function = run_experiment.with_options(gpu=gpu), worker_facts.with_options(gpu=gpu)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=64)
    running = contextlib.ExitStack()
    if not app_running:
        try:
            running.enter_context(app.run())
        except (modal.exception.AuthError, modal.exception.ConnectionError) as e:
            raise sweep.RunError(f"Modal refused or could not be reached ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200]}); set up an account and token with `modal token new`, "
                                 "then `quantbench run --resume RUN_DIR --backend modal`") from None
    shared = {}

    def facts(run):
        return {**facts_function.remote(run["device"]), "launcher_environment": run["environment"]}

    def submit(run_dir, run, exp):
        files, reference = remote.inputs(run_dir, run, exp, shared)
        print(f"[{exp['id']}] ({exp['method']} on {exp['model']}): sent to modal ({gpu})", flush=True)
        return pool.submit(function.remote, files, exp["id"], reference)

    def cancel(future):
        future.cancel()
        return True

    def close():
        pool.shutdown(wait=False, cancel_futures=True)
        running.close()

    return {"name": "modal", "facts": facts, "submit": submit, "cancel": cancel, "close": close,
            "after": remote.flag_shared_hosts}


@app.local_entrypoint()
def main(args: str = ""):
    """`modal run -m quantbench.modal_app --args "..."`: `quantbench run --backend modal ...` inside the
    app that `modal run` has started."""
    parsed = settings.run_parser().parse_args(["--backend", "modal", *shlex.split(args)])
    try:
        code = sweep.run_command(parsed, lambda config: (modal_launcher(config.gpu, app_running=True), "cuda"))
    except sweep.USER_ERRORS as e:
        print(f"quantbench: error: {e}", file=sys.stderr)
        code = 2
    if code:
        sys.exit(code)
