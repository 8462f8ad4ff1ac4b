"""Quantization methods: one loader function per library route, one line per named recipe.

A loader takes the path of a float checkpoint and the device, loads the model in its quantized form
and returns `(model, info)`, where `info` says what actually ran (dtypes, kernel classes, library
versions) so a slow or odd number can be explained. Adding a method is one function (if its
library is new) and one line in `METHODS`.

    >>> from quantbench.methods import METHODS, resolve_method_name
    >>> resolve_method_name("bnb_4bit_nf4")
    'nf4'
    >>> model, info = METHODS["nf4"]["load"]("/path/to/checkpoint", device="cuda")

The quantization library is imported inside the loader that needs it, so a missing library is a
clear error at the moment the method runs (and `quantbench methods` can tell ahead of time).
"""
import importlib.metadata
import importlib.util
from functools import partial

import torch


class MissingLibrary(Exception):
    """A method's library is not installed; the message names the pip command that fixes it."""


def _require(module, extra):
    if importlib.util.find_spec(module) is None:
        raise MissingLibrary(f"needs the Python package '{module}', which is not installed: "
                             f"pip install 'quantbench[{extra}]'")


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _dtype(name):
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def _linear_classes(model):
    """Names of the classes that hold the Linear layers' weights: the kernel actually used."""
    names = {type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__}
    return sorted(names)


def load_float(path, *, device, dtype="float16", trust_remote_code=False):
    """The unquantized baseline. On the CPU, float16 matmuls are slow or missing, so a float16
    request runs in float32 there, and the info says so."""
    from transformers import AutoModelForCausalLM

    used = dtype
    note = None
    if device == "cpu" and dtype == "float16":
        used = "float32"
        note = "float16 was asked for; on the CPU the baseline runs in float32"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(used), device_map=device,
                                                 trust_remote_code=trust_remote_code)
    info = {"weight_dtype": used, "compute_dtype": used, "library": "torch",
            "linear_classes": _linear_classes(model)}
    if note:
        info["note"] = note
    return model, info


def load_bnb_4bit(path, *, device, quant_type="nf4", double_quant=True, compute_dtype="float16",
                  trust_remote_code=False):
    """bitsandbytes 4-bit (NF4 or FP4), blocksize 64, as `BitsAndBytesConfig(load_in_4bit=True)`."""
    _require("bitsandbytes", "bnb")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=_dtype(compute_dtype))
    # The layers that stay unquantized (norms, embeddings, lm_head) are held in compute_dtype.
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map=device,
                                                 dtype=_dtype(compute_dtype),
                                                 trust_remote_code=trust_remote_code)
    info = {"weight_dtype": quant_type, "compute_dtype": compute_dtype, "double_quant": double_quant,
            "library": "bitsandbytes", "library_version": _version("bitsandbytes"),
            "linear_classes": _linear_classes(model)}
    return model, info


def load_bnb_int8(path, *, device, threshold=6.0, trust_remote_code=False):
    """bitsandbytes LLM.int8(): int8 weights, outlier features above `threshold` kept in fp16."""
    _require("bitsandbytes", "bnb")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map=device,
                                                 dtype=torch.float16,
                                                 trust_remote_code=trust_remote_code)
    info = {"weight_dtype": "int8", "compute_dtype": "float16", "outlier_threshold": threshold,
            "library": "bitsandbytes", "library_version": _version("bitsandbytes"),
            "linear_classes": _linear_classes(model)}
    return model, info


def _method(load, family, bits, group_size=None, calibration=False, gpu=False, extra=None,
            module=None, about=""):
    return {"load": load, "family": family, "bits": bits, "group_size": group_size,
            "calibration": calibration, "gpu": gpu, "extra": extra, "module": module, "about": about}


# bitsandbytes quantizes in blocks of 64 weights (its fixed 4-bit blocksize); the double-quant
# variants also quantize those blocks' absmax scales to 8 bits.
METHODS = {
    "fp16": _method(partial(load_float, dtype="float16"), "baseline", 16, about="unquantized float16 (float32 on the CPU)"),
    "bf16": _method(partial(load_float, dtype="bfloat16"), "baseline", 16, about="unquantized bfloat16"),
    "nf4": _method(partial(load_bnb_4bit, quant_type="nf4"), "bitsandbytes", 4, 64, extra="bnb", module="bitsandbytes", about="NF4, double quant, fp16 compute"),
    "fp4": _method(partial(load_bnb_4bit, quant_type="fp4"), "bitsandbytes", 4, 64, extra="bnb", module="bitsandbytes", about="FP4, double quant, fp16 compute"),
    "nf4-nodq": _method(partial(load_bnb_4bit, quant_type="nf4", double_quant=False), "bitsandbytes", 4, 64, extra="bnb", module="bitsandbytes", about="NF4 without double quant (ablation)"),
    "nf4-bf16": _method(partial(load_bnb_4bit, quant_type="nf4", compute_dtype="bfloat16"), "bitsandbytes", 4, 64, extra="bnb", module="bitsandbytes", about="NF4, double quant, bf16 compute (ablation)"),
    "fp4-bf16": _method(partial(load_bnb_4bit, quant_type="fp4", compute_dtype="bfloat16"), "bitsandbytes", 4, 64, extra="bnb", module="bitsandbytes", about="FP4, double quant, bf16 compute (ablation)"),
    "int8": _method(load_bnb_int8, "bitsandbytes", 8, extra="bnb", module="bitsandbytes", about="LLM.int8(), outlier threshold 6.0"),
}

# The course project's experiment names, so its configs and habits still work.
ALIASES = {
    "fp16_baseline": "fp16",
    "bf16_baseline": "bf16",
    "bnb_4bit_nf4": "nf4",
    "bnb_4bit_fp4": "fp4",
    "bnb_4bit_nf4_no_double_quant": "nf4-nodq",
    "bnb_4bit_nf4_bf16": "nf4-bf16",
    "bnb_4bit_fp4_bf16": "fp4-bf16",
    "bnb_8bit": "int8",
    "bnb_int8": "int8",
}


def resolve_method_name(name):
    """Canonical method name for a name or an original alias; ValueError listing the known ones."""
    key = name.strip()
    if key in METHODS:
        return key
    if key in ALIASES:
        return ALIASES[key]
    known = ", ".join(METHODS) + " (or the original names " + ", ".join(ALIASES) + ")"
    raise ValueError(f"unknown method '{name}'; known methods: {known}")


def method_settings(name):
    """The keyword settings a method's loader accepts, with the recipe's values."""
    import inspect

    load = METHODS[name]["load"]
    func = load.func if isinstance(load, partial) else load
    fixed = load.keywords if isinstance(load, partial) else {}
    settings = {}
    for p in inspect.signature(func).parameters.values():
        if p.kind == p.KEYWORD_ONLY and p.name not in ("device", "trust_remote_code"):
            settings[p.name] = fixed.get(p.name, p.default)
    return settings


def why_not_runnable(name, device):
    """None if the method can run here on `device`, else (reason, fix)."""
    m = METHODS[name]
    if m["module"] and importlib.util.find_spec(m["module"]) is None:
        return (f"the Python package '{m['module']}' is not installed",
                f"pip install 'quantbench[{m['extra']}]'")
    if m["gpu"] and device != "cuda":
        return ("needs a CUDA GPU and this run is on the CPU", "run it on a machine with an NVIDIA GPU")
    return None
