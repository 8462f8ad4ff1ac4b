"""The local launcher: each experiment in a process of its own on this machine, one after another.

    launcher = local_launcher()               # the forkserver starts importing now (on a GPU)
    sweep.execute(run_dir, launcher)          # runs each experiment through run_child

An experiment's process is forked from Python's multiprocessing forkserver, whose server imports
torch, transformers and lm-eval once for the run (an optimisation only: with QUANTBENCH_FORKSERVER=0,
or off Linux, each experiment is a fresh interpreter, `spawn`). The guarantees a process of its own
gives hold either way: a crash, a CUDA error or an out-of-memory takes only its experiment; the
process never outlives the sweep (it watches a pipe only the sweep holds) nor its forkserver; the
forkserver never initialises CUDA (a forked process could not use it), and a process that finds CUDA
initialised all the same is started again in a fresh interpreter.
"""
import concurrent.futures
import multiprocessing
import os
import signal
import sys
import time

from quantbench.methods import engine_of
from quantbench.sweep import status_of, measure_device_rates, record_unfinished

# What every experiment imports before it measures anything, imported once in the forkserver. Not
# here: what initialises CUDA on import (bitsandbytes; transformers' model code, which imports
# torchao when installed): a forked child could not use the GPU. Each child imports those itself.
PRELOAD = ["torch", "transformers", "transformers.generation.utils", "lm_eval.evaluator", "lm_eval.models.huggingface",
           "lm_eval.tasks", "quantbench.experiment"]
NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"  # torch.cuda.is_available() by NVML: no CUDA driver initialised


def process_context():
    """The multiprocessing context experiments start in: the forkserver with PRELOAD where it can run,
    else spawn (a fresh interpreter)."""
    if sys.platform != "linux" or os.environ.get("QUANTBENCH_FORKSERVER") == "0":
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def start_forkserver(context):
    """Start the forkserver's imports now (a no-op when it runs, or for spawn), so that they overlap
    what this process does next, with torch's CUDA check by NVML: no CUDA driver initialised there."""
    if context.get_start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    user = os.environ.get(NVML_CHECK)
    os.environ[NVML_CHECK] = "1"
    try:
        forkserver.ensure_running()
    finally:
        if user is None:
            del os.environ[NVML_CHECK]
        else:
            os.environ[NVML_CHECK] = user


def run_child(run_dir, exp, run, context, running=None):
    """Run one experiment in a process of `context` and return its exit code (`running`: a dict that
    holds the process while it runs, for Ctrl-C to stop it). An experiment that ends without its result
    is recorded as failed with how it ended."""
    from quantbench import experiment

    started = time.perf_counter()
    how = "forked from the preloaded forkserver" if context.get_start_method() == "forkserver" else "its own interpreter"
    alive, keep = context.Pipe(duplex=False)  # the child watches `alive`: it ends when this process ends
    args = (str(run_dir), exp["id"], how, alive, os.environ.get(NVML_CHECK))
    child = context.Process(target=experiment.child, args=args)
    try:
        child.start()
    except (EOFError, ConnectionError):  # the forkserver was killed an instant ago and multiprocessing, not
        time.sleep(1)                    # yet seeing it gone, asked it: once it is, a new one is started
        child = context.Process(target=experiment.child, args=args)
        child.start()
    alive.close()
    if running is not None:
        running[exp["id"]] = child
    try:
        child.join()
    finally:
        if running is not None:
            running.pop(exp["id"], None)
        keep.close()
    if child.exitcode == experiment.FORK_UNUSABLE:
        return child.exitcode  # the caller starts it again in a fresh interpreter
    if status_of(run_dir, exp["id"]) not in ("ok", "failed", "skipped"):
        fix = None
        if child.exitcode == -signal.SIGSEGV and engine_of(exp) == "llama.cpp":
            from quantbench.engines import llamacpp

            fix = llamacpp.crash_fix()
        record_unfinished(run_dir, exp, run, "failed", _describe_exit(child.exitcode, how), time.perf_counter() - started,
                          fix=fix)
    return child.exitcode


def _describe_exit(code, how):
    """How an experiment's process ended without its result."""
    if code == 255 and how.startswith("forked"):  # multiprocessing's word for a forkserver that is gone
        return "the preloaded forkserver ended, and the experiment's process with it"
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        why = {"SIGKILL": " (killed: out of host memory, or by hand)", "SIGSEGV": " (segmentation fault in native code)",
               "SIGABRT": " (aborted in native code)"}.get(name, "")
        return f"the experiment process died by {name}{why}"
    return f"the experiment process exited with code {code} before writing its result"


def local_launcher(start_now=True):
    """Experiments one after another on this machine, each in a process of its own (run_child).
    start_now: start the forkserver's imports at once, to overlap the run's set-up (on a GPU; on a CPU
    they would take a core from the device's matmul rate, measured first)."""
    from quantbench import experiment

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # one at a time: the timings are the device's alone
    state = {"context": process_context(), "running": {}}
    if start_now:
        start_forkserver(state["context"])

    def facts(run):
        rates = measure_device_rates(run["device"])
        start_forkserver(state["context"])
        return {"device_rates": rates}

    def submit(run_dir, run, exp):
        def go():
            start_forkserver(state["context"])
            print(f"[{exp['id']}] ({exp['method']} on {exp['model']}): running", flush=True)
            if run_child(run_dir, exp, run, state["context"], state["running"]) == experiment.FORK_UNUSABLE:
                print("quantbench: the forkserver's imports initialised CUDA, which a forked process cannot use; "
                      "each experiment starts its own interpreter instead", flush=True)
                state["context"] = multiprocessing.get_context("spawn")
                run_child(run_dir, exp, run, state["context"], state["running"])
        return pool.submit(go)

    def cancel(future):
        """Stop the experiment if it runs (True: it had started), or drop it from the queue (False)."""
        if future.cancel():
            return False
        for child in list(state["running"].values()):
            child.terminate()
        return True

    return {"name": "local", "facts": facts, "submit": submit, "cancel": cancel,
            "close": lambda: pool.shutdown(wait=True, cancel_futures=True)}
