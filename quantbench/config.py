"""The run's configuration: one dataclass, each setting declared once with its help, group and check.

The `quantbench run` flags, the keys of a sweep file (YAML or TOML) and the validation are all made
from the fields of RunConfig. Flags override the file, which overrides the defaults; the result is
written into run.json as it was used, and each experiment rebuilds it from there (`from_run`).
A sweep file takes the same settings; methods are names, or tables that change a method's settings:

    models: [smollm2-135m]
    methods:
      - fp16
      - bnb_4bit_nf4
      - {name: nf4-dq-off-bf16, method: nf4, double_quant: false, compute_dtype: bfloat16}
    tasks: [coqa]
    limit: 100

Unknown keys and bad values are errors that name the flag, or the file and line.

    >>> config = from_args(run_parser().parse_args(["--methods", "fp16,nf4"]))
"""
import argparse
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from quantbench.methods import METHODS, external_method, method_settings, resolve_method_name


class ConfigError(Exception):
    """A bad configuration value; the message says where and what to do."""


# --eval-batch-size auto on a GPU: lm-eval's detection, started at what its probe fits in the free
# memory (quality.eval_batch_start), never below lm-eval's own start nor above EVAL_MAX_BATCH: a small
# model's generation steps are bound by the host, so fewer, larger batches finish sooner.
EVAL_MIN_START, EVAL_MAX_BATCH, EVAL_CPU_BATCH = 64, 256, 16
DECODE_MODE_CHOICES = ["eager", "compiled", "both"]
BACKEND_CHOICES = ["local", "ray", "modal"]
COMPUTE_DTYPE_CHOICES = ["float16", "bfloat16", "float32"]
KV_CACHE_CHOICES = ["fp16", "int8", "int4", "int2"]
ENGINE_CHOICES = ["transformers", "llama.cpp", "vllm"]
VLLM_BENCH_CHOICES = ["latency", "throughput"]
KV_CACHE_BITS = {"int8": 8, "int4": 4, "int2": 2}
GROUPS = {"compare": "what to compare", "quality": "quality budget", "speed": "speed sweep",
          "decide": "the pick (the report's first paragraph; `quantbench report` takes these too)", "where": "where to run"}


