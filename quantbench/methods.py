"""Quantization methods: one function per library route, one line per named recipe.

Two kinds of route. Quantize-on-load (bitsandbytes, the float baselines): a `load` function takes the
float checkpoint and the device and returns `(model, info)`. Quantize-once (GPTQ, AWQ, torchao, HQQ):
a `quantize` function writes a quantized checkpoint, which the sweep caches, and a `load` function
reloads it as users do. `info` says what actually ran (dtypes, kernel classes, library versions) so
a slow or odd number can be explained. Adding a method is one function (if its library is new) and
one line in `METHODS`.

    >>> from quantbench.methods import METHODS, resolve_method_name
    >>> resolve_method_name("bnb_4bit_nf4")
    'nf4'
    >>> model, info = METHODS["nf4"]["load"]("/path/to/checkpoint", device="cuda")

The quantization library is imported inside the loader that needs it, so a missing library is a
clear error at the moment the method runs (and `quantbench methods` can tell ahead of time).
"""
import importlib.metadata
import importlib.util
import json
import shutil
from collections import Counter
from functools import partial
from pathlib import Path

import torch


class MissingLibrary(Exception):
    """A method's library is not installed; the message names the pip command that fixes it."""


class MethodUnsuitable(Exception):
    """The method cannot run on this model or card (a shape or capability it lacks); the message says why."""


def installed(module):
    """Whether `module` can be imported; for a dotted name its parents first (find_spec raises, not
    answers None, when a parent such as optimum of optimum.quanto is missing)."""
    parts = module.split(".")
    return all(importlib.util.find_spec(".".join(parts[:i])) is not None for i in range(1, len(parts) + 1))


def _require(module, extra):
    if not installed(module):
        raise MissingLibrary(f"needs the Python package '{module}', which is not installed: "
                             f"pip install 'quantbench[{extra}]'")


def library_version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _dtype(name):
    return DTYPES[name]


def checkpoint_dtype(path):
    """(dtype name, where it was read) of a float checkpoint: its config.json's `dtype` (or the older
    `torch_dtype`), else the first floating tensor of its weights, as transformers' dtype="auto" reads it."""
    config = json.loads((Path(path) / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        if config.get(key) in DTYPES:
            return config[key], f"config.json {key}"
    from safetensors import safe_open

    names = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                kind = f.get_slice(key).get_dtype()
                if kind in names:
                    return names[kind], "the weights (config.json names no dtype)"
    return "float32", "transformers' default (neither config.json nor the weights name a float dtype)"


def _auto(dtype, path):
    """A method's compute dtype: "auto" is the checkpoint's own (a run passes its resolved dtype instead)."""
    return checkpoint_dtype(path)[0] if dtype == "auto" else dtype


def _cpu_dtype(dtype, src, device):
    """A quantizer's dtype ("auto": the checkpoint's), float32 in place of float16 on the CPU, which has no
    float16 matmul; the saved checkpoint's dtype is then its reload's compute dtype."""
    dtype = _auto(dtype, src)
    return "float32" if device == "cpu" and dtype == "float16" else dtype


def _linear_classes(model):
    """Names of the classes that hold the Linear layers' weights: the kernel actually used."""
    names = {type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__}
    return sorted(names)


def unquantized_linears(model):
    """The linear layers a quantizer left in float (a plain weight), the output head aside:
    {'count', 'of', 'names' (the first 10)}."""
    head = model.get_output_embeddings()
    linears = [(n, m) for n, m in model.named_modules() if "Linear" in type(m).__name__ and m is not head]
    # compressed-tensors keeps nn.Linear: packed ('weight_packed', no 'weight') or int8/FP8 beside a scale
    plain = [n for n, m in linears if type(m) is torch.nn.Linear and type(getattr(m, "weight", None)) in (torch.Tensor, torch.nn.Parameter)
             and m.weight.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) and not hasattr(m, "weight_scale")]
    return {"count": len(plain), "of": len(linears), "names": plain[:10]}


def load_float(path, *, device, dtype="auto", trust_remote_code=False):
    """The unquantized baseline. On the CPU, float16 matmuls are slow or missing, so a float16
    request runs in float32 there, and the info says so."""
    from transformers import AutoModelForCausalLM

    used = dtype = _auto(dtype, path)
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


def load_bnb_4bit(path, *, device, quant_type="nf4", double_quant=True, compute_dtype="auto",
                  trust_remote_code=False):
    """bitsandbytes 4-bit (NF4 or FP4), blocksize 64, as `BitsAndBytesConfig(load_in_4bit=True)`."""
    _require("bitsandbytes", "bnb")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute_dtype = _auto(compute_dtype, path)

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=_dtype(compute_dtype))
    # The layers that stay unquantized (norms, embeddings, lm_head) are held in compute_dtype.
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map=device,
                                                 dtype=_dtype(compute_dtype),
                                                 trust_remote_code=trust_remote_code)
    info = {"weight_dtype": quant_type, "compute_dtype": compute_dtype, "double_quant": double_quant,
            "library": "bitsandbytes", "library_version": library_version("bitsandbytes"),
            "linear_classes": _linear_classes(model)}
    return model, info


