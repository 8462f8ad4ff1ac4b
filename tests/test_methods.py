import importlib.util

import pytest
import torch

from quantbench import methods


def test_original_names_resolve():
    assert methods.resolve_method_name("fp16_baseline") == "fp16"
    assert methods.resolve_method_name("bnb_4bit_nf4") == "nf4"
    assert methods.resolve_method_name("bnb_4bit_fp4") == "fp4"
    assert methods.resolve_method_name("bnb_8bit") == "int8"
    assert methods.resolve_method_name("nf4-nodq") == "nf4-nodq"


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError) as e:
        methods.resolve_method_name("gptq-w5")
    assert "unknown method 'gptq-w5'" in str(e.value) and "nf4" in str(e.value) and "bnb_8bit" in str(e.value)


def test_every_method_has_its_table_fields_and_settings():
    for name, m in methods.METHODS.items():
        # a checkpoint someone else made says its bits when it is loaded
        bits = (None,) if m["family"] == "checkpoint" else (2, 3, 4, 5, 6, 8, 16, 32)
        assert callable(m["load"]) and m["family"] and m["bits"] in bits, name
        assert isinstance(methods.method_settings(name), dict)
    assert methods.method_settings("nf4") == {"quant_type": "nf4", "double_quant": True, "compute_dtype": "auto"}
    assert methods.method_settings("nf4-nodq")["double_quant"] is False


def test_missing_library_is_reported_with_the_fix(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    reason, fix = methods.why_not_runnable("nf4", "cpu")
    assert "bitsandbytes" in reason and fix == "pip install 'quantbench[bnb]'"
    with pytest.raises(methods.MissingLibrary, match=r"quantbench\[bnb\]"):
        methods.load_bnb_4bit("/nonexistent", device="cpu")
    assert methods.why_not_runnable("fp16", "cpu") is None


def test_gpu_only_method_is_not_runnable_on_cpu(monkeypatch):
    monkeypatch.setitem(methods.METHODS, "gpu-thing", {**methods.METHODS["fp16"], "gpu": True})
    reason, fix = methods.why_not_runnable("gpu-thing", "cpu")
    assert "CUDA GPU" in reason


def test_fp16_on_cpu_runs_in_float32_and_says_so(tiny_model_dir):
    model, info = methods.METHODS["fp16"]["load"](tiny_model_dir, device="cpu")
    assert next(model.parameters()).dtype == torch.float32
    assert info["weight_dtype"] == "float32" and "float32" in info["note"]


def test_nf4_is_really_stored_in_4_bits(tiny_model_dir):
    import bitsandbytes as bnb

    model, info = methods.METHODS["nf4"]["load"](tiny_model_dir, device="cpu")
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    w = layer.weight
    assert w.dtype == torch.uint8 and w.numel() * 2 == 64 * 128  # two 4-bit values per byte
    assert w.quant_state.quant_type == "nf4" and w.quant_state.nested  # double quant on
    assert info["library"] == "bitsandbytes" and "Linear4bit" in info["linear_classes"]


def test_fp4_without_double_quant_and_bf16_compute(tiny_model_dir):
    model, info = methods.load_bnb_4bit(tiny_model_dir, device="cpu", quant_type="fp4", double_quant=False,
                                        compute_dtype="bfloat16")
    qs = model.model.layers[0].self_attn.q_proj.weight.quant_state
    assert qs.quant_type == "fp4" and not qs.nested
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == torch.bfloat16
    assert info["compute_dtype"] == "bfloat16" and info["double_quant"] is False


def test_int8_is_really_stored_in_8_bits(tiny_model_dir):
    import bitsandbytes as bnb

    model, info = methods.METHODS["int8"]["load"](tiny_model_dir, device="cpu")
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt)
    assert layer.weight.dtype == torch.int8 and layer.weight.SCB is not None
    ids = torch.tensor([[1, 5, 9, 20]])
    assert torch.isfinite(model(ids).logits).all()


def _logits(model, ids=torch.tensor([[1, 5, 9, 20, 33, 40, 41, 57]])):
    with torch.no_grad():
        return model(ids.to(model.device)).logits.float()


