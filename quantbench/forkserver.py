"""A preloaded process that forks one fresh child per experiment, so experiments skip the imports.

Every experiment still runs in a process of its own: a crash, a CUDA error or an out-of-memory in
one method cannot take the sweep down or leave memory behind. But a new interpreter spends its first
seconds importing torch, transformers and lm-eval: on an H200 machine about 18 s of each experiment
of the demo (its process's time outside its measured phases), on a 2-core CPU about 6 s. This
server does those imports once per run, then forks a child per experiment that starts with them
done and runs `quantbench.experiment.main` exactly as `python -m quantbench.experiment RUN_DIR ID`
would.

A CUDA context cannot cross a fork, so the server never touches the GPU: it imports no library that
initialises CUDA on import (bitsandbytes does; each child imports it when its method needs it),
holds torch's CUDA availability check to NVML while it imports (the default check initialises the
driver), and reports whether CUDA is initialised after its imports. The sweep uses plain processes
when it is, when the server cannot start, off Linux, or with QUANTBENCH_FORKSERVER=0 in the
environment. The server's imports leave idle library threads behind (OpenBLAS's pool, pyarrow's
jemalloc purger), which is why Python 3.12+ warns on every fork; both libraries register fork
handlers, so the warning is silenced there.

    server = start()                        # the sweep's process, once per run
    code = run(server, run_dir, "nf4")      # the child's exit code (-signal if killed), None if the server died
    stop(server)

The sweep sends one JSON line per experiment on the server's stdin; the server answers on a pipe of
its own (its stdout and stderr are the experiments' output): {"ready": ...} once its imports are done,
then per experiment {"pid": n} when the child starts and {"exit": code} when it ends.
"""
import gc
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
import warnings

# What every experiment imports before it measures anything (transformers' generation utilities pull
# in HQQ, torch._dynamo and scikit-learn: most of the time). Not here, as they initialise CUDA on
# import: bitsandbytes, and transformers' modeling code (transformers.modeling_utils imports torchao
# when it is installed, whose mx_formats kernels ask torch whether Triton can run on the GPU; seen on
# an H200 on 2026-11-27). Each child imports those itself (on a 2-core CPU, 0.2 s after these).
PRELOAD = ["torch", "transformers", "transformers.generation.utils",
           "lm_eval.evaluator", "lm_eval.models.huggingface", "lm_eval.tasks",
           "quantbench.experiment", "quantbench.quality", "quantbench.cost", "quantbench.methods"]
NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"  # torch.cuda.is_available() by NVML: no CUDA driver initialised


def start(preload=None):
    """Start the server (it imports in the background); returns its handle, or None off Linux or
    when QUANTBENCH_FORKSERVER is 0."""
    if sys.platform != "linux" or os.environ.get("QUANTBENCH_FORKSERVER") == "0":
        return None
    read_end, write_end = os.pipe()
    try:
        process = subprocess.Popen([sys.executable, "-m", "quantbench.forkserver", str(write_end),
                                    ",".join(preload or PRELOAD)], stdin=subprocess.PIPE, pass_fds=(write_end,),
                                   preexec_fn=ignore_sigint, text=True)
    except OSError as e:
        os.close(read_end)
        print(f"quantbench: the preloaded server could not start ({e}); each experiment starts its own interpreter",
              flush=True)
        return None
    finally:
        os.close(write_end)
    return {"process": process, "replies": os.fdopen(read_end), "ready": None, "problem": None}