def load_bnb_int8(path, *, device, threshold=6.0, compute_dtype="auto", trust_remote_code=False):
    """bitsandbytes LLM.int8(): int8 weights, outlier features above `threshold` kept in the compute dtype."""
    _require("bitsandbytes", "bnb")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute_dtype = _auto(compute_dtype, path)
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map=device,
                                                 dtype=_dtype(compute_dtype),
                                                 trust_remote_code=trust_remote_code)
    info = {"weight_dtype": "int8", "compute_dtype": compute_dtype, "outlier_threshold": threshold,
            "library": "bitsandbytes", "library_version": library_version("bitsandbytes"),
            "linear_classes": _linear_classes(model)}
    return model, info


def load_quanto(path, *, device, weights="int8", compute_dtype="auto", trust_remote_code=False):
    """optimum-quanto weight-only through transformers' QuantoConfig, quantized as the model loads, as its
    users run it (transformers cannot save a quanto model): int8 per output channel; int4 in quanto's
    groups along the input, 128 where it divides the layer's width, else the largest multiple of 32
    below that does (576 -> 96). The output head stays in float, as transformers leaves it."""
    _require("optimum.quanto", "quanto")
    from transformers import AutoModelForCausalLM, QuantoConfig

    compute_dtype = _cpu_dtype(compute_dtype, path, device)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=QuantoConfig(weights=weights),
                                                 dtype=_dtype(compute_dtype), device_map=device,
                                                 trust_remote_code=trust_remote_code)
    layers = [m for m in model.modules() if type(m).__name__ == "QLinear"]
    groups = Counter(str(m.weight_group_size or "per channel") for m in layers)
    info = {"weight_dtype": weights, "compute_dtype": compute_dtype, "library": "optimum-quanto",
            "library_version": library_version("optimum-quanto"), "linear_classes": _linear_classes(model),
            # the tensor class names the kernel: int4 in groups of 128 repacks for AWQ's GEMM (CUDA, float16)
            # or tinygemm (bfloat16); otherwise quanto's own ops run it
            "quanto_tensor": sorted({type(m.weight).__name__ for m in layers}),
            "group_sizes": dict(sorted(groups.items()))}
    return model, info


def _save_tokenizer(src, dst):
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(src).save_pretrained(dst)


def quantize_gptq(src, dst, *, device, calibration, bits=4, group_size=128, desc_act=True, sym=True,
                  damp_percent=0.1, dtype="auto", trust_remote_code=False):
    """GPTQ through transformers' GPTQConfig (optimum drives GPTQModel's quantizer), saved to dst."""
    _require("gptqmodel", "gptq")
    _require("optimum", "gptq")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    tokenizer = AutoTokenizer.from_pretrained(src)
    config = GPTQConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym, damp_percent=damp_percent,
                        dataset=calibration, tokenizer=tokenizer)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=config, device_map=device,
                                                 dtype=_dtype(_auto(dtype, src)), trust_remote_code=trust_remote_code)
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)


def quantize_awq(src, dst, *, device, calibration, bits=4, group_size=128, zero_point=True,
                 trust_remote_code=False):
    """AWQ through GPTQModel's AWQ quantizer (AutoAWQ is archived), GEMM format, saved to dst."""
    _require("gptqmodel", "gptq")
    from gptqmodel import AWQConfig, GPTQModel

    config = AWQConfig(bits=bits, group_size=group_size, sym=not zero_point)  # GEMM format by default
    model = GPTQModel.load(src, config, device=device, trust_remote_code=trust_remote_code)
    model.quantize(calibration)
    model.save(dst)
    _save_tokenizer(src, dst)


def _torchao_config(scheme, group_size):
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Int4WeightOnlyConfig,
                                      Int8WeightOnlyConfig, PerRow)

    if scheme == "int8wo":
        return Int8WeightOnlyConfig()
    if scheme == "int4wo":
        # tile_packed_to_4d runs on the tinygemm kernel that ships with torch; the default packing
        # needs the separate mslk kernel package.
        return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
    if scheme == "fp8":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    raise ValueError(f"unknown torchao scheme {scheme}")


def quantize_torchao(src, dst, *, device, calibration=None, scheme="int8wo", group_size=128,
                     dtype="auto", trust_remote_code=False):
    """torchao through transformers' TorchAoConfig, saved as safetensors to dst."""
    _require("torchao", "torchao")
    if scheme == "int4wo" and device != "cuda":
        raise MethodUnsuitable("torchao int4 weight-only (tile_packed_to_4d) has a CUDA kernel only")
    if scheme == "fp8" and (device != "cuda" or torch.cuda.get_device_capability() < (8, 9)):
        raise MethodUnsuitable("float8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper)")
    from transformers import AutoModelForCausalLM, TorchAoConfig

    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=TorchAoConfig(_torchao_config(scheme, group_size)),
                                                 device_map=device, dtype=_dtype(_auto(dtype, src)),
                                                 trust_remote_code=trust_remote_code)
    model.save_pretrained(dst)
    _save_tokenizer(src, dst)