def _close_but_not_equal(quantized, baseline, tolerance=0.25):
    """Quantized logits differ from the float ones, by a relative L2 error under `tolerance`."""
    error = ((quantized - baseline).norm() / baseline.norm()).item()
    assert 0 < error < tolerance, error


def test_torchao_int8_weight_only_is_stored_in_int8_and_reloads(tiny_model_dir, tmp_path):
    base = _logits(methods.METHODS["fp16"]["load"](tiny_model_dir, device="cpu")[0])
    methods.METHODS["torchao-int8wo"]["quantize"](str(tiny_model_dir), str(tmp_path), device="cpu")
    model, info = methods.load_saved(str(tmp_path), device="cpu")
    w = model.model.layers[0].mlp.up_proj.weight
    assert type(w).__name__ == "Int8Tensor" and w.qdata.dtype == torch.int8 and w.qdata.shape == (128, 64)
    assert info["library"] == "torchao" and info["torchao_tensor"] == "Int8Tensor"
    _close_but_not_equal(_logits(model), base)


def test_hqq_is_stored_in_4_bits_and_reloads(tiny_model_dir, tmp_path):
    base = _logits(methods.METHODS["fp16"]["load"](tiny_model_dir, device="cpu")[0])
    methods.METHODS["hqq-w4g64"]["quantize"](str(tiny_model_dir), str(tmp_path), device="cpu")
    model, info = methods.load_hqq(str(tmp_path), device="cpu")
    layer = model.model.layers[0].mlp.up_proj
    assert type(layer).__name__ == "HQQLinear"
    assert layer.W_q.dtype == torch.uint8 and layer.W_q.numel() == 64 * 128 // 2  # two 4-bit codes a byte
    assert layer.meta["nbits"] == 4 and layer.meta["group_size"] == 64
    assert info["library"] == "hqq" and info["compute_dtype"] == "float32"  # float16 has no CPU matmul
    _close_but_not_equal(_logits(model), base)


def test_quanto_weights_lie_on_their_grids_and_run_weight_only(tiny_wide_model_dir):
    """optimum-quanto through transformers' QuantoConfig, checked against a recomputation from the float
    weights: int8 is round(w / (absmax / 127)) per output channel; int4 has at most 16 levels in each
    group of 128 inputs, spaced to span the group's range. The float model holding the dequantized
    weights gives the same logits: nothing but the weights is quantized."""
    if methods.why_not_runnable("quanto-int8", "cpu"):
        pytest.skip(str(methods.why_not_runnable("quanto-int8", "cpu")))
    from quantbench.engines.transformers import weight_bytes

    float_model = methods.METHODS["fp16"]["load"](tiny_wide_model_dir, device="cpu")[0]
    w = float_model.model.layers[0].mlp.up_proj.weight.detach().double()  # out 512, in 256
    sizes = {}
    for name in ["quanto-int8", "quanto-int4"]:
        model, info = methods.METHODS[name]["load"](tiny_wide_model_dir, device="cpu")
        assert info["library"] == "optimum-quanto" and info["compute_dtype"] == "float32"
        assert "QLinear" in info["linear_classes"] and methods.unquantized_linears(model)["count"] == 0
        assert type(model.lm_head) is torch.nn.Linear  # the head stays in float
        q = model.model.layers[0].mlp.up_proj.weight
        deq = q.dequantize().double()
        if name == "quanto-int8":
            assert info["quanto_tensor"] == ["WeightQBytesTensor"] and info["group_sizes"] == {"per channel": 14}
            assert q._data.dtype == torch.int8
            codes = torch.round(w / (w.abs().amax(dim=1, keepdim=True) / 127))
            assert (q._data.double() - codes).abs().max() <= 1 and (q._data.double() == codes).double().mean() > 0.999
        else:
            assert info["quanto_tensor"] == ["WeightQBitsTensor"] and info["group_sizes"] == {"128": 14}
            groups, dgroups = w.reshape(-1, 128), deq.reshape(-1, 128)
            step = (groups.amax(dim=1) - groups.amin(dim=1)) / 15
            assert ((dgroups - groups).abs() <= step[:, None] * 0.51 + 1e-6).all()
            assert max(len(torch.unique(g)) for g in dgroups) <= 16
        same = methods.METHODS["fp16"]["load"](tiny_wide_model_dir, device="cpu")[0]
        with torch.no_grad():
            for m, f in zip(model.modules(), same.modules()):
                if type(m).__name__ == "QLinear":
                    f.weight.copy_(m.weight.dequantize())
        assert torch.allclose(_logits(model), _logits(same), atol=1e-4)
        _close_but_not_equal(_logits(model), _logits(float_model))
        sizes[name] = weight_bytes(model)["weight_bytes"]
        linear = sum(m.weight.numel() for m in model.modules() if type(m).__name__ == "QLinear")
    # float32 4 bytes a weight, int8 one (and a scale a row), int4 two a byte (and a scale and shift a group)
    assert 2.9 * linear < weight_bytes(float_model)["weight_bytes"] - sizes["quanto-int8"] < 3 * linear
    assert 0.4 * linear < sizes["quanto-int8"] - sizes["quanto-int4"] < 0.5 * linear


