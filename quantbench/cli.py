"""The `quantbench` command.

    quantbench run                                   # the demo: smollm2-135m, fp16 vs nf4 vs fp4
    quantbench run --model meta-llama/Llama-3.2-1B --methods fp16,nf4,fp4,int8 --tasks coqa --limit 100
    quantbench run --experiment bnb_4bit_nf4        # the course project's names work too
    quantbench run --all --limit 500                 # every method this machine can run
    quantbench run --resume results/run003           # finish an interrupted sweep
    quantbench run --config sweep.yaml               # the same settings from a YAML or TOML file
    quantbench methods                               # what exists and what runs here

Flags override the sweep file, which overrides the defaults; the result is one RunConfig, written
into run.json as it was used. Bad input exits with code 2 and one line saying what to do.
"""
import argparse
import dataclasses
import os
import shutil
import sys
from pathlib import Path

from quantbench import forkserver
from quantbench.config import (BACKEND_CHOICES, COMPUTE_DTYPE_CHOICES, DECODE_MODE_CHOICES, DEFAULT_METHODS, SUITES, ConfigError, RunConfig, load_sweep_file, make_experiment,
                               parse_tasks, validate)
from quantbench.methods import ALIASES, METHODS, why_not_runnable
from quantbench.models import ModelError, cache_folder
from quantbench.results import read_json
from quantbench.tasks import LOCAL_TASKS


def _positive_int_list(text):
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got '{text}'") from None