def quantize_hqq(src, dst, *, device, calibration=None, bits=4, group_size=64, compute_dtype="auto",
                 trust_remote_code=False):
    """HQQ (calibration-free) through the hqq library's own Hugging Face helper, saved to dst.
    transformers 5's HqqConfig cannot load (its new loader raises 'HQQ is not available yet')."""
    _require("hqq", "hqq")
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel
    from transformers import AutoModelForCausalLM

    compute_dtype = _cpu_dtype(compute_dtype, src, device)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=_dtype(compute_dtype), trust_remote_code=trust_remote_code)
    AutoHQQHFModel.quantize_model(model, quant_config=BaseQuantizeConfig(nbits=bits, group_size=group_size),
                                  compute_dtype=_dtype(compute_dtype), device=device)
    AutoHQQHFModel.save_quantized(model, dst)
    _save_tokenizer(src, dst)
    (Path(dst) / "hqq-compute-dtype.txt").write_text(compute_dtype)


def quantize_llmc(src, dst, *, device, calibration=None, scheme="W4A16", group_size=None, smoothing_strength=0.8,
                  dtype="auto", trust_remote_code=False):
    """llm-compressor's oneshot, saved in the compressed-tensors format vLLM serves, as its examples make
    them: W4A16 is GPTQ (int4 weights in groups), W8A8 SmoothQuant then GPTQ (int8 weights per channel,
    int8 activations per token at run time), FP8_DYNAMIC round-to-nearest (FP8 weights per channel,
    activations per token at run time; no calibration). The output head stays in float, as in them."""
    _require("llmcompressor", "llmc")
    from compressed_tensors.quantization import preset_name_to_scheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import SmoothQuantModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = _cpu_dtype(dtype, src, device)
    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=_dtype(dtype), trust_remote_code=trust_remote_code)
    chosen = preset_name_to_scheme(scheme, ["Linear"])
    if group_size and chosen.weights.strategy != "group":
        raise MethodUnsuitable(f"{scheme} quantizes weights per output channel: it takes no group size")
    if group_size:
        chosen.weights.group_size = group_size  # the preset's 128 cannot tile every model (SmolLM2's 576)
    groups = {"group_0": chosen}
    if scheme == "FP8_DYNAMIC":  # round to nearest: no calibration
        recipe = [QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    elif scheme == "W8A8":  # smoothing moves activation outliers into the weights before int8
        recipe = [SmoothQuantModifier(smoothing_strength=smoothing_strength), GPTQModifier(config_groups=groups, ignore=["lm_head"])]
    else:
        recipe = [GPTQModifier(config_groups=groups, ignore=["lm_head"])]
    data = {}
    if calibration:  # the run's calibration set, each sample whole (it was cut to the same token count)
        longest = max(len(tokenizer(t).input_ids) for t in calibration)
        data = {"dataset": Dataset.from_dict({"text": calibration}), "num_calibration_samples": len(calibration),
                "max_seq_length": longest, "shuffle_calibration_samples": False}
    oneshot(model=model, tokenizer=tokenizer, recipe=recipe, **data)
    model.save_pretrained(dst, save_compressed=True)
    tokenizer.save_pretrained(dst)


def quantize_autoround(src, dst, *, device, calibration, bits=4, group_size=128, sym=True, iters=200, dtype="auto",
                       trust_remote_code=False):
    """Intel's AutoRound (SignRound: signed-gradient descent on each weight's rounding and each group's
    range, block by block, against the float block's outputs on the calibration set) with its default
    W4A16 recipe, exported in its own auto_round format, which transformers loads (AutoRoundConfig)."""
    _require("auto_round", "autoround")
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = _cpu_dtype(dtype, src, device)
    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=_dtype(dtype), trust_remote_code=trust_remote_code)
    # the run's calibration set: AutoRound drops samples shorter than seqlen, so seqlen is the shortest
    seqlen = min(len(tokenizer(t).input_ids) for t in calibration)
    rounder = AutoRound(model, tokenizer, scheme="W4A16", bits=bits, group_size=group_size, sym=sym, iters=iters,
                        dataset=list(calibration), nsamples=len(calibration), seqlen=seqlen, device_map=device)
    rounder.quantize_and_save(str(Path(dst) / "export"), format="auto_round")
    made = next(p.parent for p in (Path(dst) / "export").rglob("config.json"))  # it names a folder of its own
    for item in made.iterdir():
        shutil.move(str(item), dst)
    shutil.rmtree(Path(dst) / "export")