def test_gpu_only_torchao_schemes_say_why_on_cpu(tiny_model_dir, tmp_path):
    with pytest.raises(methods.MethodUnsuitable, match="CUDA"):
        methods.METHODS["torchao-int4wo"]["quantize"](str(tiny_model_dir), str(tmp_path), device="cpu")
    with pytest.raises(methods.MethodUnsuitable, match="8.9"):
        methods.METHODS["torchao-fp8"]["quantize"](str(tiny_model_dir), str(tmp_path), device="cpu")


def test_quantized_method_table_fields():
    m = methods.METHODS["gptq-w4g128"]
    assert m["calibration"] and not m["gpu"] and m["group_size"] == 128 and m["extra"] == "gptq"
    assert methods.METHODS["awq-w4g128"]["gpu"]  # GPTQModel 7.6: "AWQ: CUDA is not available" on the CPU
    assert methods.method_settings("gptq-w3g128") == {"bits": 3, "group_size": 128, "desc_act": True, "sym": True,
                                                      "damp_percent": 0.1, "dtype": "auto"}
    assert methods.resolve_method_name("awq_4bit_g128") == "awq-w4g128"
    assert not methods.METHODS["hqq-w4g64"]["calibration"] and not methods.METHODS["hqq-w4g64"]["gpu"]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gptq-w4g128", "gptq-w4g32", "gptq-w3g128", "awq-w4g128", "torchao-int8wo",
                                  "torchao-int4wo", "torchao-fp8", "hqq-w4g64"])
def test_gpu_methods_quantize_and_reload(name, tiny_wide_model_dir, tmp_path, shared_data):
    """On the GPU machine: each method really quantizes the tiny model and the reload runs."""
    from transformers import AutoTokenizer

    from quantbench import tasks

    if methods.why_not_runnable(name, "cuda"):
        pytest.skip(str(methods.why_not_runnable(name, "cuda")))
    texts, _ = tasks.calibration_texts(AutoTokenizer.from_pretrained(tiny_wide_model_dir), source=None,
                                       data_dir=shared_data, hub=False, n_samples=8, seq_len=64)
    methods.METHODS[name]["quantize"](str(tiny_wide_model_dir), str(tmp_path), device="cuda", calibration=texts)
    model, info = methods.METHODS[name]["load"](str(tmp_path), device="cuda")
    assert torch.isfinite(_logits(model)).all()
    assert info["linear_classes"]


def test_gptq_reload_falls_back_when_the_automatic_kernel_cannot_hold_a_shape(monkeypatch, tmp_path):
    """GPTQModel 7.6 picks Marlin for SmolLM2's act-order weights and then fails building the layer
    (seen on the GPU machine); quantbench then loads with the next backend and records why."""
    import json

    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"bits": 4}}))
    tried = []

    def load_saved(path, *, device, trust_remote_code=False, quantization_config=None):
        tried.append(quantization_config.backend if quantization_config else "auto")
        if quantization_config is None:
            raise NotImplementedError("Marlin activation-order weights require an aligned thread tile; got K=576")
        return "model", {"linear_classes": ["TritonV2QuantLinear"]}

    monkeypatch.setattr(methods, "load_saved", load_saved)
    model, info = methods.load_gptq(str(tmp_path), device="cuda")
    assert tried == ["auto", "gptq_triton"]
    assert info["backend_fallback"]["backend"] == "gptq_triton" and "K=576" in info["backend_fallback"]["because"]


