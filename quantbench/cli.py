"""The `quantbench` command.

    quantbench run                                   # the demo: smollm2-135m, baseline vs nf4, fp4, gptq, awq
    quantbench run --model meta-llama/Llama-3.2-1B --methods baseline,nf4,fp4,int8 --tasks coqa --limit 100
    quantbench run --experiment bnb_4bit_nf4        # the course project's names work too
    quantbench run --all --limit 500                 # every method this machine can run
    quantbench run --resume results/run003           # finish an interrupted sweep
    quantbench run --config sweep.yaml               # the same settings from a YAML or TOML file
    quantbench methods                               # what exists and what runs here
    quantbench report results/run003                 # report.md and report.html from the result files
    quantbench report results/run003 --max-weight-mib 100 --min-recovery 99   # the method to ship under limits

`quantbench run`'s flags come from the fields of config.RunConfig; flags override the sweep file,
which overrides the defaults. Bad input exits with code 2 and one line saying what to do.
"""
import argparse
import importlib.util
import sys

from quantbench import config as settings
from quantbench import sweep
from quantbench.config import ConfigError
from quantbench.methods import ALIASES, METHODS, why_not_runnable


def build_parser():
    p = argparse.ArgumentParser(prog="quantbench", description="Which quantization should I use for this model on this GPU?")
    sub = p.add_subparsers(dest="command", required=True)
    settings.add_run_arguments(sub.add_parser("run", help="run a comparison (default: the built-in demo)"))
    sub.add_parser("methods", help="list the quantization methods and whether each can run here")
    rep = sub.add_parser("report", help="report.md and a self-contained report.html from one or more run folders")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rep.add_argument("--out", help="folder for the report (default: the first run folder)")
    settings.add_decide_arguments(rep)
    return p


def launcher_for(config):
    """(the launcher of config.backend, the device its experiments see: None for this machine's)."""
    if config.backend == "local":
        import torch

        from quantbench import local

        return local.local_launcher(start_now=torch.cuda.is_available()), None
    if importlib.util.find_spec(config.backend) is None:
        raise ConfigError(f"--backend {config.backend} needs the {config.backend} package: "
                          f"pip install 'quantbench[{config.backend}]'")
    if config.backend == "ray":
        from quantbench import remote

        return remote.ray_launcher(config.ray_address), remote.ray_device(config.ray_address)
    from quantbench import modal_app

    return modal_app.modal_launcher(config.gpu), "cuda"


def cmd_methods(args):
    from quantbench.engines import ENGINES

    device = sweep.resolve_device("auto")
    head = ["method", "family", "engine", "bits", "group", "calibration", "GPU only", "install", f"runs here ({device})", "what"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for name, m in METHODS.items():
        problem = why_not_runnable(name, device)
        here = "yes" if problem is None else f"no: {problem[0]}; {problem[1]}"
        extra = f"quantbench[{m['extra']}]" if m["extra"] else "(core)"
        row = [name, m["family"], m["engine"], str(m["bits"] or "as saved"), str(m["group_size"] or "-"), "yes" if m["calibration"] else "no",
               "yes" if m["gpu"] else "no", extra, here, m["about"]]
        print("| " + " | ".join(row) + " |")
    print("\nEngines here:" + "".join(f"\n- {name}: {engine.about(device)}" for name, engine in ENGINES.items()))
    print("\nThe course project's names: " + ", ".join(f"{a} = {c}" for a, c in ALIASES.items()))
    return 0


def cmd_report(args):
    from quantbench import report

    md, page = report.build(args.run_dirs, args.out, limits=settings.decide_limits(args))
    print(f"wrote {md} and {page}")
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    commands = {"run": lambda a: sweep.run_command(a, launcher_for), "methods": cmd_methods, "report": cmd_report}
    try:
        return commands[args.command](args)
    except sweep.USER_ERRORS as e:
        print(f"quantbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("quantbench: stopped by Ctrl-C before any experiment ran", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