def load_saved(path, *, device, trust_remote_code=False, quantization_config=None):
    """A quantized checkpoint as users load it: transformers reads its quantization_config and picks
    the kernel (for GPTQ/AWQ, GPTQModel's best backend for this card). `quantization_config` only
    overrides loading attributes such as GPTQ's backend."""
    from transformers import AutoModelForCausalLM

    extra = {"quantization_config": quantization_config} if quantization_config is not None else {}
    model = AutoModelForCausalLM.from_pretrained(path, device_map=device, trust_remote_code=trust_remote_code, **extra)
    qc = getattr(model.config, "quantization_config", None)
    qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc or {})
    method = qc.get("quant_method")
    info = {"library": str(getattr(method, "value", method)), "linear_classes": _linear_classes(model),
            "compute_dtype": str(model.dtype).replace("torch.", "")}
    # 'QuantLinear' names gptqmodel's and auto-round's layers alike: the module says which kernel it is
    kernels = sorted({type(m).__module__ for m in model.modules()
                      if "Linear" in type(m).__name__ and not type(m).__module__.startswith("torch.")})
    if kernels:
        info["linear_modules"] = kernels
    for key in ["bits", "group_size", "desc_act", "sym", "zero_point", "backend", "format", "checkpoint_format",
                "packing_format", "iters"]:
        if key in qc:
            info[key] = qc[key]
    if info["library"] == "compressed-tensors":
        info.update(_compressed_tensors_info(qc))
        with torch.no_grad():  # its first forward dequantizes the weights: count and time those that run
            model(torch.zeros(1, 1, dtype=torch.long, device=model.device))
    if info["library"] == "torchao":
        w = next(m.weight for m in model.modules() if type(m).__name__ == "Linear" and
                 hasattr(m.weight, "__tensor_flatten__"))
        info["torchao_tensor"] = type(w).__name__  # names the packing too: Int4TilePackedTo4dTensor
    for dist in ["gptqmodel", "optimum", "torchao", "compressed-tensors", "auto-round"]:
        version = library_version(dist)
        if version:
            info[f"{dist}_version"] = version
    return model, info


def _compressed_tensors_info(qc):
    """A compressed-tensors checkpoint's schemes in short ('int4 group 64' weights, 'int8 token dynamic'
    activations) and how transformers runs them."""
    def short(args):
        return args and " ".join([f"{args['type']}{args['num_bits']}", args["strategy"], str(args.get("group_size") or ""),
                                  "dynamic" if args.get("dynamic") else ""]).replace("  ", " ").strip()

    groups = qc.get("config_groups", {})
    # transformers keeps the packed weights until the first forward, then holds them dequantized, and
    # quantizes activations in the forward itself: no int4, int8 or FP8 matmul (vLLM has those).
    execution = "weights dequantized to the compute dtype by the first forward (at load)" + (
        "; activations quantized and dequantized in each forward" if any(g.get("input_activations") for g in groups.values()) else "")
    return {"schemes": {name: {"weights": short(g.get("weights")), "input_activations": short(g.get("input_activations"))}
                        for name, g in groups.items()},
            "ignore": qc.get("ignore"), "execution": execution}


# GPTQModel backends to try, in order, when its automatic choice cannot hold a layer's shape.
GPTQ_FALLBACK_BACKENDS = ["gptq_triton", "gptq_torch"]


def load_gptq(path, *, device, trust_remote_code=False):
    """A GPTQ checkpoint as users load it: GPTQModel's automatic kernel choice first. GPTQModel 7.6
    can pick Marlin for act-order weights whose width Marlin's tiles do not fit (SmolLM2's 576) and
    then fail building the layer; then the next backend is tried and the fallback recorded."""
    from transformers import GPTQConfig

    try:
        return load_saved(path, device=device, trust_remote_code=trust_remote_code)
    except NotImplementedError as e:
        first_error = f"{type(e).__name__}: {e}"
    bits = json.loads((Path(path) / "config.json").read_text())["quantization_config"]["bits"]
    for backend in GPTQ_FALLBACK_BACKENDS:
        try:
            model, info = load_saved(path, device=device, trust_remote_code=trust_remote_code,
                                     quantization_config=GPTQConfig(bits=bits, backend=backend))
        except NotImplementedError:
            continue
        info["backend_fallback"] = {"backend": backend, "because": first_error}
        return model, info
    raise NotImplementedError(f"no GPTQModel backend could load {path}: {first_error}")


def load_hqq(path, *, device, trust_remote_code=False):
    from hqq.models.hf.base import AutoHQQHFModel

    recorded = Path(path) / "hqq-compute-dtype.txt"  # quantbench's; hqq's own save names no compute dtype
    compute_dtype = recorded.read_text().strip() if recorded.exists() else "float16" if device == "cuda" else "float32"
    model = AutoHQQHFModel.from_quantized(str(path), device=device, compute_dtype=_dtype(compute_dtype))
    layer = next(m for m in model.modules() if type(m).__name__ == "HQQLinear")
    return model, {"library": "hqq", "library_version": library_version("hqq"), "compute_dtype": compute_dtype,
                   "linear_classes": _linear_classes(model), "hqq_backend": str(layer.backend),
                   "bits": layer.meta.get("nbits"), "group_size": layer.meta.get("group_size")}