def _whole(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None


def _whole_list(text):
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got '{text}'") from None


def _number(text):
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None


def _is_number(low, *, above):
    """A check that a value is a number above `low` (or at least `low` when not `above`)."""
    def check(value):
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                (value <= low if above else value < low):
            return f"must be a number {'above' if above else 'of at least'} {low:g}"
        return None
    return check


def _tokens(text):
    return "all" if text == "all" else _whole(text)  # a word until the config is built (None there: not given)


def _batch(text):
    return "auto" if text == "auto" else _whole(text)


def _names(text):
    return [n.strip() for n in text.split(",") if n.strip()]


def parse_names(text):
    """'coqa,lambada_openai' -> ['coqa', 'lambada_openai']; 'none' -> []."""
    names = _names(text)
    return [] if names in ([], ["none"]) else names


def _positive(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0  # True is an int to Python


def _is_count(value):
    return None if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0) \
        else "must be a whole number, 0 or more"


def _is_bool(value):
    return None if isinstance(value, bool) else "must be true or false"


def _is_positive(value):
    return None if value is None or _positive(value) else "must be a positive whole number"


def _are_positive(values):
    return None if values and all(_positive(v) for v in values) else "must be positive whole numbers"


def _distinct_among(choices, none=False):
    """The check of a list of names from `choices`, each at most once; empty only where `none` allows it."""
    return lambda v: None if (v or none) and all(x in choices for x in v) and len(set(v)) == len(v) \
        else f"must be distinct names among {', '.join(choices)}" + (", or none" if none else "")


def _one_of(choices):
    return lambda value: None if value is None or value in choices else f"must be one of {', '.join(choices)}"


def setting(default, group, help, *, parse=None, check=None, choices=None, flag=None, action=None, keys=()):
    """A RunConfig field declared once: its default, the --help group and text, how a flag's text is
    parsed, the check of its value (a function returning what is wrong, or None), its flag name if not
    the field's, and other sweep-file keys it answers to."""
    meta = {"group": group, "help": help, "parse": parse, "check": check or (choices and _one_of(choices)),
            "choices": choices, "flag": flag, "action": action, "keys": keys}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    models: list = setting(["smollm2-135m"], "compare", "hub id, local safetensors directory, smollm2-135m (default) "
                           "or arch:<name>; comma-separated or repeated", parse=_names, flag="--model", action="append",
                           keys=("model",))
    # Each experiment: {'name': its id in results, 'method': a METHODS name, 'settings': {...}}.
    experiments: list = setting([], "compare", "comma-separated methods (see `quantbench methods`; default baseline, "
                                "nf4, fp4, gptq-w4g128, awq-w4g128)", parse=_names, flag="--methods", keys=("methods",))
    all_methods: bool = setting(False, "compare", "every method that can run on this machine", flag="--all",
                                action="store_true", keys=("all",))
    engines: list = setting(["transformers", "llama.cpp"], "compare", "engines to measure in: each method runs in its own "
                            "(transformers, or llama.cpp for GGUF types), and with vllm again in vLLM where vLLM serves its "
                            "checkpoint (float, GPTQ, AWQ, torchao, llm-compressor, AutoRound, a checkpoint folder), as "
                            "experiment <name>@vllm (default transformers,llama.cpp)", parse=_names,
                            check=_distinct_among(ENGINE_CHOICES))
    tasks: list = setting(["coqa"], "compare", "comma-separated lm-eval tasks, or 'none' (default coqa)", parse=parse_names)
    include_path: str | None = setting(None, "compare", "a folder of lm-eval task YAMLs, as lm-eval's --include_path: "
                                       "name its tasks in --tasks like any other (their data: dataset_path json, csv, "
                                       "... with dataset_kwargs.data_files)")
    suite: str | None = setting(None, "compare", "a preset: quick = perplexity, KLD, lambada_openai and arc_easy, 500 "
                                "documents each; standard = perplexity, KLD, lambada_openai, arc_easy, piqa, boolq, "
                                "winogrande and coqa (squad_v1 offline), 1000 each; --tasks and --limit override",
                                choices=["quick", "standard"])
    compute_dtype: str | None = setting(None, "compare", "what the baseline and every method whose recipe does not fix its "
                                        "dtype compute in (default: each model's checkpoint dtype)",
                                        choices=COMPUTE_DTYPE_CHOICES)
    kv_cache: list = setting(["fp16"], "compare", "KV cache precisions, each crossed with every transformers method: fp16 "
                             "(the model's own cache, in its compute dtype), int8, int4, int2 (transformers' quantized "
                             "cache: keys and values per channel in groups of 64, the last 128 tokens unquantized); "
                             "e.g. fp16,int4 (default fp16)", parse=_names,
                             check=_distinct_among(KV_CACHE_CHOICES))
    kv_cache_backend: str = setting("hqq", "compare", "the quantized KV cache's library: hqq (default; 8, 4 or 2 bits) or "
                                    "quanto (optimum-quanto; 4 or 2 bits)", choices=["hqq", "quanto"])
    limit: int | None = setting(None, "quality", "documents per task (default all)", parse=_whole, check=_is_positive)
    data_dir: str | None = setting(None, "quality", "local evaluation data (default $QUANTBENCH_DATA_DIR)")
    num_fewshot: int | None = setting(None, "quality", "few-shot examples before each document, as lm-eval's --num_fewshot "
                                      "(default: each task's own, mostly 0; a task whose YAML says 0 keeps 0)",
                                      parse=_whole, check=_is_count)
    apply_chat_template: bool = setting(False, "quality", "format every prompt with the tokenizer's chat template, as "
                                        "lm-eval's --apply_chat_template (the same Hugging Face template in both "
                                        "engines); a tokenizer without one is an error", action="store_true",
                                        check=_is_bool)
    fewshot_as_multiturn: bool = setting(False, "quality", "the few-shot examples as turns of the chat, as lm-eval's "
                                         "--fewshot_as_multiturn (needs --apply-chat-template; off unless given)",
                                         action="store_true", check=_is_bool)
    ppl_tokens: int | None = setting(16384, "quality", "corpus tokens scored for perplexity, or 'all' (default 16384)",
                                     parse=_tokens, check=_is_positive)
    ppl_window: int = setting(2048, "quality", "perplexity window in tokens, capped at the model's positions (default 2048)",
                              parse=_whole, check=_is_positive)
    kld_tokens: int | None = setting(8192, "quality", "corpus tokens for the KL divergence from the baseline, 'all', or 0 "
                                     "for none (default 8192: 16 chunks, 4080 tokens scored)", parse=_tokens,
                                     check=lambda v: None if v is None or (_positive(v) or v == 0 and not isinstance(v, bool))
                                     else "must be a whole number, 'all', or 0 to turn the divergence off")
    kld_ctx: int = setting(512, "quality", "KLD chunk length, llama.cpp's n_ctx; the second half of each chunk is scored "
                           "(default 512)", parse=_whole,
                           check=lambda v: None if _positive(v) and v >= 4 and v % 2 == 0 else "must be an even number of at least 4")
    long_context: list = setting([], "quality", "also perplexity and KLD at these windows in tokens, e.g. 4096,8192, where "
                                 "the model's positions allow (4-bit methods lose more at long context; default none)",
                                 parse=_whole_list, check=lambda v: None if all(_positive(n) and n >= 4 and n % 2 == 0
                                                                              for n in v) else "must be even whole numbers of at least 4")
    max_length: int | None = setting(None, "quality", "lm-eval context length (default min(model positions, 2048))",
                                     parse=_whole, check=_is_positive)
    max_gen_toks: int = setting(128, "quality", "bound on tokens generated per lm-eval request (default 128)",
                                parse=_whole, check=_is_positive)
    eval_batch_size: int | str = setting("auto", "quality", "lm-eval batch size, or 'auto' (default: on a GPU lm-eval's "
                                         "detection, from what its probe fits in free memory, 64 to 256; on the CPU 16)",
                                         parse=_batch, check=lambda v: None if v == "auto" or _positive(v)
                                         else "must be a positive whole number or 'auto'")
    calibration: str | None = setting(None, "quality", "GPTQ/AWQ calibration text file (default WikiText-2 validation "
                                      "from --data-dir, else c4 from the hub)")
    calibration_samples: int = setting(128, "quality", "calibration samples (default 128)", parse=_whole, check=_is_positive)
    calibration_tokens: int = setting(512, "quality", "tokens per calibration sample (default 512)", parse=_whole,
                                      check=_is_positive)
    prompt_lengths: list = setting([128, 512, 2048], "speed", "prompt lengths for time to first token and prefill "
                                   "tokens/s (default 128,512,2048)", parse=_whole_list, check=_are_positive)
    batch_sizes: list = setting([1, 8, 32], "speed", "decode batch sizes (default 1,8,32)", parse=_whole_list,
                                check=_are_positive)
    new_tokens: int = setting(64, "speed", "tokens generated when timing decode, at least 2 (default 64)", parse=_whole,
                              check=lambda v: None if _positive(v) and v >= 2
                              else "must be at least 2 (decode speed excludes the first token)")
    decode_prompt_tokens: int = setting(32, "speed", "prompt length of the decode points (default 32)", parse=_whole,
                                        check=_is_positive)
    # Eager by default: torch.compile adds a compilation for every method and batch size.
    decode_mode: str = setting("eager", "speed", "eager generate (default), compiled (greedy loop with a static KV cache "
                               "and a torch.compile'd step, CUDA graphs on a GPU: one compilation per method and batch "
                               "size), or both", choices=DECODE_MODE_CHOICES)
    repeats: int = setting(3, "speed", "timed runs per TTFT point, after a warm-up (default 3)", parse=_whole,
                           check=_is_positive)
    decode_runs: int = setting(1, "speed", "timed decode runs per batch size, after a warm-up run; every step of each is "
                               "a sample, the median step is reported (default 1)", parse=_whole, check=_is_positive)
    vllm_bench: list = setting(["latency", "throughput"], "speed", "vLLM's own benchmarks after each vLLM experiment, each "
                               "a process that starts vLLM again: latency (`vllm bench latency` at batch 1, beside "
                               "quantbench's own figures: the check), throughput (`vllm bench throughput` at each "
                               "--batch-sizes), or none (default latency,throughput)", parse=parse_names,
                               check=_distinct_among(VLLM_BENCH_CHOICES, none=True))
    serve_rates: list = setting([], "speed", "request rates a second at which each vLLM experiment is also served "
                                "(`vllm serve`) and measured by `vllm bench serve`: TTFT and TPOT percentiles, e.g. "
                                "4,16,64 (default none)", parse=_whole_list, check=lambda v: None if all(_positive(n) for n in v)
                                else "must be positive whole numbers")
    max_weight_mib: float | None = setting(None, "decide", "pick only methods whose weights take at most this many MiB",
                                           parse=_number, check=_is_number(0, above=True))
    min_recovery: float | None = setting(None, "decide", "pick only methods whose mean recovery over the tasks (score / "
                                         "baseline's x 100) is at least this many percent", parse=_number,
                                         check=_is_number(0, above=True))
    max_kld: float | None = setting(None, "decide", "pick only methods whose mean KLD from the baseline is at most this",
                                    parse=_number, check=_is_number(0, above=False))
    pick_batch: int = setting(1, "decide", "the decode batch size the pick weighs (default 1)", parse=_whole,
                              check=_is_positive)
    device: str = setting("auto", "where", "auto (default), cuda or cpu", choices=["auto", "cuda", "cpu"])
    backend: str = setting("local", "where", "where experiments run: here (local, default), on a Ray cluster (ray: one "
                           "experiment per GPU), or on Modal's cloud GPUs (modal); results land here either way",
                           choices=BACKEND_CHOICES)
    ray_address: str | None = setting(None, "where", "an existing Ray cluster (default $RAY_ADDRESS, else a local one)")
    gpu: str | None = setting(None, "where", "Modal's card for --backend modal (default A100; any card Modal offers: L40S, A10G, T4, ...)")
    out: str = setting("results", "where", "folder for run folders (default results/)")
    cache_dir: str | None = setting(None, "where", "demo, arch: and quantized checkpoints (default $QUANTBENCH_CACHE or "
                                    "~/.cache/quantbench)")
    trust_remote_code: bool = setting(False, "where", "allow a hub model's own code to run", action="store_true")


def _flag(f):
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
FILE_KEYS = {key: f.name for f in FIELDS.values() for key in (f.name, *f.metadata["keys"])}

# Presets that answer the question fast; perplexity and the KL divergence run in every suite. Offline,
# CoQA (one story in ../shared/data) is replaced by its stand-in, SQuAD v1.1.
SUITES = {
    "quick": {"tasks": ["lambada_openai", "arc_easy"], "limit": 500},
    "standard": {"tasks": ["lambada_openai", "arc_easy", "piqa", "boolq", "winogrande", "coqa"], "limit": 1000,
                 "offline": {"coqa": "squad_v1"}},
}
# The course project's comparison: the float baseline, bitsandbytes NF4 and FP4, GPTQ and AWQ (each
# that cannot run here is skipped with its reason: AWQ needs CUDA, group 128 does not tile every model).
DEFAULT_METHODS = ["baseline", "nf4", "fp4", "gptq-w4g128", "awq-w4g128"]


def add_run_arguments(parser):
    """The `quantbench run` flags, grouped by purpose, one per RunConfig field (and --experiment, the
    course project's one-method flag, beside --methods), plus --config and --resume."""
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    for f in FIELDS.values():
        m = f.metadata
        kwargs = {"help": m["help"], "dest": f.name, "default": None}
        if m["action"] != "store_true" and not m["choices"]:
            kwargs["metavar"] = _flag(f)[2:].upper().replace("-", "_")
        if m["action"] == "store_true":
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=m["parse"] or str, choices=m["choices"], action=m["action"])
        groups[m["group"]].add_argument(_flag(f), **kwargs)
        if f.name == "experiments":
            groups["compare"].add_argument("--experiment", action="append", dest="experiment", default=None,
                                           help="one method by name, the original names included; repeatable")
    groups["compare"].add_argument("--config", help="a YAML or TOML sweep file with the same settings")
    groups["where"].add_argument("--resume", help="a run folder to finish (its settings, unless a flag says otherwise)")
    return parser


