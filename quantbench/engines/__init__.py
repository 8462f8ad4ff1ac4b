"""The engines an experiment can be measured in: one module each, one line here.

An experiment is (model, method, engine); each method names the engine that runs it (METHODS). An
engine module gives the same functions (see engines/transformers.py): load, logprobs, forwards, lm,
generate, time_prefill, time_decode, compile_step, compiled_settings, compiled_state, graph_breaks,
weight_bytes, reset_peak, peak_bytes, resident_bytes, release, input_device, device_name, shapes, standard_bench;
and DECODE_MODES, EAGER_ATTENTION. vLLM returns no logits: it gives its own perplexity and kld for logprobs.
"""
from quantbench.engines import llamacpp, transformers, vllm

ENGINES = {"transformers": transformers, "llama.cpp": llamacpp, "vllm": vllm}