def quantize_gguf(src, dst, *, device, calibration=None, kind="q4_k_m", imatrix=False, trust_remote_code=False):
    """A GGUF of type `kind` made by llama.cpp's own tools (gguf_files): the float checkpoint converted
    once by convert_hf_to_gguf.py (bf16 for a bf16 model, else f16), then quantized, with llama-imatrix's
    importance matrix of the calibration set when `imatrix`; "float" is the converted file itself.
    What they did is written beside it (gguf.json)."""
    _require("llama_cpp", "gguf")
    from quantbench import gguf_files

    outtype = "bf16" if checkpoint_dtype(src)[0] == "bfloat16" else "f16"
    try:
        float_file = gguf_files.float_gguf(src, outtype=outtype)
        if kind == "float":
            gguf_files.place(float_file, Path(dst) / "model.gguf")
            info = {"type": outtype, "tensor_types": {}, "matrices": None, "unquantized": None, "unquantized_names": []}
        else:
            matrix = gguf_files.importance_matrix(float_file, calibration, Path(dst) / "imatrix.gguf") if imatrix else None
            info = gguf_files.quantize(float_file, Path(dst) / "model.gguf", kind,
                                       imatrix=Path(dst) / "imatrix.gguf" if imatrix else None)
            info["imatrix"] = matrix
    except gguf_files.Unsuitable as e:
        raise MethodUnsuitable(str(e)) from None
    (Path(dst) / "gguf.json").write_text(json.dumps({**info, "llama_cpp_python": gguf_files.version(),
                                                     "converted_from": outtype}))
    _save_tokenizer(src, dst)


def load_gguf(path, *, device, trust_remote_code=False):
    """(the GGUF file, what made it): llama.cpp opens it itself (engines/llamacpp.py)."""
    _require("llama_cpp", "gguf")
    made = json.loads((Path(path) / "gguf.json").read_text())
    return Path(path) / "model.gguf", _gguf_info(made, made["llama_cpp_python"])


def _gguf_info(made, version):
    """What a GGUF holds (gguf.json's or gguf_files.describe's keys), as an experiment's backend records it."""
    return {"library": "llama.cpp", "library_version": version, "gguf_type": made["type"], "tensor_types": made["tensor_types"],
            "unquantized_linears": {"count": made["unquantized"], "of": made["matrices"], "names": made["unquantized_names"]},
            "compute_dtype": "float32", "linear_classes": [f"GGUF {made['type']}"]}


# What a quantization keeps: a checkpoint that differs from the run's model in one of these is another model's.
SAME_MODEL_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads")


def other_model(base, given, *, what):
    """Why the checkpoint whose config is `given` is not a quantization of the model whose config is
    `base` (a shape or vocabulary that differs), or None."""
    for key in SAME_MODEL_KEYS:
        if key in base and key in given and base[key] != given[key]:
            return f"{what} is a checkpoint of another model: its {key} is {given[key]}, the run's model's is {base[key]}"
    return None


def checkpoint_folder(source):
    """The folder of a checkpoint given by its path or hub id (fetched once into the hub's cache)."""
    from quantbench.models import ModelError, download_from_hub

    local = Path(source).expanduser()
    if local.is_dir():
        return local
    if local.exists() or source.startswith((".", "/", "~")):
        raise ModelError(f"no checkpoint folder {source}")
    return download_from_hub(source)


def load_checkpoint(path, *, device, source=None, trust_remote_code=False):
    """A checkpoint someone quantized (a folder or hub id given in --methods), loaded as its format says:
    GPTQ, AWQ, compressed-tensors, bitsandbytes or torchao through transformers (its config.json's
    quantization_config), hqq's own save (qmodel.pt) through hqq. `path` is the run's model: a checkpoint
    of another model (its shapes or its tokenizer's vocabulary differ) is refused."""
    from transformers import AutoTokenizer

    folder = checkpoint_folder(source)
    given = json.loads((folder / "config.json").read_text())
    problem = other_model(json.loads((Path(path) / "config.json").read_text()), given, what=source)
    if problem is None and list(folder.glob("tokenizer*")):
        theirs = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code).get_vocab()
        ours = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code).get_vocab()
        differ = len(set(theirs.items()) ^ set(ours.items()))
        problem = differ and f"{source} is a checkpoint of another model: its tokenizer's vocabulary differs from the run's model's in {differ} entries"
    if problem:
        raise MethodUnsuitable(problem)
    if (folder / "qmodel.pt").exists():
        model, info = load_hqq(folder, device=device)
    else:
        method = (given.get("quantization_config") or {}).get("quant_method")
        if method is None:
            raise MethodUnsuitable(f"{source} has no quantization_config in its config.json: it is a float checkpoint; "
                                   "pass it to --model")
        model, info = (load_gptq if method == "gptq" else load_saved)(str(folder), device=device,
                                                                      trust_remote_code=trust_remote_code)
    return model, {**info, "checkpoint": str(folder)}