def add_decide_arguments(parser):
    """The pick's flags (group "decide") for `quantbench report`, from the same fields: given there, they
    replace the run's own."""
    group = parser.add_argument_group(GROUPS["decide"])
    for f in FIELDS.values():
        if f.metadata["group"] == "decide":
            group.add_argument(_flag(f), dest=f.name, default=None, type=f.metadata["parse"], help=f.metadata["help"],
                               metavar=_flag(f)[2:].upper().replace("-", "_"))
    return parser


def decide_limits(args):
    """The pick's settings given to `quantbench report`, checked as the run's are; ConfigError naming the flag."""
    given = {name: getattr(args, name) for name, f in FIELDS.items() if f.metadata["group"] == "decide"
             and getattr(args, name, None) is not None}
    for name, value in given.items():
        problem = FIELDS[name].metadata["check"](value)
        if problem:
            raise ConfigError(f"{_flag(FIELDS[name])} {problem}, got {value!r}")
    return given


def run_parser():
    return add_run_arguments(argparse.ArgumentParser(prog="quantbench run"))


def from_args(args):
    """Defaults <- sweep file <- flags, validated and with paths made absolute. Raises ConfigError."""
    values = load_sweep_file(args.config) if args.config else {}
    for name, f in FIELDS.items():
        value = getattr(args, name)
        if value is None or name == "experiments":
            continue
        if f.metadata["action"] == "append":  # --model a,b --model c
            value = [item for part in value for item in part]
        values[name] = None if value == "all" else value  # --ppl-tokens all: None, the whole corpus
    names = list(args.experiments or []) + list(args.experiment or [])
    if args.experiments is not None and not names:
        raise ConfigError("--methods is empty; name at least one method (see `quantbench methods`)")
    if names:
        values["experiments"] = [make_experiment(n) for n in names]
    values.setdefault("data_dir", os.environ.get("QUANTBENCH_DATA_DIR") or None)
    return finish(values)


