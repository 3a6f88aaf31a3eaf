"""llama.cpp as users get it: the copy vendored in the `llama-cpp-python` sdist, fetched with pip.

Its own converter (`convert_hf_to_gguf.py` with its own `gguf-py`) turns a model directory into a GGUF file; a
CPU-only cmake build of `libllama` and the sdist's ctypes bindings run it. The sdist is extracted once, and the
library built once, under the bench cache ($MOEKIT_BENCH_DIR, default ./.cache/bench), with a file lock so that
parallel test workers share one copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from _peer import bench_dir

from moekit.demo.cache import file_lock

VERSION = "0.3.36"  # llama-cpp-python; its vendored llama.cpp is ggml 0.25.3
SDIST = f"llama_cpp_python-{VERSION}"


def cache() -> Path:
    return bench_dir() / "llama.cpp"


def source() -> Path:
    """The extracted sdist (made on first use): `vendor/llama.cpp` holds the converter and the C++ sources."""
    root = cache() / SDIST
    if (root / ".extracted").is_file():
        return root
    with file_lock(cache() / ".sdist.lock"):
        if not (root / ".extracted").is_file():
            _fetch(root)
    return root


def llama_cpp_dir() -> Path:
    return source() / "vendor" / "llama.cpp"


def _fetch(root: Path) -> None:
    with tempfile.TemporaryDirectory(dir=cache()) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q"]
        proc = subprocess.run(
            [*cmd, f"llama-cpp-python=={VERSION}", "-d", tmp], capture_output=True, text=True
        )
        archives = list(Path(tmp).glob(f"{SDIST}.tar.gz"))
        if proc.returncode != 0 or not archives:
            raise RuntimeError(f"pip download llama-cpp-python=={VERSION} failed:\n{proc.stderr[-2000:]}")
        with tarfile.open(archives[0]) as tar:
            tar.extractall(tmp, filter="data")  # no absolute paths, links out of the tree or devices
        shutil.rmtree(root, ignore_errors=True)
        (Path(tmp) / SDIST).rename(root)
    (root / ".extracted").touch()


def convert(model_dir: Path, out_file: Path, outtype: str = "f32") -> subprocess.CompletedProcess:
    """Run llama.cpp's converter on `model_dir` (its vendored gguf-py, not the installed one); never raises."""
    script = llama_cpp_dir() / "convert_hf_to_gguf.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("NO_LOCAL_GGUF", None)
    cmd = [sys.executable, str(script), str(model_dir), "--outfile", str(out_file), "--outtype", outtype]
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def library() -> Path:
    """The directory holding a CPU-only `libllama.so` (and its ggml libraries), built once with cmake."""
    build = cache() / f"build-{VERSION}"
    lib_dir = build / "bin"
    stamp = build / ".built"
    if stamp.is_file():
        return lib_dir
    src = llama_cpp_dir()
    with file_lock(cache() / ".build.lock"):
        if not stamp.is_file():
            print(f"building llama.cpp ({SDIST}, CPU only) in {build} (once; minutes)...", flush=True)
            off = ("COMMON", "TESTS", "TOOLS", "EXAMPLES", "SERVER", "APP")
            flags = [f"-DLLAMA_BUILD_{name}=OFF" for name in off]
            generator = ["-G", "Ninja"] if shutil.which("ninja") else []
            configure = ["cmake", "-S", str(src), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release"]
            configure += ["-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=ON", "-DLLAMA_OPENSSL=OFF", *flags]
            subprocess.run(configure, check=True, capture_output=True)
            jobs = str(os.cpu_count() or 2)
            subprocess.run(["cmake", "--build", str(build), "--target", "llama", "-j", jobs], check=True)
            stamp.touch()
    return lib_dir


def bindings_env() -> dict[str, str]:
    """Environment for a child process that imports the sdist's `llama_cpp` bindings over the built library."""
    path = os.pathsep.join(p for p in (str(source()), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "LLAMA_CPP_LIB_PATH": str(library())}