def ignore_sigint():
    """In a child of the sweep, before Python starts: Ctrl-C is the sweep's to handle (it stops the
    child itself), so an interrupt never lands half-way through an import or a file write there. On
    Linux the child is also killed when its parent dies (a Ray worker lost mid-experiment, say), so no
    orphan keeps the GPU."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def ready(server):
    """Whether experiments can be forked from `server` (waiting for its imports the first time); when
    not, server["problem"] says why (printed once by the sweep)."""
    if server is None:
        return False
    if server["ready"] is None and not server["problem"]:
        reply = _reply(server)
        if reply is None:
            server["problem"] = "the preloaded server ended during its imports (its error is above)"
        elif reply.get("cuda_initialized"):
            server["problem"] = "an import initialised CUDA in the preloaded server, which a forked child cannot use"
        server["ready"] = reply
    if not server["problem"] and server["process"].poll() is not None:
        server["problem"] = f"the preloaded server ended (exit code {server['process'].returncode})"
    if server["problem"]:
        stop(server)
        return False
    return True


def run(server, run_dir, exp_id):
    """Run experiment `exp_id` of `run_dir` in a child forked from the server; its exit code, or None if
    the server itself ended first. Ctrl-C stops the child (SIGTERM), waits for it, and propagates."""
    try:
        server["process"].stdin.write(json.dumps({"run_dir": str(run_dir), "experiment": exp_id}) + "\n")
        server["process"].stdin.flush()
    except OSError:  # it ended since ready() looked
        server["problem"] = "the preloaded server ended"
        return None
    started = ended = None
    try:
        started = _reply(server)
        ended = started and _reply(server)
    except KeyboardInterrupt:
        started = started or _reply(server)  # the child's pid comes first, whenever the interrupt came
        if started:
            try:
                os.kill(started["pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass
            _reply(server)
        raise
    return None if ended is None else ended["exit"]


def stop(server):
    """End the server: SIGTERM (it holds nothing to save; its clean exit would take a second or more)."""
    if server is None:
        return
    if server["process"].poll() is None:
        server["process"].terminate()
        server["process"].wait()
    for stream in (server["process"].stdin, server["replies"]):
        try:
            stream.close()
        except OSError:  # unflushed data for a server that is gone
            pass


def _reply(server):
    line = server["replies"].readline()
    if not line:
        server["problem"] = server["problem"] or "the preloaded server ended"
        return None
    return json.loads(line)


def serve(reply_fd, preload):
    """The server's loop: import, say so, then fork and wait for one child per line of stdin."""
    replies = os.fdopen(reply_fd, "w", buffering=1)
    user_nvml_check = os.environ.get(NVML_CHECK)
    os.environ[NVML_CHECK] = "1"
    t = time.perf_counter()
    for name in preload:
        importlib.import_module(name)
    import torch

    replies.write(json.dumps({"ready": True, "import_s": round(time.perf_counter() - t, 3), "preloaded": preload,
                              "cuda_initialized": torch.cuda.is_initialized()}) + "\n")
    warnings.filterwarnings("ignore", message=r"This process .* is multi-threaded", category=DeprecationWarning)
    for line in sys.stdin:
        command = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(command, replies, user_nvml_check)
        replies.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"exit": os.waitstatus_to_exitcode(status)}) + "\n")


def _child(command, replies, user_nvml_check):
    """In the forked child: the experiment, then exit (never returns). It keeps the server's ignored
    SIGINT, and dies if the server dies (so no orphan keeps the GPU)."""
    code = 1
    try:
        replies.close()
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # stdin was the server's command stream
        if user_nvml_check is None:
            os.environ.pop(NVML_CHECK, None)
        else:
            os.environ[NVML_CHECK] = user_nvml_check
        ignore_sigint()  # already ignored; and now killed with the server
        # The first full collection writes to every object the server imported, so the pages they
        # sit on are copied from the server's: done here, before anything is timed, not in the first
        # phase (on a 2-core CPU forked loads were 0.15-0.3 s slower than in a fresh interpreter).
        gc.collect()
        from quantbench import experiment

        code = experiment.main(command["run_dir"], command["experiment"], process="forked from the preloaded server")
    except SystemExit as e:
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - whatever it was, the child ends here with its traceback shown
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":  # python -m quantbench.forkserver REPLY_FD MODULE,MODULE,...
    serve(int(sys.argv[1]), sys.argv[2].split(","))