def finish(values):
    """A RunConfig from field values: the suite's tasks and limit where nothing names them, the
    default methods where none are given, validated, paths made absolute."""
    suite = values.get("suite")
    if suite in SUITES:
        values.setdefault("tasks", list(SUITES[suite]["tasks"]))
        values.setdefault("limit", SUITES[suite]["limit"])
    config = RunConfig(**values)
    if not config.experiments and not config.all_methods:
        config.experiments = [make_experiment(n) for n in DEFAULT_METHODS]
    validate(config)
    for name, what in (("calibration", "file"), ("data_dir", "folder"), ("include_path", "folder")):
        value = getattr(config, name)
        if value is not None:
            path = Path(value)
            if not (path.is_file() if what == "file" else path.is_dir()):
                raise ConfigError(f"{_flag(FIELDS[name])} {value}: no such {what}")
            setattr(config, name, str(path.resolve()))
    return config


def from_run(run):
    """The RunConfig a run was made with, from its run.json."""
    return RunConfig(**run["config"])


def validate(config):
    """Each field's own check, then what depends on several; ConfigError naming the flag."""
    for name, f in FIELDS.items():
        check = f.metadata["check"]
        problem = check and check(getattr(config, name))
        if problem:
            raise ConfigError(f"{_flag(f)} {problem}, got {getattr(config, name)!r}")
    if config.kld_tokens and config.kld_tokens < config.kld_ctx:
        raise ConfigError(f"--kld-tokens {config.kld_tokens} is less than one chunk of --kld-ctx {config.kld_ctx}")
    if config.fewshot_as_multiturn and not config.apply_chat_template:
        raise ConfigError("--fewshot-as-multiturn needs --apply-chat-template: lm-eval makes the few-shot examples "
                          "turns of a chat only when it applies the chat template")
    if config.kv_cache_backend == "quanto" and "int8" in config.kv_cache:
        raise ConfigError("--kv-cache int8 needs --kv-cache-backend hqq: optimum-quanto's cache has 4 and 2 bits only")
    if config.ray_address and config.backend != "ray":
        raise ConfigError("--ray-address is for --backend ray")
    if config.gpu and config.backend != "modal":
        raise ConfigError("--gpu picks Modal's card; it is for --backend modal (locally and on Ray every visible GPU is used)")
    names = [e["name"] for e in config.experiments]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"experiment names must be unique; repeated: {', '.join(dupes)} "
                          "(give a method table its own 'name')")
    if not config.models:
        raise ConfigError("no model given")
    if "vllm" in config.engines and "transformers" not in config.engines:
        raise ConfigError("--engines vllm needs transformers too: the KL divergence's reference is the baseline's whole "
                          "next-token distributions, which vLLM does not return")
    for e in config.experiments:
        own = METHODS[e["method"]]["engine"]
        if e["method"] != "baseline" and own not in config.engines:
            raise ConfigError(f"method {e['name']} runs in {own}, which --engines {','.join(config.engines)} leaves out; "
                              f"add {own} to --engines")


