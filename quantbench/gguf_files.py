"""GGUF files made by llama.cpp's own tools, from the source of the installed llama-cpp-python release
(its source distribution carries llama.cpp under vendor/llama.cpp): convert_hf_to_gguf.py turns a
float checkpoint into GGUF, the bindings' quantizer makes each type, and llama-imatrix,
llama-quantize, llama-perplexity and llama-bench are built from that source once into the cache.

    >>> convert(checkpoint, Path("model-f16.gguf"), outtype="f16")
    >>> quantize(Path("model-f16.gguf"), Path("model.gguf"), "q4_k_m")      # {'fallbacks': {...}, ...}
    >>> tool("llama-perplexity")                                           # built once (cmake), a path
"""
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from quantbench.messages import tee_output
from quantbench.models import cache_folder
from quantbench.results import atomic_folder

TOOLS = ["llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench"]
# Compiler flags that leave out llama.cpp's AMX kernels, which a native build on a CPU with AMX compiles
# in and which crash on some such machines (llama.cpp issue 20824: ggml_backend_amx_mul_mat).
NO_AMX = "-mno-amx-int8"
NO_AMX_BUILD = f'CFLAGS={NO_AMX} CXXFLAGS={NO_AMX} pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python'


class Unsuitable(ValueError):
    """llama.cpp cannot make this GGUF (a model its converter does not know, a type it lacks, no source
    to convert with); the message says why, in llama.cpp's words where it gave them."""


def version():
    """The installed llama-cpp-python release."""
    return importlib.metadata.version("llama-cpp-python")


def source():
    """llama.cpp's source of the installed bindings' release: $QUANTBENCH_LLAMA_CPP_SOURCE (that
    release's source distribution, or its vendor/llama.cpp folder), else its source distribution
    from PyPI (`pip download --no-binary`, hash-checked by pip), unpacked once into the cache."""
    release = version()
    given = os.environ.get("QUANTBENCH_LLAMA_CPP_SOURCE")
    if given and Path(given).is_dir():
        return Path(given)
    folder = cache_folder() / "llama.cpp" / release
    if (folder / "llama.cpp" / "convert_hf_to_gguf.py").exists():
        return folder / "llama.cpp"
    with tempfile.TemporaryDirectory() as tmp:
        if given:
            sdist = Path(given)
        else:
            print(f"Fetching llama.cpp's source of llama-cpp-python {release} from PyPI (once)", flush=True)
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                                "-d", tmp, f"llama-cpp-python=={release}"], capture_output=True, text=True)
            found = list(Path(tmp).glob("*.tar.gz"))
            if r.returncode != 0 or not found:
                raise Unsuitable(f"could not fetch llama-cpp-python {release}'s source from PyPI "
                                       f"({r.stderr.strip()[-200:]}); set QUANTBENCH_LLAMA_CPP_SOURCE to its .tar.gz")
            sdist = found[0]
        with atomic_folder(folder) as out, tarfile.open(sdist) as tar:
            top = tar.getnames()[0].split("/")[0]
            inside = f"{top}/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(inside)]
            for m in members:
                m.name = "llama.cpp/" + m.name[len(inside):]
            tar.extractall(out, members=members, filter="data")
    return folder / "llama.cpp"


def failure_line(output, fallback="no output"):
    """The line of a failed llama.cpp tool's output that says why: the last naming an error (a C++
    exception's what(), a Python error), else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()] or [fallback]
    return next((line for line in reversed(lines) if "what()" in line or "rror" in line), lines[-1])


# `python -c ARCH_CONVERTER convert_hf_to_gguf.py ARGS`: the converter, for an arch: model. Its byte-level
# stand-in tokenizer is no tokenizer the converter knows by its hash, and has no merges, which llama.cpp's
# BPE loader requires; such a model measures speed and memory only, so it is written as llama.cpp's
# "default" pre-tokenizer with one merge of two NUL bytes.
ARCH_CONVERTER = """
import os, runpy, sys
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
from conversion.base import TextModel
set_vocab_gpt2 = TextModel._set_vocab_gpt2
def with_one_merge(self):
    set_vocab_gpt2(self)
    self.gguf_writer.add_token_merges(["\\u0100 \\u0100"])
TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
TextModel._set_vocab_gpt2 = with_one_merge
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(checkpoint, out, *, outtype):
    """A float checkpoint to GGUF (outtype f16, bf16 or f32) by llama.cpp's convert_hf_to_gguf.py; a
    model its converter does not know is MethodUnsuitable, with the converter's own reason."""
    script = source() / "convert_hf_to_gguf.py"
    arch = (Path(checkpoint) / "quantbench-arch.json").exists()
    r = subprocess.run([sys.executable, *(["-c", ARCH_CONVERTER] if arch else []), str(script), str(checkpoint),
                        "--outfile", str(out), "--outtype", outtype], capture_output=True, text=True)
    if r.returncode != 0:
        raise Unsuitable(f"llama.cpp's converter (convert_hf_to_gguf.py of llama-cpp-python {version()}) "
                         f"cannot convert this model: {failure_line(r.stderr)[:300]}")
    return out


def float_gguf(checkpoint, *, outtype):
    """The checkpoint converted to a float GGUF (`outtype` f16 or bf16), once per checkpoint and
    llama.cpp release, in the cache: every GGUF type of the model is quantized from it."""
    checkpoint = Path(checkpoint)
    weights = sorted((p.name, p.stat().st_size) for p in checkpoint.glob("*.safetensors"))
    key = hashlib.sha256(f"{(checkpoint / 'config.json').read_text()}{weights}{version()}{outtype}".encode()).hexdigest()[:16]
    folder = cache_folder() / "gguf" / f"{checkpoint.name}-{outtype}-{key}"
    if not (folder / "model.gguf").exists():
        with atomic_folder(folder) as tmp:
            convert(checkpoint, tmp / "model.gguf", outtype=outtype)
    return folder / "model.gguf"


def place(src, dst):
    """`src` at `dst` without a second copy on disk where the file system allows (a hard link)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def types():
    """The GGUF types the installed llama.cpp quantizes to, by their lower-case names (q4_k_m: 15)."""
    import llama_cpp

    return {name.removeprefix("LLAMA_FTYPE_MOSTLY_").lower(): getattr(llama_cpp, name) for name in dir(llama_cpp)
            if name.startswith("LLAMA_FTYPE_MOSTLY_")}


# llama.cpp's quantizer's record of each tensor: "[  12/ 272] blk.0.ffn_up.weight - [ 576, 1536, 1, 1], type = f16,
# converting to q5_0 .. size = ..." (a tensor it keeps has no "converting to"; other messages, such as the
# imatrix's "did not find weights for ...", may come between the two halves).
TENSOR = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+-\s+\[\s*(\d+),\s*(\d+),[^\]]*\],\s*type\s*=\s*(\w+)(.*?)(?=\[\s*\d+/\s*\d+\]|\Z)", re.S)
CONVERTED = re.compile(r"converting to (\w+)")


def quantize(f16, out, kind, *, imatrix=None, threads=None):
    """`f16` quantized to `kind` by llama.cpp: the bindings' llama_model_quantize, or llama-quantize
    with the importance matrix `imatrix`. Returns what it did: the tensors of each type it wrote (a
    width the type's blocks do not tile falls back to another type) and the matrices it left as they were."""
    known = types()
    if kind not in known:
        raise Unsuitable(f"llama-cpp-python {version()}'s llama.cpp has no GGUF type {kind}; it has: "
                               + ", ".join(sorted(known)))
    if imatrix is None:
        import llama_cpp

        from llama_cpp import _logger

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = known[kind], threads or os.cpu_count() or 1
        level = _logger.logger.level
        # Its per-tensor log says which tensors fell back (kept, not shown). DEBUG: the bindings' table maps
        # llama.cpp's error level to logging.DEBUG (it predates ggml's present order), so a failure says why only there.
        _logger.logger.setLevel("DEBUG")
        try:
            with tee_output(echo=False) as lines:
                code = llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params)
        finally:
            _logger.logger.setLevel(level)
        log = "\n".join(lines)
    else:
        r = subprocess.run([str(tool("llama-quantize")), "--imatrix", str(imatrix), str(f16), str(out), kind.upper(),
                            str(threads or os.cpu_count() or 1)], capture_output=True, text=True)
        code, log = r.returncode, r.stdout + r.stderr
    if code != 0 or not Path(out).exists():
        raise RuntimeError(f"llama.cpp's quantizer failed on {kind} (code {code}): {failure_line(log)[:300]}")
    counts, kept, matrices = {}, [], 0
    for name, _, rows, was, rest in TENSOR.findall(log):
        became = (m := CONVERTED.search(rest)) and m.group(1)
        counts[became or was] = counts.get(became or was, 0) + 1
        matrices += int(rows) > 1  # norms are vectors, kept in f32 by every type
        if int(rows) > 1 and not became:
            kept.append(name)
    return {"type": kind, "tensor_types": counts, "matrices": matrices, "unquantized": len(kept),
            "unquantized_names": kept[:10]}