@pytest.mark.parametrize("name, bits, kernel, tolerance", [("gptq-w4g32", 4, "TorchAtenLinear", 0.25),
                                                           ("gptq-w3g128", 3, "TorchLinear", 0.5)])
def test_gptq_runs_on_the_cpu_and_is_really_quantized(name, bits, kernel, tolerance, tiny_wide_model_dir, shared_data,
                                                      tmp_path):
    """GPTQModel quantizes and runs on the CPU (its torch kernels); weights are packed `bits` per value."""
    if methods.why_not_runnable(name, "cpu"):
        pytest.skip(str(methods.why_not_runnable(name, "cpu")))
    from transformers import AutoTokenizer

    from quantbench import tasks

    base = _logits(methods.METHODS["fp16"]["load"](tiny_wide_model_dir, device="cpu")[0])
    texts, _ = tasks.calibration_texts(AutoTokenizer.from_pretrained(tiny_wide_model_dir), source=None,
                                       data_dir=shared_data, hub=False, n_samples=8, seq_len=64)
    methods.METHODS[name]["quantize"](str(tiny_wide_model_dir), str(tmp_path), device="cpu", calibration=texts)
    model, info = methods.METHODS[name]["load"](str(tmp_path), device="cpu")
    layer = model.model.layers[0].mlp.up_proj  # in 256, out 512
    assert type(layer).__name__ == kernel and kernel in info["linear_classes"]
    assert layer.qweight.dtype == torch.int32 and layer.qweight.numel() * 32 == 256 * 512 * bits
    assert info["library"] == "gptq" and info["bits"] == bits and info["desc_act"] is True
    _close_but_not_equal(_logits(model), base, tolerance)

    # The route load_gptq falls back on: a backend named at reload replaces the automatic choice,
    # and the same packed weights give the same outputs through the other kernel.
    from transformers import GPTQConfig

    other, other_info = methods.load_saved(str(tmp_path), device="cpu",
                                           quantization_config=GPTQConfig(bits=bits, backend="gptq_torch"))
    assert "TorchLinear" in other_info["linear_classes"] and other_info["backend"] == "gptq_torch"
    error = ((_logits(other) - _logits(model)).norm() / _logits(model).norm()).item()
    assert error < 1e-2, error


def test_the_compute_dtype_follows_the_checkpoint(tiny_model_dir, tiny_overflow_model_dir, tmp_path):
    import json

    assert methods.checkpoint_dtype(tiny_model_dir) == ("float16", "config.json dtype")
    assert methods.checkpoint_dtype(tiny_overflow_model_dir) == ("bfloat16", "config.json dtype")
    # No dtype in config.json: the weights say, as transformers' dtype="auto" reads them.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for f in tiny_overflow_model_dir.glob("*.safetensors"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    assert methods.checkpoint_dtype(tmp_path) == ("bfloat16", "the weights (config.json names no dtype)")

    model, info = methods.METHODS["nf4"]["load"](str(tiny_overflow_model_dir), device="cpu")  # compute_dtype auto
    assert info["compute_dtype"] == "bfloat16"
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == torch.bfloat16
    model, info = methods.METHODS["baseline"]["load"](str(tiny_overflow_model_dir), device="cpu")
    assert info["compute_dtype"] == "bfloat16" and next(model.parameters()).dtype == torch.bfloat16


def test_bfloat16_variants_and_the_dtype_setting():
    assert methods.bfloat16_variants("nf4") == ["nf4-bf16"] and methods.bfloat16_variants("fp4") == ["fp4-bf16"]
    assert methods.bfloat16_variants("fp16") == ["bf16"] and methods.bfloat16_variants("baseline") == ["bf16"]
    assert methods.bfloat16_variants("int8") == []
    assert methods.dtype_setting("nf4") == "compute_dtype" and methods.dtype_setting("gptq-w4g32") == "dtype"
    assert methods.dtype_setting("awq-w4g128") is None  # GPTQModel's AWQ loader picks it
    assert methods.method_settings("torchao-int4wo")["dtype"] == "bfloat16"  # tinygemm takes bfloat16 only