def _limit(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None


def _batch(text):
    return "auto" if text == "auto" else _limit(text)


def _tokens(text):
    """A token count, or 'all' (kept as the word until the config is built: None means 'not given')."""
    return "all" if text == "all" else _limit(text)


def build_parser():
    p = argparse.ArgumentParser(prog="quantbench", description="Which quantization should I use for this model on this GPU?")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a comparison (default: the built-in demo)")
    r.add_argument("--model", action="append", help="hub id, local safetensors directory, smollm2-135m (default) or arch:<name>; repeatable")
    r.add_argument("--methods", help="comma-separated methods (see `quantbench methods`); default fp16,nf4,fp4")
    r.add_argument("--experiment", action="append", help="one method by name, the original names included; repeatable")
    r.add_argument("--all", action="store_true", default=None, help="every method that can run on this machine")
    r.add_argument("--tasks", help="comma-separated lm-eval tasks, or 'none' (default coqa)")
    r.add_argument("--suite", choices=list(SUITES), help="a preset: quick = perplexity, KLD, lambada_openai and "
                   "arc_easy (500 documents each); standard = perplexity, KLD, lambada_openai, arc_easy, piqa, "
                   "boolq, winogrande and coqa (squad_v1 offline), 1000 documents each; --tasks/--limit override")
    r.add_argument("--limit", type=_limit, help="documents per task")
    r.add_argument("--data-dir", help="local evaluation data (default $QUANTBENCH_DATA_DIR)")
    r.add_argument("--out", help="folder for run folders (default results/)")
    r.add_argument("--resume", help="a run folder to finish")
    r.add_argument("--config", help="a YAML or TOML sweep file")
    r.add_argument("--device", choices=["auto", "cuda", "cpu"])
    r.add_argument("--compute-dtype", choices=COMPUTE_DTYPE_CHOICES, help="what the baseline and every method "
                   "whose recipe does not fix its dtype compute in (default: each model's checkpoint dtype)")
    r.add_argument("--backend", choices=BACKEND_CHOICES, help="where experiments run: here (local, default), on a Ray "
                   "cluster (ray: one experiment per GPU), or on Modal's cloud GPUs (modal); results land here either way")
    r.add_argument("--ray-address", help="an existing Ray cluster (default $RAY_ADDRESS, else a local one is started)")
    r.add_argument("--gpu", help="Modal's card for --backend modal (default A100; H100, L40S, A10G, T4, ...)")
    r.add_argument("--cache-dir", help="demo, arch: and quantized checkpoints (default $QUANTBENCH_CACHE or ~/.cache/quantbench)")
    r.add_argument("--trust-remote-code", action="store_true", default=None, help="allow a hub model's own code to run")
    r.add_argument("--eval-batch-size", type=_batch, help="lm-eval batch size, or 'auto' (default: on a GPU "
                   "lm-eval's detection, from what its probe fits in free memory, 64 to 256; on the CPU 16)")
    r.add_argument("--max-length", type=_limit, help="lm-eval context length (default min(model positions, 2048))")
    r.add_argument("--max-gen-toks", type=_limit, help="bound on tokens generated per lm-eval request (default 128)")
    r.add_argument("--ppl-tokens", type=_tokens, help="corpus tokens scored for perplexity, or 'all' (default 16384)")
    r.add_argument("--ppl-window", type=_limit, help="perplexity window in tokens (default 2048)")
    r.add_argument("--kld-tokens", type=_tokens, help="corpus tokens for the KL divergence from the baseline, "
                   "'all', or 0 for none (default 8192: 16 chunks, 4080 tokens scored)")
    r.add_argument("--kld-ctx", type=_limit, help="KLD chunk length, llama.cpp's n_ctx; the second half of "
                   "each chunk is scored (default 512)")
    r.add_argument("--prompt-lengths", type=_positive_int_list, help="prompt lengths for time to first token and "
                   "prefill tokens/s (default 128,512,2048)")
    r.add_argument("--new-tokens", type=_limit, help="tokens generated when timing decode (default 64)")
    r.add_argument("--batch-sizes", type=_positive_int_list, help="decode batch sizes (default 1,8,32)")
    r.add_argument("--decode-mode", choices=DECODE_MODE_CHOICES, help="eager generate (default), compiled (greedy "
                   "loop with a static KV cache and a torch.compile'd step, CUDA graphs on a GPU: one compilation per "
                   "method and batch size), or both")
    r.add_argument("--repeats", type=_limit, help="timed runs per TTFT point, after a warm-up (default 3)")
    r.add_argument("--decode-runs", type=_limit, help="timed decode runs per batch size, after a warm-up run; "
                   "every step of each is a sample, the median step is reported (default 1)")
    r.add_argument("--calibration", help="GPTQ/AWQ calibration text file (default WikiText-2 validation from "
                   "--data-dir, else c4 from the hub)")
    r.add_argument("--calibration-samples", type=_limit, help="calibration samples (default 128)")
    r.add_argument("--calibration-tokens", type=_limit, help="tokens per calibration sample (default 512)")
    sub.add_parser("methods", help="list the quantization methods and whether each can run here")
    rep = sub.add_parser("report", help="report.md and a self-contained report.html from one or more run folders")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rep.add_argument("--out", help="folder for the report (default: the first run folder)")
    return p


FLAG_FIELDS = ["limit", "data_dir", "out", "device", "compute_dtype", "cache_dir", "trust_remote_code", "eval_batch_size",
               "max_length", "max_gen_toks", "ppl_tokens", "ppl_window", "kld_tokens", "kld_ctx", "prompt_lengths", "new_tokens",
               "batch_sizes", "decode_mode", "repeats", "decode_runs", "calibration", "calibration_samples", "calibration_tokens",
               "backend", "ray_address", "gpu"]


def config_from_args(args):
    """Defaults <- sweep file <- flags, validated. Raises ConfigError."""
    values = load_sweep_file(args.config) if args.config else {}
    suite = args.suite or values.get("suite")
    if suite in SUITES:  # the suite's tasks and limit, unless the file or a flag names them
        values["suite"] = suite
        values.setdefault("tasks", list(SUITES[suite]["tasks"]))
        values.setdefault("limit", SUITES[suite]["limit"])
    for name in FLAG_FIELDS:
        value = getattr(args, name)
        if value is not None:
            values[name] = None if value == "all" else value  # None: the whole corpus
    if args.model:
        values["models"] = [m.strip() for arg in args.model for m in arg.split(",") if m.strip()]
    if args.tasks is not None:
        values["tasks"] = parse_tasks(args.tasks)
    if args.all:
        values["all_methods"] = True
    names = [n.strip() for n in (args.methods or "").split(",") if n.strip()] + list(args.experiment or [])
    if args.methods is not None and not names:
        raise ConfigError("--methods is empty; name at least one method (see `quantbench methods`)")
    if names:
        values["experiments"] = [make_experiment(n) for n in names]
    values.setdefault("data_dir", os.environ.get("QUANTBENCH_DATA_DIR") or None)
    config = dataclasses.replace(RunConfig(), **values)
    if not config.experiments and not config.all_methods:
        config.experiments = [make_experiment(n) for n in DEFAULT_METHODS]
    validate(config)
    if config.calibration is not None:
        if not Path(config.calibration).is_file():
            raise ConfigError(f"--calibration {config.calibration}: no such file")
        config.calibration = str(Path(config.calibration).resolve())
    if config.data_dir is not None:
        if not Path(config.data_dir).is_dir():
            raise ConfigError(f"--data-dir {config.data_dir}: no such folder")
        config.data_dir = str(Path(config.data_dir).resolve())
    return config


def execute(run_dir, backend, *, ray_address=None, gpu=None, server=None):
    """Run the run folder's unfinished experiments here (forked from `server` when one was started),
    on Ray or on Modal."""
    from quantbench import sweep

    if backend == "local":
        return sweep.execute(run_dir, server)
    _need(backend)
    from quantbench import remote

    if backend == "ray":
        return remote.execute_ray(run_dir, ray_address)
    from quantbench.modal_app import DEFAULT_GPU

    return remote.execute_modal(run_dir, gpu or DEFAULT_GPU)


def _need(backend):
    """The backend's library, or a clear error saying how to install it."""
    import importlib.util

    if importlib.util.find_spec(backend) is None:
        raise ConfigError(f"--backend {backend} needs the {backend} package: pip install 'quantbench[{backend}]'")


def cmd_run(args):
    from quantbench import sweep

    if args.resume:
        sweep.check_resumable(args.resume)
        config = read_json(Path(args.resume) / "run.json")["config"]  # how it ran, unless a flag says otherwise
        backend = args.backend or config.get("backend", "local")
        return execute(Path(args.resume), backend, ray_address=args.ray_address or config.get("ray_address"),
                       gpu=args.gpu or config.get("gpu"))
    config = config_from_args(args)
    # The experiments' preloaded server starts now, so that its imports overlap the set-up below
    # (resolving the device, the model and the tasks); the sweep stops it.
    server = forkserver.start() if config.backend == "local" else None
    try:
        run_dir = new_run_folder(args, config)
    except BaseException:
        forkserver.stop(server)
        raise
    return execute(run_dir, config.backend, ray_address=config.ray_address, gpu=config.gpu, server=server)


def new_run_folder(args, config):
    """The run folder for `config`: the methods `--all` adds, task names checked, run.json written."""
    from quantbench import sweep

    device = None
    if config.backend != "local":  # the experiments see the cluster's device, not this machine's
        _need(config.backend)
        from quantbench import remote

        device = remote.cluster_device(config.backend, ray_address=config.ray_address)
    if config.all_methods:
        have = {e["name"] for e in config.experiments}
        device = device or sweep.resolve_device(config.device)
        here = config.backend == "local"  # elsewhere, a missing library is found (and recorded as skipped) on the worker
        config.experiments += [make_experiment(n) for n in METHODS  # the baselines by name, not `baseline`
                               if n not in have and n != "baseline" and why_not_runnable(n, device, libraries=here) is None]
    if config.tasks and not set(config.tasks) <= set(LOCAL_TASKS):  # quantbench's own names need no index
        from quantbench.tasks import known_task_names

        known = known_task_names()
        unknown = [t for t in config.tasks if t not in known]
        if unknown:
            raise ConfigError(f"unknown task(s) {', '.join(unknown)}: not an lm-eval task name "
                              "(lm-eval's `lm_eval ls tasks` lists them), or 'none'")
    cache_dir = cache_folder(config.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    run_dir = sweep.create_run(config, cache_dir, device=device)
    if args.config:
        shutil.copy(args.config, run_dir / ("sweep" + Path(args.config).suffix))
    print(f"Run folder: {run_dir}", flush=True)
    return run_dir


def cmd_methods(args):
    from quantbench.sweep import resolve_device

    device = resolve_device("auto")
    head = ["method", "family", "bits", "group", "calibration", "GPU only", "install", f"runs here ({device})", "what"]
    rows = []
    for name, m in METHODS.items():
        problem = why_not_runnable(name, device)
        here = "yes" if problem is None else f"no: {problem[0]}; {problem[1]}"
        extra = f"quantbench[{m['extra']}]" if m["extra"] else "(core)"
        rows.append([name, m["family"], str(m["bits"]), str(m["group_size"] or "-"), "yes" if m["calibration"] else "no",
                     "yes" if m["gpu"] else "no", extra, here, m["about"]])
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print("\nThe course project's names: " + ", ".join(f"{a} = {c}" for a, c in ALIASES.items()))
    return 0


def cmd_report(args):
    from quantbench import report

    md, page = report.build(args.run_dirs, args.out)
    print(f"wrote {md} and {page}")
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    from quantbench.sweep import RunError

    try:
        return {"run": cmd_run, "methods": cmd_methods, "report": cmd_report}[args.command](args)
    except (ConfigError, RunError, ModelError, FileNotFoundError) as e:
        print(f"quantbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("quantbench: stopped by Ctrl-C before any experiment ran", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
