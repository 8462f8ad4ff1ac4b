"""The run's configuration: one dataclass, filled from a sweep file and then the command line.

A sweep file (YAML or TOML) takes the same things as the flags. Methods are names, or tables that
name a method and change its settings:

    models: [smollm2-135m]
    methods:
      - fp16
      - bnb_4bit_nf4
      - {name: nf4-dq-off-bf16, method: nf4, double_quant: false, compute_dtype: bfloat16}
    tasks: [coqa]
    limit: 100

Unknown keys and bad values are errors that name the file and line.

    >>> config = load_sweep_file(Path("sweep.yaml"))   # -> dict of RunConfig fields
"""
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from quantbench.methods import method_settings, resolve_method_name


class ConfigError(Exception):
    """A bad configuration value; the message says where and what to do."""


# --eval-batch-size auto: lm-eval's detection on a GPU, starting from as many sequences as its probe
# fits in the free memory (quality.eval_batch_start), at least lm-eval's own start (EVAL_MIN_START)
# and at most EVAL_MAX_BATCH; a fixed batch on the CPU (see eval_batch). A small model's generation
# steps are bound by the host, so fewer, larger batches finish a generation task sooner: on an H200
# (2026-11-27) the demo's tasks phase on 500 SQuAD documents took 10.9 s (fp16) and 12.1 s (nf4)
# at batch 206 against 14.5 and 15.9 s at 64.
EVAL_MIN_START, EVAL_MAX_BATCH, EVAL_CPU_BATCH = 64, 256, 16


@dataclass
class RunConfig:
    models: list = field(default_factory=lambda: ["smollm2-135m"])
    # Each experiment: {'name': id in results, 'method': canonical method, 'settings': {...}}.
    experiments: list = field(default_factory=list)
    tasks: list = field(default_factory=lambda: ["coqa"])
    limit: int | None = None                 # documents per task (None: all)
    data_dir: str | None = None              # local evaluation data (../shared/data layout)
    out: str = "results"
    cache_dir: str | None = None
    device: str = "auto"                     # auto, cuda, cpu
    trust_remote_code: bool = False
    # What the baseline and every method whose recipe does not fix its dtype compute in; None: each
    # model's checkpoint dtype (config.json), as transformers' dtype="auto" loads it.
    compute_dtype: str | None = None
    # HFLM batch size for lm-eval, or "auto": on a GPU lm-eval's own detection (from what its probe
    # fits in free memory, EVAL_MIN_START to EVAL_MAX_BATCH, 0.9x on each out-of-memory), on the CPU EVAL_CPU_BATCH.
    eval_batch_size: int | str = "auto"
    max_length: int | None = None            # lm-eval context; None: min(model positions, 2048)
    max_gen_toks: int = 128                  # bound on generated tokens per lm-eval request
    ppl_window: int = 2048                   # perplexity window (capped at the model's positions)
    ppl_tokens: int | None = 16384           # corpus tokens scored for perplexity (None: all)
    kld_tokens: int | None = 8192            # corpus tokens for the divergence from the baseline (None: all; 0: off)
    kld_ctx: int = 512                       # llama.cpp's n_ctx: chunk length; its second half is scored
    prompt_lengths: list = field(default_factory=lambda: [128, 512, 2048])  # TTFT / prefill prompt lengths
    decode_prompt_tokens: int = 32
    new_tokens: int = 64                     # decode length
    batch_sizes: list = field(default_factory=lambda: [1, 8, 32])
    # eager (what users get by default), compiled, or both. Eager by default: torch.compile adds a
    # compilation for every method and batch size, which the default comparison should not pay.
    decode_mode: str = "eager"
    repeats: int = 3                         # timed TTFT runs per prompt length, after one warm-up
    # Timed decode runs per batch size, after one warm-up run; each of a run's new_tokens - 1 steps is
    # a sample (cost.py). One run of 64 tokens gives 63 samples; more runs also catch run-to-run drift.
    decode_runs: int = 1
    all_methods: bool = False
    calibration: str | None = None           # GPTQ/AWQ calibration text file (None: WikiText-2 valid / c4)
    calibration_samples: int = 128
    calibration_tokens: int = 512            # tokens per calibration sample
    suite: str | None = None                 # a preset of tasks and limit (SUITES); None: the tasks above
    backend: str = "local"                   # where experiments run: local, ray, modal (BACKEND_CHOICES)
    ray_address: str | None = None           # an existing Ray cluster (None: $RAY_ADDRESS, else a local one)
    gpu: str | None = None                   # Modal's card (None: modal_app.DEFAULT_GPU)