def test_layers_a_quantizer_left_in_float_are_counted(tiny_model_dir):
    model, _ = methods.METHODS["nf4"]["load"](tiny_model_dir, device="cpu")
    assert methods.unquantized_linears(model) == {"count": 0, "of": 14, "names": []}  # lm_head is not counted
    model, _ = methods.METHODS["fp16"]["load"](tiny_model_dir, device="cpu")
    left = methods.unquantized_linears(model)
    assert left["count"] == left["of"] == 14 and left["names"][0] == "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("name, weights, activations", [("llmc-w4a16", "int4 group 128", None),
                                                        ("llmc-w8a8", "int8 channel", "int8 token dynamic"),
                                                        ("llmc-fp8", "float8 channel", "float8 token dynamic")])
def test_llm_compressor_schemes_are_saved_as_compressed_tensors_and_run_as_they_say(name, weights, activations,
                                                                                    tiny_wide_model_dir, shared_data,
                                                                                    tmp_path):
    """llm-compressor's checkpoint reloads in transformers with the scheme it names: each weight on its
    grid (int4 in groups of 128, int8 or FP8 per output row, times the saved scales), and activations
    quantized in the forward exactly where the scheme has them."""
    if methods.why_not_runnable(name, "cpu"):
        pytest.skip(str(methods.why_not_runnable(name, "cpu")))
    from transformers import AutoTokenizer

    from quantbench import tasks

    float_model = methods.METHODS["fp16"]["load"](tiny_wide_model_dir, device="cpu")[0]
    base = _logits(float_model)
    texts = tasks.calibration_texts(AutoTokenizer.from_pretrained(tiny_wide_model_dir), source=None, data_dir=shared_data,
                                    hub=False, n_samples=8, seq_len=64)[0] if methods.METHODS[name]["calibration"] else None
    methods.METHODS[name]["quantize"](str(tiny_wide_model_dir), str(tmp_path), device="cpu", calibration=texts,
                                      dtype="float32")
    model, info = methods.METHODS[name]["load"](str(tmp_path), device="cpu")
    assert info["library"] == "compressed-tensors" and info["ignore"] == ["lm_head"]
    assert info["schemes"] == {"group_0": {"weights": weights, "input_activations": activations}}
    assert ("activations quantized" in info["execution"]) == (activations is not None)
    logits = _logits(model)  # the first forward dequantizes the weights
    _close_but_not_equal(logits, base)

    layer = model.model.layers[0].mlp.up_proj  # in 256, out 512
    w, scale = layer.weight.detach().double(), layer.weight_scale.detach().double()
    q = w.reshape(512, scale.shape[1], -1) / scale[..., None]
    assert scale.shape == ((512, 2) if "group" in weights else (512, 1))
    if weights.startswith("int"):
        bound = 2 ** (int(weights[3]) - 1)
        assert (q - q.round()).abs().max() < 1e-4 and q.round().min() >= -bound and q.round().max() <= bound - 1
    else:
        on_grid = q.float().to(torch.float8_e4m3fn).double()  # E4M3's neighbours lie 6% or more apart
        assert ((on_grid - q).abs() <= 1e-5 * q.abs()).all() and q.abs().max() <= 448 * (1 + 1e-5)  # E4M3 max
    assert model.lm_head.weight.dtype == torch.float32 and not hasattr(model.lm_head, "weight_scale")

    # The same dequantized weights in the float model: the same logits unless activations are quantized.
    state = {k: v for k, v in model.state_dict().items() if k in float_model.state_dict()}
    float_model.load_state_dict(state)
    error = ((_logits(float_model) - logits).norm() / logits.norm()).item()
    assert (error > 1e-4) if activations else (error < 1e-5), error