def eval_batch(value, device):
    """The HFLM batch size of --eval-batch-size on this device: a number as given; "auto" is lm-eval's
    detection on a GPU (from quality.eval_batch_start) and EVAL_CPU_BATCH on the CPU, where a trial
    batch at the full context would take the machine's memory instead of failing."""
    if value != "auto":
        return value
    return "auto" if device == "cuda" else EVAL_CPU_BATCH


def decode_modes(choice):
    """The decode modes a run measures, in order."""
    return ["eager", "compiled"] if choice == "both" else [choice]


def make_experiment(entry, where=""):
    """A method name, or a dict {name?, method, **settings} -> experiment dict; ConfigError if bad."""
    if isinstance(entry, str):
        try:
            external = None if _known(entry) else external_method(entry)
        except ValueError as e:
            raise ConfigError(f"{where}{e}") from None
        entry = {"method": external[0], "name": external[1], "source": external[2]} if external else {"method": entry}
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}a method is a name or a table with 'method' and its settings, not {entry!r}")
    entry = dict(entry)
    raw = entry.pop("method", None) or entry.get("name")
    if raw is None:
        raise ConfigError(f"{where}a method table needs 'method: <known method>'")
    try:
        method = resolve_method_name(str(raw))
    except ValueError as e:
        raise ConfigError(f"{where}{e}") from None
    name = str(entry.pop("name", None) or method)
    allowed = method_settings(method)
    for key, value in entry.items():
        if key not in allowed:
            raise ConfigError(f"{where}method '{method}' has no setting '{key}'; its settings: "
                              + ", ".join(f"{k} (default {v!r})" for k, v in allowed.items()))
        default = allowed[key]
        if key in ("compute_dtype", "dtype") and value not in (*COMPUTE_DTYPE_CHOICES, "auto"):
            raise ConfigError(f"{where}setting '{key}' of '{method}' must be one of "
                              f"{', '.join(COMPUTE_DTYPE_CHOICES)} or auto, got {value!r}")
        if default is not None and not isinstance(value, type(default)) and \
                not (isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool)):
            raise ConfigError(f"{where}setting '{key}' of '{method}' must be {type(default).__name__}, got {value!r}")
    if METHODS[method]["family"] == "checkpoint":
        if not entry.get("source"):
            raise ConfigError(f"{where}method '{method}' needs 'source': the checkpoint's folder, GGUF file or hub id "
                              "(or name it in --methods by its path or hub id)")
        local = Path(entry["source"]).expanduser()
        entry["source"] = str(local.resolve()) if local.exists() else entry["source"]
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ConfigError(f"{where}experiment name '{name}' may hold only letters, digits, '.', '_' and '-'")
    return {"name": name, "method": method, "settings": entry}