# A GGUF's metadata keys ({arch}.<key>) for the config.json keys that make two checkpoints the same model.
GGUF_SHAPE = {"num_hidden_layers": "block_count", "hidden_size": "embedding_length",
              "intermediate_size": "feed_forward_length", "num_attention_heads": "attention.head_count",
              "num_key_value_heads": "attention.head_count_kv"}


def describe(file):
    """What a GGUF file holds, from its own metadata (gguf's reader, nothing loaded): its type (general.file_type),
    bits, the tensors of each type, the matrices kept in a float type, and the model's shape by config.json's names."""
    import gguf

    reader = gguf.GGUFReader(file)

    def field(key):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    arch = field("general.architecture")
    config = {name: field(f"{arch}.{key}") for name, key in GGUF_SHAPE.items()}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    config = {k: v for k, v in {**config, "vocab_size": tokens and len(tokens.data)}.items() if isinstance(v, int)}
    file_type = field("general.file_type")
    kind = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").lower() if file_type is not None else "unknown"
    counts, kept, matrices = {}, [], 0
    for t in reader.tensors:
        name = re.sub(r"_k$", "_K", t.tensor_type.name.lower())  # as llama.cpp's quantizer names them: q6_K
        counts[name] = counts.get(name, 0) + 1
        if len(t.shape) > 1 and int(t.shape[1]) > 1:  # norms are vectors, kept in f32 by every type
            matrices += 1
            if name in ("f32", "f16", "bf16"):
                kept.append(t.name)
    bits = re.search(r"\d+", kind)
    return {"type": kind, "bits": int(bits.group()) if bits else None, "architecture": arch, "config": config,
            "tensor_types": counts, "matrices": matrices, "unquantized": len(kept), "unquantized_names": kept[:10]}


def importance_matrix(f16, texts, out, *, ctx=512, threads=None):
    """llama.cpp's importance matrix of `f16` over the calibration `texts` (llama-imatrix), written to
    `out`; returns its sha256 and how it was made."""
    corpus = Path(out).with_suffix(".txt")
    corpus.write_text("\n\n".join(texts))
    r = subprocess.run([str(tool("llama-imatrix")), "-m", str(f16), "-f", str(corpus), "-o", str(out), "-c", str(ctx),
                        "-t", str(threads or os.cpu_count() or 1), "--no-ppl"], capture_output=True, text=True)
    corpus.unlink()
    if r.returncode != 0 or not Path(out).exists():
        raise RuntimeError(f"llama-imatrix failed (code {r.returncode}): {failure_line(r.stdout + r.stderr)[:300]}")
    digest = hashlib.sha256(Path(out).read_bytes()).hexdigest()
    chunks = re.search(r"computing over (\d+) chunks", r.stdout + r.stderr)
    return {"sha256": digest, "ctx": ctx, "tool": "llama-imatrix", "chunks": int(chunks.group(1)) if chunks else None}


def tool(name):
    """A llama.cpp tool (TOOLS) built from source() once, into the cache, for this machine's CPU (and its
    GPU, when the bindings were built with CUDA)."""
    build = cache_folder() / "llama.cpp" / version() / "build"
    path = build / "bin" / name
    if (build / "quantbench-built").exists() and path.exists():
        return path
    if shutil.which("cmake") is None:
        raise Unsuitable("building llama.cpp's tools needs cmake and a C++ compiler: apt install cmake g++")
    print(f"Building llama.cpp's {', '.join(TOOLS)} from source into {build} (once, minutes)", flush=True)
    import llama_cpp

    # the tools run where the bindings run: with CUDA when the bindings' llama.cpp has it
    system = llama_cpp.llama_print_system_info().decode()
    cuda = ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=native"] if "CUDA" in system else []
    # and the CPU kernels the bindings have: no AMX where they were built without it
    amx = [] if "AMX_INT8 = 1" in system else [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
    configure = ["cmake", "-S", str(source()), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF",
                 *cuda, *amx]
    for cmd in (configure, ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 1), "--target", *TOOLS]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"building llama.cpp's tools failed: {(r.stdout + r.stderr).strip()[-400:]}")
    (build / "quantbench-built").write_text(version())
    return path
