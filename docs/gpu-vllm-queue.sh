# The queue of the vLLM calls of the session of 2026-12-07 (docs/gpu.md, "vLLM"), started detached from the
# repository root on the GPU machine after the staging calls: copy it to .dev/vq.sh and carry .dev and .gpudata
# (the wikitext-2-raw and lambada folders of ../shared/data). Each step logs to /tmp/q/<step>.log.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/whl/*.whl 2>&1 | grep -v WARN
rm -rf /tmp/qb && mkdir -p /tmp/qb /tmp/q && cp -r quantbench benchmarks tests pyproject.toml .gpudata /tmp/qb/
cd /tmp/qb
export PYTHONPATH=/tmp/qb:/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 QUANTBENCH_CACHE=/tmp/qbcache QUANTBENCH_DATA_DIR=/tmp/qb/.gpudata
t=$(date +%s); echo "start $(date -u +%T)"
python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())" 2>&1 | tail -3
timeout 480 python -m pytest -q tests/test_engine_vllm.py -m gpu -p no:cacheprovider -rf > /tmp/q/gputest.log 2>&1
echo "gputest rc=$? $(( $(date +%s)-t )) s"
python -c "from pathlib import Path; from quantbench.models import prepare_arch; prepare_arch('llama-3.2-1b', Path('/tmp/qbcache'))"
timeout 900 python benchmarks/vllm_cross_check.py /tmp/qbcache/arch-llama-3.2-1b-fp16 --batch-sizes 1,8 --rounds 3 > /tmp/q/xcheck.log 2>&1
echo "xcheck rc=$? $(( $(date +%s)-t )) s"
timeout 720 python -m quantbench run --model arch:llama-3.2-1b --methods fp16,torchao-fp8 --engines transformers,vllm \
    --tasks none --out /tmp/qbout/arch > /tmp/q/archrun.log 2>&1
echo "archrun rc=$? $(( $(date +%s)-t )) s"
touch /tmp/q/done