def _demo_run(shared_data, tmp_path, methods_yaml):
    """`quantbench run` on the demo with a sweep file of `methods_yaml`, a small budget and no tasks;
    {experiment: its result}."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("methods:\n" + methods_yaml)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QUANTBENCH_CACHE": os.environ.get("QUANTBENCH_CACHE") or str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "quantbench", "run", "--config", str(sweep), "--tasks", "none", "--data-dir", str(shared_data),
           "--out", str(tmp_path / "r"), "--ppl-tokens", "1024", "--ppl-window", "512", "--kld-tokens", "1024",
           "--prompt-lengths", "16", "--new-tokens", "4", "--batch-sizes", "1", "--repeats", "1",
           "--calibration-samples", "8", "--calibration-tokens", "128"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3000)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {p.stem: json.loads(p.read_text()) for p in (tmp_path / "r" / "run001").glob("*.json") if p.stem != "run"}


@pytest.mark.demo
def test_llm_compressor_schemes_on_the_demo_with_kld_and_perplexity(shared_data, tmp_path):
    """The real demo (a Q4_1 GGUF dequantized to float): W4A16's default groups of 128 cannot tile its
    576-wide layers and are refused with the fix; in groups of 64 (a method table), W8A8 and FP8 run."""
    pytest.importorskip("llmcompressor")
    res = _demo_run(shared_data, tmp_path, "  - fp16\n  - llmc-w4a16\n  - {name: llmc-w4a16-g64, method: llmc-w4a16, group_size: 64}\n"
                    "  - llmc-w8a8\n  - llmc-fp8\n")
    assert res["llmc-w4a16"]["status"] == "skipped" and "does not divide the model's hidden_size 576" in res["llmc-w4a16"]["error"]
    base = res["fp16"]["quality"]["perplexity"]
    for name in ["llmc-w4a16-g64", "llmc-w8a8", "llmc-fp8"]:
        assert res[name]["status"] == "ok", (name, res[name].get("error"), res[name].get("traceback_tail"))
        assert res[name]["backend"]["library"] == "compressed-tensors" and res[name]["backend"]["schemes"]
        assert res[name]["backend"]["unquantized_linears"]["count"] == 0 and res[name]["compute_dtype"] == "float32"
        assert res[name]["quality"]["perplexity"] > base
        assert 0 < res[name]["quality"]["kld"]["kld_mean"] < 1
        # transformers runs them dequantized: the weights that run are float32's, not the checkpoint's
        assert res[name]["cost"]["weight_bytes"] > 0.9 * res["fp16"]["cost"]["weight_bytes"]
    calibration = res["llmc-w8a8"]["quantization"]["calibration"]
    assert calibration["samples"] == 8 and calibration["tokens_per_sample"] == 128
    assert res["llmc-fp8"]["quantization"]["calibration"] is None
    for eight in ["llmc-w8a8", "llmc-fp8"]:  # 8 bits cost less than 4
        assert res[eight]["quality"]["kld"]["kld_mean"] < res["llmc-w4a16-g64"]["quality"]["kld"]["kld_mean"]


def test_autoround_is_packed_in_4_bits_and_reloads_in_transformers(tiny_wide_model_dir, shared_data, tmp_path):
    """AutoRound tunes the rounding on the calibration set, exports its auto_round format, and
    transformers reloads it onto auto-round's own kernel, 4 bits per weight, groups of 128."""
    if methods.why_not_runnable("autoround-w4g128", "cpu"):
        pytest.skip(str(methods.why_not_runnable("autoround-w4g128", "cpu")))
    from transformers import AutoTokenizer

    from quantbench import tasks

    base = _logits(methods.METHODS["fp16"]["load"](tiny_wide_model_dir, device="cpu")[0])
    texts, _ = tasks.calibration_texts(AutoTokenizer.from_pretrained(tiny_wide_model_dir), source=None,
                                       data_dir=shared_data, hub=False, n_samples=8, seq_len=64)
    methods.METHODS["autoround-w4g128"]["quantize"](str(tiny_wide_model_dir), str(tmp_path), device="cpu",
                                                    calibration=texts, iters=4)
    model, info = methods.METHODS["autoround-w4g128"]["load"](str(tmp_path), device="cpu")
    assert info["library"] == "auto-round" and info["bits"] == 4 and info["group_size"] == 128 and info["sym"] is True
    assert info["iters"] == 4 and info["packing_format"].startswith("auto_round")
    layer = model.model.layers[0].mlp.up_proj  # in 256, out 512
    assert type(layer).__name__ in info["linear_classes"] and type(layer).__name__ != "Linear"
    assert info["linear_modules"] == [type(layer).__module__] and type(layer).__module__.startswith("auto_round")
    assert layer.qweight.dtype == torch.int32 and layer.qweight.numel() * 32 == 256 * 512 * 4
    assert methods.unquantized_linears(model)["count"] == 0
    _close_but_not_equal(_logits(model), base)