# Presets that answer the question fast. Perplexity and the KL divergence run in every suite (and
# without one); a suite sets the tasks and the documents per task, which --tasks and --limit
# override. Offline, CoQA (one story in ../shared/data) is replaced by its stand-in, SQuAD v1.1.
SUITES = {
    "quick": {"tasks": ["lambada_openai", "arc_easy"], "limit": 500},
    "standard": {"tasks": ["lambada_openai", "arc_easy", "piqa", "boolq", "winogrande", "coqa"], "limit": 1000,
                 "offline": {"coqa": "squad_v1"}},
}


DECODE_MODE_CHOICES = ["eager", "compiled", "both"]
COMPUTE_DTYPE_CHOICES = ["float16", "bfloat16", "float32"]
BACKEND_CHOICES = ["local", "ray", "modal"]


def prompt_lengths(config):
    """The TTFT prompt lengths of a run's config dict (a run from before the sweep had one: prompt_tokens)."""
    return config.get("prompt_lengths") or [config.get("prompt_tokens")]


def eval_batch(value, device):
    """The HFLM batch size of --eval-batch-size on this device: a number as given; "auto" is lm-eval's
    detection on a GPU (its batch_size "auto", from quality.eval_batch_start) and EVAL_CPU_BATCH on the CPU,
    where a trial batch at the full context would take the machine's memory instead of failing."""
    if value != "auto":
        return value
    return "auto" if device == "cuda" else EVAL_CPU_BATCH


def decode_modes(choice):
    """The decode modes a run measures, in order."""
    return ["eager", "compiled"] if choice == "both" else [choice]


POSITIVE_INTS = ["limit", "max_length", "max_gen_toks", "ppl_window", "ppl_tokens", "kld_ctx",
                 "decode_prompt_tokens", "new_tokens", "repeats", "decode_runs", "calibration_samples",
                 "calibration_tokens"]
# The course project's comparison: the float baseline, bitsandbytes NF4 and FP4, GPTQ and AWQ (each
# that cannot run here is skipped with its reason: AWQ needs CUDA, group 128 does not tile every model).
DEFAULT_METHODS = ["baseline", "nf4", "fp4", "gptq-w4g128", "awq-w4g128"]


def make_experiment(entry, where=""):
    """A method name, or a dict {name?, method, **settings} -> experiment dict; ConfigError if bad."""
    if isinstance(entry, str):
        entry = {"method": entry}
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
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ConfigError(f"{where}experiment name '{name}' may hold only letters, digits, '.', '_' and '-'")
    return {"name": name, "method": method, "settings": entry}


def _positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0  # True is an int to Python


