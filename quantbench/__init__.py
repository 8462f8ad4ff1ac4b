"""quantbench: which quantization should I use for this model on this GPU?

Loads a causal LM in float and in each quantized form, measures quality (perplexity, lm-eval tasks)
and cost (weight and peak memory, load time, time to first token, decode tokens/s), one process per
experiment, and writes JSON results and a summary table. Start at cli.py.
"""
__version__ = "0.1.0"