def load_gguf_file(path, *, device, source=None, trust_remote_code=False):
    """(a GGUF file someone made, given in --methods; what its own metadata says it holds). `path` is the
    run's model: a GGUF of another model (its layers, width or vocabulary differ) is refused."""
    _require("llama_cpp", "gguf")
    from quantbench import gguf_files

    file = Path(source).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"no GGUF file {source}")
    made = gguf_files.describe(file)
    problem = other_model(json.loads((Path(path) / "config.json").read_text()), made["config"], what=source)
    if problem:
        raise MethodUnsuitable(problem)
    return file, {**_gguf_info(made, gguf_files.version()), "checkpoint": str(file), "bits": made["bits"]}


def _method(load, family, bits, group_size=None, calibration=False, gpu=False, extra=None,
            modules=(), about="", quantize=None, engine="transformers"):
    return {"load": load, "quantize": quantize, "family": family, "bits": bits, "group_size": group_size,
            "calibration": calibration, "gpu": gpu, "extra": extra, "modules": modules, "about": about,
            "engine": engine}


def _gguf(kind, bits, about, imatrix=False):
    return _method(load_gguf, "gguf", bits, calibration=imatrix, extra="gguf", modules=("llama_cpp",), about=about,
                   quantize=partial(quantize_gguf, kind=kind, imatrix=imatrix), engine="llama.cpp")