def validate(config):
    """Check values a flag or file can get wrong; raise ConfigError with the fix."""
    for key in POSITIVE_INTS:
        value = getattr(config, key)
        if value is not None and not _positive_int(value):
            raise ConfigError(f"--{key.replace('_', '-')} must be a positive whole number, got {value!r}")
    if config.eval_batch_size != "auto" and not _positive_int(config.eval_batch_size):
        raise ConfigError(f"--eval-batch-size must be a positive whole number or 'auto', got {config.eval_batch_size!r}")
    for key in ("batch_sizes", "prompt_lengths"):
        values = getattr(config, key)
        if not values or not all(_positive_int(v) for v in values):
            raise ConfigError(f"--{key.replace('_', '-')} must be positive whole numbers, got {values!r}")
    if config.kld_tokens is not None and (not isinstance(config.kld_tokens, int) or isinstance(config.kld_tokens, bool)
                                          or config.kld_tokens < 0):
        raise ConfigError(f"--kld-tokens must be a whole number, 'all', or 0 to turn the divergence off, got {config.kld_tokens!r}")
    if config.kld_ctx < 4 or config.kld_ctx % 2:
        raise ConfigError(f"--kld-ctx must be an even number of at least 4, got {config.kld_ctx!r}")
    if config.kld_tokens and config.kld_tokens < config.kld_ctx:
        raise ConfigError(f"--kld-tokens {config.kld_tokens} is less than one chunk of --kld-ctx {config.kld_ctx}")
    if config.decode_mode not in DECODE_MODE_CHOICES:
        raise ConfigError(f"--decode-mode must be one of {', '.join(DECODE_MODE_CHOICES)}, got {config.decode_mode!r}")
    if config.suite is not None and config.suite not in SUITES:
        raise ConfigError(f"--suite must be one of {', '.join(SUITES)}, got {config.suite!r}")
    if config.compute_dtype is not None and config.compute_dtype not in COMPUTE_DTYPE_CHOICES:
        raise ConfigError(f"--compute-dtype must be one of {', '.join(COMPUTE_DTYPE_CHOICES)}, got {config.compute_dtype!r}")
    if config.device not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"--device must be auto, cuda or cpu, got {config.device!r}")
    if config.backend not in BACKEND_CHOICES:
        raise ConfigError(f"--backend must be one of {', '.join(BACKEND_CHOICES)}, got {config.backend!r}")
    if config.ray_address and config.backend != "ray":
        raise ConfigError("--ray-address is for --backend ray")
    if config.gpu and config.backend != "modal":
        raise ConfigError("--gpu picks Modal's card; it is for --backend modal (locally and on Ray every visible GPU is used)")
    if config.new_tokens < 2:
        raise ConfigError("--new-tokens must be at least 2 (decode speed excludes the first token)")
    names = [e["name"] for e in config.experiments]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"experiment names must be unique; repeated: {', '.join(dupes)} "
                          "(give a method table its own 'name')")
    if not config.models:
        raise ConfigError("no model given")


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
        m = re.match(r"\s*([A-Za-z_][A-Za-z0-9_-]*)\s*=", line)
        if m and m.group(1) not in keys:
            keys[m.group(1)] = i
        m = re.match(r"\s*\[\[?\s*([A-Za-z_][A-Za-z0-9_-]*)", line)
        if m and m.group(1) not in keys:
            keys[m.group(1)] = i
    return keys, {}


FILE_KEYS = {"model", "models", "methods", "experiment", "tasks", "limit", "data_dir", "out", "cache_dir",
             "device", "trust_remote_code", "compute_dtype", "eval_batch_size", "max_length", "max_gen_toks", "ppl_window",
             "ppl_tokens", "kld_tokens", "kld_ctx", "prompt_lengths", "decode_prompt_tokens", "new_tokens", "batch_sizes", "decode_mode", "repeats",
             "decode_runs", "all", "calibration", "calibration_samples", "calibration_tokens", "suite", "backend", "ray_address", "gpu"}


def load_sweep_file(path):
    """Parse and validate a YAML or TOML sweep file -> dict of RunConfig fields it sets."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
            lines, entry_lines = _toml_lines(text)
        else:
            import yaml

            data = yaml.safe_load(text)
            lines, entry_lines = _yaml_lines(text)
    except Exception as e:  # both parsers say where the syntax broke
        raise ConfigError(f"{path}: cannot parse: {str(e).splitlines()[0]} {getattr(e, 'problem_mark', '')}".strip()) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")

    def at(key):
        return f"{path}:{lines.get(key, '?')}: "

    out = {}
    for key, value in data.items():
        k = key.replace("-", "_")
        if k not in FILE_KEYS:
            raise ConfigError(f"{at(key)}unknown key '{key}'; known keys: {', '.join(sorted(FILE_KEYS))}")
        if k in ("model", "models"):
            out["models"] = [value] if isinstance(value, str) else list(value)
        elif k in ("methods", "experiment"):
            items = value if isinstance(value, list) else [value]
            out["experiments"] = [make_experiment(v, f"{path}:{entry_lines.get(i, lines.get(key, '?'))}: ")
                                  for i, v in enumerate(items)]
        elif k == "tasks":
            out["tasks"] = parse_tasks(value if isinstance(value, str) else ",".join(map(str, value)))
        elif k in ("batch_sizes", "prompt_lengths"):
            out[k] = value if isinstance(value, list) else [value]
        elif k == "all":
            out["all_methods"] = bool(value)
        elif k in ("ppl_tokens", "kld_tokens") and value == "all":
            out[k] = None  # the whole corpus
        else:
            out[k] = value
    try:
        validate(dataclasses.replace(RunConfig(), **out))
    except ConfigError as e:
        bad = next((k for k in data if str(e).startswith(f"--{k.replace('_', '-')}")), None)
        raise ConfigError(f"{at(bad) if bad else str(path) + ': '}{e}") from None
    return out


def parse_tasks(text):
    """'coqa,lambada_openai' -> ['coqa', 'lambada_openai']; 'none' -> []."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    return [] if names in ([], ["none"]) else names