def _known(name):
    try:
        return resolve_method_name(name)
    except ValueError:
        return None


def _yaml_lines(text):
    """Top-level key -> line, and per method entry index -> line, from the YAML's node marks."""
    import yaml

    node = yaml.compose(text)
    keys, entries = {}, {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            keys[k.value] = k.start_mark.line + 1
            if k.value == "methods" and isinstance(v, yaml.SequenceNode):
                entries = {i: item.start_mark.line + 1 for i, item in enumerate(v.value)}
    return keys, entries


def _toml_lines(text):
    keys = {}
    for i, line in enumerate(text.splitlines(), 1):
        m = re.match(r"\s*\[?\[?\s*([A-Za-z_][A-Za-z0-9_-]*)\s*[=\]]", line)
        if m and m.group(1) not in keys:
            keys[m.group(1)] = i
    return keys, {}


def load_sweep_file(path):
    """Parse and check a YAML or TOML sweep file -> dict of the RunConfig fields it sets."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            data, (lines, entry_lines) = tomllib.loads(text), _toml_lines(text)
        else:
            import yaml

            data, (lines, entry_lines) = yaml.safe_load(text), _yaml_lines(text)
    except Exception as e:  # both parsers say where the syntax broke
        raise ConfigError(f"{path}: cannot parse: {str(e).splitlines()[0]} {getattr(e, 'problem_mark', '')}".strip()) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")

    def at(key):
        return f"{path}:{lines.get(key, '?')}: "

    out = {}
    for key, value in data.items():
        name = FILE_KEYS.get(key.replace("-", "_"))
        if name is None:
            raise ConfigError(f"{at(key)}unknown key '{key}'; known keys: {', '.join(sorted(FILE_KEYS))}")
        if name == "experiments":
            items = value if isinstance(value, list) else [value]
            out[name] = [make_experiment(v, f"{path}:{entry_lines.get(i, lines.get(key, '?'))}: ")
                         for i, v in enumerate(items)]
        elif name in ("tasks", "vllm_bench"):
            out[name] = parse_names(value if isinstance(value, str) else ",".join(map(str, value)))
        elif name in ("models", "batch_sizes", "prompt_lengths", "long_context", "engines", "serve_rates"):
            out[name] = value if isinstance(value, list) else [value]
        elif name in ("ppl_tokens", "kld_tokens") and value == "all":
            out[name] = None  # the whole corpus
        elif name == "all_methods":
            out[name] = bool(value)
        else:
            out[name] = value
    try:
        validate(dataclasses.replace(RunConfig(), **out))
    except ConfigError as e:
        bad = next((k for k in data if str(e).startswith(_flag(FIELDS[FILE_KEYS[k.replace("-", "_")]]) + " ")), None)
        raise ConfigError(f"{at(bad) if bad else str(path) + ': '}{e}") from None
    return out