@pytest.mark.demo
def test_autoround_on_the_demo_with_kld_and_perplexity(shared_data, tmp_path):
    """The real demo (a Q4_1 GGUF dequantized to float) with AutoRound in groups of 64 (128 cannot tile
    its 576-wide layers) and 4 iterations instead of 200, so that it fits a test."""
    pytest.importorskip("auto_round")
    res = _demo_run(shared_data, tmp_path, "  - fp16\n  - {name: autoround-g64, method: autoround-w4g128, group_size: 64, iters: 4}\n")
    ar = res["autoround-g64"]
    assert ar["status"] == "ok", (ar.get("error"), ar.get("traceback_tail"))
    assert ar["backend"]["library"] == "auto-round" and ar["backend"]["group_size"] == 64 and ar["backend"]["iters"] == 4
    assert ar["backend"]["unquantized_linears"]["count"] == 0
    assert ar["quantization"]["calibration"]["samples"] == 8
    assert ar["quality"]["perplexity"] > res["fp16"]["quality"]["perplexity"]
    assert 0 < ar["quality"]["kld"]["kld_mean"] < 1
    assert ar["cost"]["weight_bytes"] < 0.6 * res["fp16"]["cost"]["weight_bytes"]  # packed, and run packed


@pytest.mark.demo
def test_quanto_on_the_demo_with_kld_and_perplexity(shared_data, tmp_path):
    """The real demo (a Q4_1 GGUF dequantized to float) with optimum-quanto: int4 takes groups of 96 on its
    576-wide inputs and 128 on the 1536-wide MLP's; int8 costs less KLD than int4."""
    pytest.importorskip("optimum.quanto")
    res = _demo_run(shared_data, tmp_path, "  - fp16\n  - quanto-int8\n  - quanto-int4\n")
    for name in ["quanto-int8", "quanto-int4"]:
        r = res[name]
        assert r["status"] == "ok", (name, r.get("error"), r.get("traceback_tail"))
        assert r["backend"]["library"] == "optimum-quanto" and r["backend"]["unquantized_linears"]["count"] == 0
        assert 0 < r["quality"]["kld"]["kld_mean"] < 1
    ppl = {n: res[n]["quality"]["perplexity"] for n in ["fp16", "quanto-int8", "quanto-int4"]}  # int8: noise, either side
    assert abs(ppl["quanto-int8"] / ppl["fp16"] - 1) < 0.01 and ppl["quanto-int4"] > 1.1 * ppl["fp16"]
    assert res["quanto-int4"]["backend"]["group_sizes"] == {"96": 30 * 6, "128": 30}  # q, k, v, o, gate, up; down
    assert res["quanto-int8"]["quality"]["kld"]["kld_mean"] < res["quanto-int4"]["quality"]["kld"]["kld_mean"]
    base = res["fp16"]["cost"]["weight_bytes"]  # float32 on the CPU
    assert res["quanto-int4"]["cost"]["weight_bytes"] < res["quanto-int8"]["cost"]["weight_bytes"] < 0.5 * base


def test_a_library_under_a_missing_parent_is_not_installed_rather_than_an_error():
    # find_spec("optimum.quanto") raises where optimum itself is missing: a method that needs it is skipped
    assert methods.installed("torch.nn") and not methods.installed("no_such_parent.quanto")
    assert not methods.installed("torch.no_such_module")
