#!/bin/bash
# Packs vLLM 0.26.0, the packages it imports that the GPU machine lacks, and lm-eval's, into one site
# folder for Python 3.12, xz-compressed and split into parts of 52 MiB, one a call (docs/gpu.md, "vLLM").
# Run from the repository root, here (PY312: a Python 3.12 for the install, default python3.12; about 5 minutes
# on 2 cores):
#   bash docs/gpu-vllm-pack.sh            # then .vsite/part1, part2, part3, .dev/unpack.sh and .dev/whl
set -euo pipefail
PY312=${PY312:-python3.12}
W=$(mktemp -d)
PLAT="--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none --only-binary=:all:"
for n in $(seq 5 39); do PLAT="$PLAT --platform manylinux_2_${n}_x86_64"; done
PLAT="$PLAT --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64 --platform any"

# 1. What vLLM needs that the machine lacks, less what a dense text model on Hopper never imports (found
#    by importing vLLM's engine, CLI and server from the rest); flashinfer and apache-tvm-ffi stay.
pip install -q --dry-run --ignore-installed $PLAT --target "$W/x" --report "$W/r.json" \
    'vllm==0.26.0' 'torch==2.11.0' 'transformers==5.17.0'
python3 - "$W/r.json" > "$W/want.txt" <<'EOF'
import json, re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
have = {norm(l.split("==")[0]) for l in open("../shared/device/device-packages.txt").read().split()}
never = re.compile(r"^(tilelang|tokenspeed-.*|nvidia-cutlass-dsl.*|quack-kernels|humming-kernels|cuda-tile|"
                   r"nvidia-cuda-(nvcc|crt|cccl|nvdisasm)|nvidia-nvvm|z3-solver|torchcodec|pynvvideocodec|"
                   r"fastsafetensors|cuda-python|torch-c-dlpack-ext)$")
for i in json.load(open(sys.argv[1]))["install"]:
    name = norm(i["metadata"]["name"])
    if name not in have and not never.match(name):
        print(f"{name}=={i['metadata']['version']}")
EOF
mkdir -p "$W/wheels"
pip download -q --no-deps $PLAT -d "$W/wheels" -r "$W/want.txt"

# 2. lm-eval and quantbench's other needs (the bundle tool's resolution), its sdists built into wheels.
../shared/device/bundle "$W/lmb" 'lm-eval==0.4.13' 'gguf>=0.17,<0.20' 'datasets>=3,<6' 'diskcache>=5.6,<6' \
    'scipy>=1.7,<2' 'matplotlib>=3.8,<4' 'transformers==5.17.0' 'torch==2.11.0' > /dev/null
for f in "$W"/lmb/part*/*; do
  case "$f" in
    *.whl) b=$(basename "$f"); ls "$W/wheels/${b%%-*}-"* > /dev/null 2>&1 || cp "$f" "$W/wheels/" ;;
    *.tar.gz|*.zip) $PY312 -m pip wheel -q --no-deps -w "$W/wheels" "$f" ;;
  esac
done

# 3. One site folder; vLLM's libraries a Hopper run of a dense model does not load left out: FlashAttention 2
#    (FA3 runs on Hopper), the mixture-of-experts kernels, the Rust frontend, deep_gemm for other Pythons.
$PY312 -m pip install -q --no-deps --no-compile --target "$W/site" "$W"/wheels/*.whl
rm -f "$W"/site/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so "$W"/site/vllm/_moe_C_stable_libtorch.abi3.so \
      "$W"/site/vllm/vllm-rs "$W"/site/vllm/third_party/deep_gemm/_C.cpython-31[0134]-*.so

# 4. Compressed and split; the machine joins and unpacks the parts with .dev/unpack.sh.
tar -C "$W/site" -cf - . | xz -T2 -7 > "$W/site.tar.xz"
rm -rf .vsite/part* && mkdir -p .vsite .dev  # .vsite/cache, the caches a session brought back, stays
split -b 52M -d "$W/site.tar.xz" .vsite/site.tar.xz.
for f in .vsite/site.tar.xz.*; do d=.vsite/part$(( 10#${f##*.} + 1 )); mkdir -p $d && mv $f $d/; done
cat > .dev/unpack.sh <<'EOF'
# the vLLM site folder from its staged parts (xz-compressed tar), once per machine
if [ ! -f /tmp/site/.unpacked ]; then
  t=$(date +%s); mkdir -p /tmp/site
  cat /tmp/stage/site.tar.xz.* | xz -d -T0 | tar -x -C /tmp/site && touch /tmp/site/.unpacked
  echo "unpacked in $(( $(date +%s)-t )) s: $(du -sh /tmp/site | cut -f1)"
fi
EOF
du -sh .vsite/part*

# 5. GPTQModel (GPTQ and AWQ), optimum and torchao with the packages of theirs the site folder lacks, as wheels in
#    .dev/whl (gpu-vllm-queue.sh installs them); the sdists built into wheels here (GPTQModel compiles its CUDA
#    kernels there, at first use).
rm -rf .dev/whl && mkdir -p .dev/whl
../shared/device/bundle "$W/gq" 'gptqmodel==7.6.0' 'optimum==2.3.0' 'torchao==0.18.0' 'transformers==5.17.0' \
    'torch==2.11.0' > /dev/null
for f in "$W"/gq/part*/*; do
  case "$(basename "$f")" in
    gptqmodel-*|optimum-*|defuser-*|device_smi-*|logbar-*|tokenicer-*|pypcre-*|tzdata-*|torchao-*)
      case "$f" in
        *.whl) cp "$f" .dev/whl/ ;;
        *.tar.gz) BUILD_CUDA_EXT=0 $PY312 -m pip wheel -q --no-deps -w .dev/whl "$f" ;;
      esac ;;
  esac
done
du -sh .dev/whl
rm -rf "$W"
