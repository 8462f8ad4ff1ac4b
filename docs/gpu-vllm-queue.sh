# The queue of the vLLM calls (docs/gpu.md, "vLLM"), started detached from the repository root on the GPU
# machine after the staging calls: copy it to .dev/vq.sh and carry .dev, .gpudata (the wikitext-2-raw, lambada
# and arc folders of ../shared/data) and .vsite/cache (the JIT caches an earlier session brought back, if any).
# Each step logs to /tmp/q/<step>.log, its run under /tmp/qbout.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/whl/*.whl 2>&1 | grep -v WARN
for a in gq vc; do  # GPTQModel's compiled kernels; FlashInfer's, Triton's and vLLM's caches (gpu-vllm-cache.sh)
  ls .vsite/cache/$a.tar.xz.* > /dev/null 2>&1 && cat .vsite/cache/$a.tar.xz.* | xz -d | tar -x -C / && echo "restored $a"
done
G=/tmp/stage/files/SmolLM2-135M-Instruct.Q4_1.gguf  # the demo's GGUF, staged in two parts while the queue runs
rm -rf /tmp/qb && mkdir -p /tmp/qb /tmp/q && cp -r quantbench benchmarks tests pyproject.toml .gpudata /tmp/qb/
cd /tmp/qb
export PYTHONPATH=/tmp/qb:/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 QUANTBENCH_CACHE=/tmp/qbcache MAX_JOBS=16 \
       QUANTBENCH_DATA_DIR=/tmp/qb/.gpudata QUANTBENCH_DEMO_GGUF=$G
t=$(date +%s); echo "start $(date -u +%T)"
python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())" 2>&1 | tail -1
# issue 24's command, whole, in one run (vLLM's own benchmarks left out: each is a process of about 80 s);
# the transformers experiments run first, AWQ's last of them (its quantization about 8 minutes), then vLLM's
timeout 2400 python -m quantbench run --model arch:llama-3.2-1b --methods fp16,gptq-w4g128,torchao-fp8,awq-w4g128 \
    --engines transformers,vllm --tasks none --vllm-bench none --out /tmp/qbout/arch > /tmp/q/archrun.log 2>&1
echo "archrun rc=$? $(( $(date +%s)-t )) s"
# quantbench's vLLM timing in a plain process against vllm bench latency, at an experiment's positions, with
# an experiment's max_logprobs and without (the in-run check read 0.84 of vllm bench's decode, this script 1.16)
timeout 900 python benchmarks/vllm_cross_check.py /tmp/qbcache/arch-llama-3.2-1b-fp16 --batch-sizes 1 --rounds 1 \
    --max-logprobs 1,256 --max-model-len 8192 --gpu-memory-utilization 0.25 > /tmp/q/xcheck.log 2>&1
echo "xcheck rc=$? $(( $(date +%s)-t )) s"
# the GPU tests: vLLM's scoring against transformers, and a whole run with its own benchmarks on a tiny model
timeout 900 python -m pytest -q tests/test_engine_vllm.py -m gpu -p no:cacheprovider -rf > /tmp/q/gputest.log 2>&1
echo "gputest rc=$? $(( $(date +%s)-t )) s"
# the demo (SmolLM2-135M: a Q4_1 GGUF dequantized to float16) with the quick suite in both engines
mkdir -p /tmp/stage/files && [ -s $G ] || { ls /tmp/stage/*.gguf.split00* > /dev/null 2>&1 && cat /tmp/stage/*.gguf.split00* > $G; }
[ -s $G ] && timeout 1500 python -m quantbench run --methods fp16,gptq-w4g128,torchao-fp8,awq-w4g128 \
    --engines transformers,vllm --suite quick --vllm-bench none --out /tmp/qbout/demo > /tmp/q/demorun.log 2>&1
echo "demorun rc=$? $(( $(date +%s)-t )) s"
touch /tmp/q/done
