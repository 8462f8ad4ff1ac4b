# Source on the GPU machine from the repository root (docs/gpu.md): installs the carried packages in
# .dev/pkgs once into /tmp/site, joins the demo GGUF when its parts were staged, sets quantbench's environment.
if [ ! -f /tmp/site/.done ]; then
  t=$(date +%s)
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
    --target /tmp/site .dev/pkgs/* 2>&1 | grep -v -i warn | tail -5
  # The bytecode pip writes at install by default (skipped above, in parallel here): no timed run pays for it.
  python3 -m compileall -q -j 0 /tmp/site > /dev/null 2>&1
  touch /tmp/site/.done; echo "install: $(( $(date +%s)-t )) s"
fi
G=/tmp/stage/files/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f $G ] && [ -f /tmp/stage/SmolLM2-135M-Instruct.Q4_1.gguf.split001 ]; then
  mkdir -p /tmp/stage/files && cat /tmp/stage/SmolLM2-135M-Instruct.Q4_1.gguf.split00* > $G && echo "demo GGUF joined"
fi
export PYTHONPATH=$PWD:/tmp/site QUANTBENCH_DEMO_GGUF=$G QUANTBENCH_DATA_DIR=$PWD/.gpudata \
       HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MAX_JOBS=16 QUANTBENCH_CACHE=/tmp/qbcache