BNB = ("bitsandbytes",)
GPTQ = ("gptqmodel", "optimum")
LLMC = ("llmcompressor", "compressed_tensors")
QUANTO = ("optimum.quanto",)
# bitsandbytes quantizes in blocks of 64 weights (its fixed 4-bit blocksize); the double-quant
# variants also quantize those blocks' absmax scales to 8 bits. Methods with `quantize` are
# quantized once into the cache and measured after a reload, as deployed. A dtype of "auto" is the
# run's compute dtype: the checkpoint's own unless --compute-dtype says otherwise (experiment.py).
METHODS = {
    "baseline": _method(load_float, "baseline", 16, about="unquantized, in the checkpoint's own dtype: fp16, bf16 or fp32 (--compute-dtype overrides)"),
    "fp16": _method(partial(load_float, dtype="float16"), "baseline", 16, about="unquantized float16 (float32 on the CPU)"),
    "bf16": _method(partial(load_float, dtype="bfloat16"), "baseline", 16, about="unquantized bfloat16"),
    "fp32": _method(partial(load_float, dtype="float32"), "baseline", 32, about="unquantized float32"),
    "nf4": _method(partial(load_bnb_4bit, quant_type="nf4"), "bitsandbytes", 4, 64, extra="bnb", modules=BNB, about="NF4, double quant, compute in the run's dtype"),
    "fp4": _method(partial(load_bnb_4bit, quant_type="fp4"), "bitsandbytes", 4, 64, extra="bnb", modules=BNB, about="FP4, double quant, compute in the run's dtype"),
    "nf4-nodq": _method(partial(load_bnb_4bit, quant_type="nf4", double_quant=False), "bitsandbytes", 4, 64, extra="bnb", modules=BNB, about="NF4 without double quant (ablation)"),
    "nf4-bf16": _method(partial(load_bnb_4bit, quant_type="nf4", compute_dtype="bfloat16"), "bitsandbytes", 4, 64, extra="bnb", modules=BNB, about="NF4, double quant, bf16 compute (ablation)"),
    "fp4-bf16": _method(partial(load_bnb_4bit, quant_type="fp4", compute_dtype="bfloat16"), "bitsandbytes", 4, 64, extra="bnb", modules=BNB, about="FP4, double quant, bf16 compute (ablation)"),
    "int8": _method(load_bnb_int8, "bitsandbytes", 8, extra="bnb", modules=BNB, about="LLM.int8(), outlier threshold 6.0"),
    "gptq-w4g128": _method(load_gptq, "gptq", 4, 128, calibration=True, extra="gptq", modules=GPTQ, about="GPTQ 4-bit, act-order, symmetric, damp 0.1", quantize=partial(quantize_gptq, bits=4, group_size=128)),
    "gptq-w4g32": _method(load_gptq, "gptq", 4, 32, calibration=True, extra="gptq", modules=GPTQ, about="GPTQ 4-bit, group 32, act-order", quantize=partial(quantize_gptq, bits=4, group_size=32)),
    "gptq-w3g128": _method(load_gptq, "gptq", 3, 128, calibration=True, extra="gptq", modules=GPTQ, about="GPTQ 3-bit, group 128 (GPTQModel's torch kernel)", quantize=partial(quantize_gptq, bits=3, group_size=128)),
    "awq-w4g128": _method(load_saved, "awq", 4, 128, calibration=True, gpu=True, extra="gptq", modules=("gptqmodel",), about="AWQ 4-bit, zero point, GEMM format (GPTQModel; its AWQ quantizer needs CUDA)", quantize=partial(quantize_awq, bits=4, group_size=128)),
    "torchao-int8wo": _method(load_saved, "torchao", 8, None, extra="torchao", modules=("torchao",), about="int8 weight-only, per row", quantize=partial(quantize_torchao, scheme="int8wo")),
    # bfloat16 always: the tinygemm kernel behind this packing takes bfloat16 only.
    "torchao-int4wo": _method(load_saved, "torchao", 4, 128, gpu=True, extra="torchao", modules=("torchao",), about="int4 weight-only, tile_packed_to_4d (tinygemm), bf16 compute", quantize=partial(quantize_torchao, scheme="int4wo", dtype="bfloat16")),
    # bfloat16 always: torchao 0.18 quantizes float8 per row from bfloat16 weights only (it asserts so).
    "torchao-fp8": _method(load_saved, "torchao", 8, None, gpu=True, extra="torchao", modules=("torchao",), about="float8 dynamic activation + weight, per row, bf16 compute; CC >= 8.9", quantize=partial(quantize_torchao, scheme="fp8", dtype="bfloat16")),
    "llmc-w4a16": _method(load_saved, "llm-compressor", 4, 128, calibration=True, extra="llmc", modules=LLMC, about="llm-compressor GPTQ: int4 weights, group 128, float activations (W4A16), compressed-tensors", quantize=partial(quantize_llmc, scheme="W4A16", group_size=128)),
    "llmc-w8a8": _method(load_saved, "llm-compressor", 8, calibration=True, extra="llmc", modules=LLMC, about="llm-compressor SmoothQuant 0.8 then GPTQ: int8 weights per channel, int8 activations per token (W8A8)", quantize=partial(quantize_llmc, scheme="W8A8")),
    "llmc-fp8": _method(load_saved, "llm-compressor", 8, extra="llmc", modules=LLMC, about="llm-compressor FP8 weights per channel, FP8 activations per token, no calibration (FP8_DYNAMIC)", quantize=partial(quantize_llmc, scheme="FP8_DYNAMIC")),
    "autoround-w4g128": _method(load_saved, "autoround", 4, 128, calibration=True, extra="autoround", modules=("auto_round",), about="AutoRound (SignRound) int4, group 128, symmetric, 200 iterations, auto_round format", quantize=quantize_autoround),
    "quanto-int8": _method(partial(load_quanto, weights="int8"), "quanto", 8, extra="quanto", modules=QUANTO, about="optimum-quanto int8 weights per output channel, quantized at load (QuantoConfig)"),
    # group_size None: quanto picks each layer's (128, else 96, 64 or 32), recorded per run
    "quanto-int4": _method(partial(load_quanto, weights="int4"), "quanto", 4, extra="quanto", modules=QUANTO, about="optimum-quanto int4 weights in groups of 128 (or the largest of 96, 64, 32 that divides a layer), quantized at load"),
    "hqq-w4g64": _method(load_hqq, "hqq", 4, 64, extra="hqq", modules=("hqq",), about="HQQ 4-bit, group 64, no calibration", quantize=partial(quantize_hqq, bits=4, group_size=64)),
    # llama.cpp's GGUF types, made by its own converter and quantizer and run by llama.cpp itself.
    "gguf-f16": _gguf("float", 16, "the float GGUF llama.cpp's converter makes (bf16 for a bf16 model)"),
    "gguf-q8_0": _gguf("q8_0", 8, "8-bit, blocks of 32"),
    "gguf-q6_k": _gguf("q6_k", 6, "6-bit k-quant, super-blocks of 256"),
    "gguf-q5_k_m": _gguf("q5_k_m", 5, "5-bit k-quant, a few tensors at 6-bit (_M)"),
    "gguf-q4_k_m": _gguf("q4_k_m", 4, "4-bit k-quant, a few tensors at 6-bit (_M)"),
    "gguf-q4_0": _gguf("q4_0", 4, "4-bit, blocks of 32, one scale each"),
    "gguf-iq4_xs": _gguf("iq4_xs", 4, "4.25-bit non-linear (i-quant)"),
    "gguf-q3_k_m": _gguf("q3_k_m", 3, "3-bit k-quant, a few tensors higher (_M)"),
    "gguf-q2_k": _gguf("q2_k", 2, "2-bit k-quant"),
    "gguf-q4_k_m-imat": _gguf("q4_k_m", 4, "Q4_K_M with llama.cpp's importance matrix of the calibration set", imatrix=True),
    "gguf-iq4_xs-imat": _gguf("iq4_xs", 4, "IQ4_XS with llama.cpp's importance matrix of the calibration set", imatrix=True),
    # Checkpoints someone else quantized, named in --methods by their path or hub id (external_method).
    "checkpoint": _method(load_checkpoint, "checkpoint", None, about="a quantized checkpoint given by its folder or hub id: GPTQ, AWQ, compressed-tensors, bitsandbytes, torchao or hqq, loaded as its format says"),
    "gguf-file": _method(load_gguf_file, "checkpoint", None, extra="gguf", modules=("llama_cpp",), engine="llama.cpp", about="a GGUF file (or a folder holding one) given by its path, run in llama.cpp"),
}

# The methods whose saved checkpoint vLLM serves (--engines vllm measures each again there): the float
# checkpoint itself, and the formats vLLM has kernels for. bitsandbytes, quanto and HQQ quantize as they
# load or save in their own library's format; GGUF files run in llama.cpp.
VLLM_FAMILIES = ("baseline", "gptq", "awq", "torchao", "llm-compressor", "autoround", "checkpoint")


