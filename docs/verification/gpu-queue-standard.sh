# Machine 1 of the next session (issues 4 and 6): the demo's standard suite, every method.
# Started detached by .dev/go1.sh after `bash .device/stage.sh 1` and `2`; watch with .dev/mon.sh.
rm -rf /tmp/qbrepo && mkdir -p /tmp/qbrepo && cp -r quantbench benchmarks pyproject.toml .gpudata /tmp/qbrepo/
cd /tmp/qbrepo
export PYTHONPATH=/tmp/qbrepo:/tmp/site QUANTBENCH_DATA_DIR=/tmp/qbrepo/.gpudata
M=fp16,nf4,fp4,int8,gptq-w4g128,gptq-w4g32,gptq-w3g128,awq-w4g128,torchao-int8wo,torchao-int4wo,torchao-fp8,hqq-w4g64
t=$(date +%s); echo "std start $(date -u +%T)"
if [ -f /tmp/qbstd/run001/run.json ]; then
  python -m quantbench run --resume /tmp/qbstd/run001 >> /tmp/q/std.log 2>&1
else
  python -m quantbench run --suite standard --methods $M --eval-batch-size 128 --out /tmp/qbstd > /tmp/q/std.log 2>&1
fi
echo "std rc=$? $(( $(date +%s)-t )) s"
touch /tmp/q/done
