# The JIT caches a GPU machine filled, packed under $OUT/cache for the next session to carry as .vsite/cache
# (gpu-vllm-queue.sh restores them): GPTQModel's compiled kernels (minutes to build), then FlashInfer's,
# Triton's and vLLM's (FlashInfer's sampling module alone is 95 s of nvcc) if they still fit the 8 files back.
du -sh /root/.cache/gptqmodel/torch_extensions /root/.triton/cache /root/.cache/flashinfer /root/.cache/vllm 2>/dev/null
mkdir -p $OUT/cache && cd /
find root/.cache/gptqmodel/torch_extensions -name '*.so' | tar -c -T - | xz -T0 -6 | split -b 15M -d -a 2 - $OUT/cache/gq.tar.xz.
ls -d root/.triton/cache root/.cache/flashinfer root/.cache/vllm 2>/dev/null | tar -c -T - | xz -T0 -6 > /tmp/vc.tar.xz
n=$(ls $OUT/cache | wc -l); s=$(stat -c %s /tmp/vc.tar.xz)
[ $s -lt $(( (7-n)*15*1024*1024 )) ] && split -b 15M -d -a 2 /tmp/vc.tar.xz $OUT/cache/vc.tar.xz. || echo "vLLM caches left: $s bytes"
ls -la $OUT/cache