def vllm_serves(name):
    return METHODS[name]["engine"] == "transformers" and METHODS[name]["family"] in VLLM_FAMILIES


def engine_of(exp):
    """The engine an experiment runs in: its own where it has one (`<name>@vllm`), else its method's."""
    return exp.get("engine") or METHODS[exp["method"]]["engine"]


# Methods whose results are the reference: deltas and the KL divergence are measured against a
# model's first experiment with one of these. `baseline` becomes one of them per model (BASELINE_OF).
BASELINE_METHODS = ("fp16", "bf16", "fp32")
BASELINE_OF = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}

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
    "gptq_4bit_g128": "gptq-w4g128",
    "gptq_4bit_g32": "gptq-w4g32",
    "gptq_3bit_g128": "gptq-w3g128",
    "awq_4bit_g128": "awq-w4g128",
}


def resolve_method_name(name):
    """Canonical method name for a name or an original alias; ValueError listing the known ones."""
    key = name.strip()
    if key in METHODS:
        return key
    if key in ALIASES:
        return ALIASES[key]
    known = (", ".join(METHODS) + " (or the original names " + ", ".join(ALIASES) + "); or a quantized checkpoint's "
             "folder, GGUF file or hub id (org/name)")
    raise ValueError(f"unknown method '{name}'; known methods: {known}")


def external_method(text):
    """(method, experiment name, source) of a checkpoint named in --methods by its path (an existing one, or
    one starting with '.', '/' or '~') or hub id (org/name), else None. A .gguf file, or a folder of one GGUF
    and no config.json, runs in llama.cpp (gguf-file); any other folder or a hub id in transformers
    (checkpoint). Named by its folder, a file by its own name; ValueError for a path that is not there."""
    path = Path(text).expanduser()
    if not path.exists():
        if text.startswith((".", "/", "~")) or text.count("/") > 1 or text.endswith(".gguf"):
            raise ValueError(f"no checkpoint folder or GGUF file {text}")
        if text.count("/") != 1:
            return None
        return "checkpoint", _safe_name(text.split("/")[-1]), text  # a hub id
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() and not (path / "config.json").exists() else []
    if len(ggufs) > 1:
        raise ValueError(f"{text} holds {len(ggufs)} GGUF files; name one of them: " + ", ".join(g.name for g in ggufs))
    if path.suffix == ".gguf" or ggufs:
        return "gguf-file", _safe_name(path.stem if path.is_file() else path.name), str((ggufs or [path])[0].resolve())
    return "checkpoint", _safe_name(path.resolve().name), str(path.resolve())


def _safe_name(name):
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name)


def method_settings(name):
    """The keyword settings a method's loader accepts, with the recipe's values."""
    import inspect

    load = METHODS[name]["quantize"] or METHODS[name]["load"]
    func = load.func if isinstance(load, partial) else load
    fixed = load.keywords if isinstance(load, partial) else {}
    settings = {}
    for p in inspect.signature(func).parameters.values():
        if p.kind == p.KEYWORD_ONLY and p.name not in ("device", "trust_remote_code", "calibration"):
            settings[p.name] = fixed.get(p.name, p.default)
    return settings


def dtype_setting(name):
    """The setting that holds a method's compute dtype ('compute_dtype' or 'dtype'), or None."""
    return next((k for k in ("compute_dtype", "dtype") if k in method_settings(name)), None)


def bfloat16_variants(name):
    """The methods that are `name` with bfloat16 compute (nf4 -> nf4-bf16, fp16 -> bf16)."""
    key, mine = dtype_setting(name), method_settings(name)
    return [n for n in METHODS if key and n != name and METHODS[n]["family"] == METHODS[name]["family"]
            and method_settings(n) == {**mine, key: "bfloat16"}]


def group_size_problem(model_path, method, group_size):
    """Why `method`'s groups cannot tile the model's layers (GPTQ/AWQ/HQQ need a group size that
    divides each layer's input width), or None."""
    if not group_size:
        return None
    config = json.loads((Path(model_path) / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size"):
        width = config.get(key)
        if isinstance(width, int) and width % group_size:
            return (f"group size {group_size} does not divide the model's {key} {width}, so "
                    f"{method} cannot quantize its layers; use a group size that divides {width}")
    return None


def why_not_runnable(name, device, libraries=True):
    """None if the method can run here on `device`, else (reason, fix). libraries=False: the
    experiments run elsewhere (Ray, Modal), which find a missing library themselves."""
    m = METHODS[name]
    missing = [mod for mod in m["modules"] if not installed(mod)] if libraries else []
    if missing:
        return (f"the Python package{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                f"{'are' if len(missing) > 1 else 'is'} not installed", f"pip install 'quantbench[{m['extra']}]'")
    if m["gpu"] and device != "cuda":
        return ("needs a CUDA GPU and this run is on the CPU", "run it on a machine with an NVIDIA GPU")
    return None
