#!/bin/bash
# Run detached on the GPU machine from a private copy of the repository (docs/gpu.md, "llama.cpp with
# CUDA"), after the demo GGUF and the packages are staged: llama.cpp built with CUDA from the bindings'
# own source (one build gives the bindings' libraries and the tools), then the GGUF methods on the demo,
# the llama-bench cross-check and the llama-perplexity test. Logs and results under /tmp/ll.
cd /tmp/qb
export PATH=$PATH:/usr/local/cuda/bin
export PYTHONPATH=/tmp/qb:/tmp/site QUANTBENCH_DEMO_GGUF=/tmp/stage/files/SmolLM2-135M-Instruct.Q4_1.gguf \
       QUANTBENCH_DATA_DIR=/tmp/qb/.gpudata HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 QUANTBENCH_CACHE=/tmp/qbcache
S=/tmp/llsrc; B=/tmp/qbcache/llama.cpp/0.3.36/build; R=/tmp/ll; mkdir -p $R
if [ ! -f $B/quantbench-built ]; then
  t=$(date +%s)
  mkdir -p $S && tar xzf .llgpu/llama-src.tar.gz -C $S
  # OpenMP off, as in the measured run: torch carries its own libgomp.so.1 under the system's name. A CPU
  # build with OpenMP later ran there beside torch, and without it the bindings start threads per graph
  # (docs/benchmarks.md, "Speed on a 16-core host"): prefer -DGGML_OPENMP=ON.
  cmake -S $S/vendor/llama.cpp -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=ON -DGGML_CUDA=ON -DGGML_OPENMP=OFF \
    -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8 \
    -DCMAKE_CUDA_ARCHITECTURES=90 > $R/cmake.log 2>&1 || { tail -30 $R/cmake.log; touch $R/done; exit 1; }
  cmake --build $B -j 16 --target llama llama-quantize llama-imatrix llama-perplexity llama-bench > $R/build.log 2>&1 \
    || { tail -40 $R/build.log; touch $R/done; exit 1; }
  echo "llama.cpp CUDA build: $(( $(date +%s)-t )) s"
  echo 0.3.36 > $B/quantbench-built   # gguf_files.tool() then uses these tools
  cp -r $S/llama_cpp /tmp/site/        # the bindings' Python package, on the libraries just built
  D=/tmp/site/llama_cpp_python-0.3.36.dist-info; mkdir -p $D
  printf 'Metadata-Version: 2.1\nName: llama-cpp-python\nVersion: 0.3.36\n' > $D/METADATA
fi
# libggml-cuda exports libstdc++'s locale symbols; in a process that imported torch first, llama.cpp's
# std::regex (its BPE tokenizer) then calls them and crashes: put the real libstdc++ first.
export LLAMA_CPP_LIB_PATH=$B/bin QUANTBENCH_LLAMA_CPP_SOURCE=$S/vendor/llama.cpp LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6
python3 -m quantbench methods | tail -4
t=$(date +%s)
python3 -m quantbench run --methods fp16,gguf-f16,gguf-q8_0,gguf-q6_k,gguf-q4_k_m,gguf-q4_k_m-imat,gguf-iq4_xs,gguf-iq4_xs-imat \
  --tasks none --out $R/runs > $R/run.log 2>&1; echo "run: $? in $(( $(date +%s)-t )) s"
python3 benchmarks/llama_cpp_cross_check.py --rounds 3 $(ls -d /tmp/qbcache/quantized/smollm2-135m/gguf-q8_0-* \
  /tmp/qbcache/quantized/smollm2-135m/gguf-q4_k_m-[0-9a-f]*) > $R/xcheck.md 2>&1
timeout 420 python3 -m pytest -q -x -p no:cacheprovider tests/test_engine_llamacpp.py -m demo > $R/demo-test.log 2>&1
touch $R/done
