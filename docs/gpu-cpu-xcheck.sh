# The CPU speed cross-check on the GPU machine's host (docs/gpu.md, "The CPU cross-check there"):
# llama.cpp built for the CPU alone, with OpenMP, from the bindings' own source (one build: the bindings'
# libraries and llama-bench), the demo's q8_0 and q4_k_m made by quantbench, then
# benchmarks/llama_cpp_cross_check.py at 4 and 8 threads.
rm -rf /tmp/qbrepo && mkdir -p /tmp/qbrepo && cp -r quantbench benchmarks pyproject.toml .llgpu /tmp/qbrepo/ && cd /tmp/qbrepo
export PYTHONPATH=/tmp/qbrepo:/tmp/site
S=/tmp/llsrc; B=/tmp/qbcache/llama.cpp/0.3.36/build; R=/tmp/q
t=$(date +%s); mkdir -p $S && tar xzf .llgpu/llama-src.tar.gz -C $S
cmake -S $S/vendor/llama.cpp -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=ON -DGGML_OPENMP=ON > $R/cmake.log 2>&1 || { tail -30 $R/cmake.log; touch $R/done; exit 1; }
cmake --build $B -j 16 --target llama llama-bench > $R/build.log 2>&1 || { tail -40 $R/build.log; touch $R/done; exit 1; }
echo "llama.cpp CPU build: $(( $(date +%s)-t )) s"
echo 0.3.36 > $B/quantbench-built
cp -r $S/llama_cpp /tmp/site/; D=/tmp/site/llama_cpp_python-0.3.36.dist-info; mkdir -p $D
printf 'Metadata-Version: 2.1\nName: llama-cpp-python\nVersion: 0.3.36\n' > $D/METADATA
export LLAMA_CPP_LIB_PATH=$B/bin QUANTBENCH_LLAMA_CPP_SOURCE=$S/vendor/llama.cpp LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6
python3 -m quantbench methods | tail -3
lscpu | grep -E "Model name|^CPU\(s\)|Thread|Core|Socket" 
t=$(date +%s)
python3 -m quantbench run --methods gguf-q8_0,gguf-q4_k_m --tasks none --kld-tokens 0 --ppl-tokens 2048 --batch-sizes 1 \
  --prompt-lengths 128 --device cpu --out /tmp/qbout/make > $R/make.log 2>&1; echo "make: $? in $(( $(date +%s)-t )) s"
G=$(ls -d /tmp/qbcache/quantized/smollm2-135m/gguf-q8_0-* /tmp/qbcache/quantized/smollm2-135m/gguf-q4_k_m-*)
for th in 4 8; do python3 benchmarks/llama_cpp_cross_check.py --rounds 5 --threads $th $G > $R/xcheck-$th.md 2>&1; cat $R/xcheck-$th.md; done
touch $R/done
