"""minke's C++ decode kernels (kernels/decode.cpp), built for this machine on first use.

``cpp_kernels()`` compiles decode.cpp with ``-O3 -march=native`` through torch's extension loader the
first time it is asked (about 30 s; torch caches the build under TORCH_EXTENSIONS_DIR, by default
~/.cache/torch_extensions, and rebuilds it when the source changes), naming the build by this CPU's
model and instruction-set flags, since a -march=native build runs only where it was made. A build
lock left by a process killed mid-build, which would make torch wait forever, is removed (``_build``).
It is built with OpenMP (at::parallel_for on torch's threads); a compiler without it gets a one-thread
build, remembered in the build directory so later starts do not retry. Where it cannot be built (no C++
compiler) it logs why once and returns None, and every caller runs its torch path instead;
``MINKE_CPP_KERNELS=0`` turns it off. Callers: kernels/linear.py (decode GEMVs, FP8 weights as
stored), kernels/attention.py (absorbed attention and its bf16 weight folds, from kv_b_proj's E4M3
weight where it is held so, the lightning indexer's
bf16 and fp32 scores and its top-k, the caches' row gathers), quant/fp8.py (block-wise E4M3 quantize
and dequantize, portable C++ for any CPU, equal bit for bit to its torch path).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import threading

import torch

log = logging.getLogger(__name__)

_built: object = None  # the extension module; False once it could not be built (or is turned off)
_lock = threading.Lock()


def cpp_kernels():
    """The built extension (linear_t, absorb_query, absorb_value, latent_attention, moe_tokens,
    sigmoid_gate, rms_norm, index_scores, top_k, has_bf16_dot, fp8_linear, fp8_fold, has_fp8_dot,
    select_rows, fp8_quantize and fp8_dequantize), or None."""
    global _built
    if _built is not None:  # every decode GEMV asks: no lock once settled
        return _built or None
    with _lock:
        if _built is None:
            built = False
            if os.environ.get("MINKE_CPP_KERNELS", "1") != "0":
                try:
                    built = _build()
                except Exception as e:  # noqa: BLE001 - any build failure means: decode without it
                    log.warning("minke: the C++ decode kernels could not be built (%s); torch's paths run instead", e)
            _built = built  # set once built (or failed): other threads meanwhile wait on the lock
    return _built or None


def inference_on_cpu(*ts) -> bool:
    """Whether tensors may take a fast path that records no autograd graph: all on the CPU, outside
    autograd (none requires grad while grad is on) and autocast (which would run torch's path in its
    dtype). The C++ kernels and kernels/linear.py's laid-out weights ask it first."""
    return (not torch.is_grad_enabled() or not any(t.requires_grad for t in ts)) and \
        not torch.is_autocast_enabled("cpu") and all(t.device.type == "cpu" for t in ts)


def _build():
    """Build (or load the cached build of) decode.cpp. torch's loader holds a lock file in the build
    directory while it checks or compiles, and waits forever while one exists, so one left by a process
    killed meanwhile would hang every later start. minke's loads take an flock beside it first (the OS
    drops it when its holder dies): whoever holds the flock knows no other minke process is loading, so
    a torch lock it finds is stale and goes."""
    from torch.utils import cpp_extension
    name = f"minke_decode_{machine_tag()}"
    src = os.path.join(os.path.dirname(__file__), "decode.cpp")
    build_dir = cpp_extension._get_build_directory(name, False)
    with _exclusive(os.path.join(build_dir, "minke.flock")):
        remove_stale_lock(build_dir)
        log.info("minke: loading the C++ decode kernels (the first build on a machine takes about 30 s)")
        flags = ["-O3", "-march=native", "-fno-math-errno"]
        no_omp = os.path.join(build_dir, "no-openmp")  # written once only the build without OpenMP worked
        omp_error = None
        if not os.path.exists(no_omp):
            try:
                return cpp_extension.load(name=name, sources=[src], build_directory=build_dir, verbose=False,
                                          extra_cflags=flags + ["-fopenmp"], extra_ldflags=["-fopenmp"])
            except Exception as e:  # e.g. Apple clang: no OpenMP
                omp_error = str(e)
                log.warning("minke: the C++ kernels build without OpenMP, on one thread (%s)", omp_error[:200])
        one = cpp_extension._get_build_directory(name + "_1t", False)  # its own directory: no rebuild ping-pong
        remove_stale_lock(one)
        built = cpp_extension.load(name=name + "_1t", sources=[src], build_directory=one, verbose=False,
                                   extra_cflags=flags + ["-fopenmp-simd"])
        if omp_error is not None:  # OpenMP was the trouble (a source that fails both ways is retried both ways)
            with open(no_omp, "w") as f:
                f.write(omp_error[:4000])
        return built


@contextlib.contextmanager
def _exclusive(path: str):
    """An exclusive flock on ``path`` for the block (waits for another holder); none without fcntl."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock alone
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def remove_stale_lock(build_dir: str) -> bool:
    """Remove torch's lock file in ``build_dir``, left by a process that died holding it (the caller
    holds minke's flock, so no live minke process does). True when there was one."""
    lock = os.path.join(build_dir, "lock")
    try:
        os.remove(lock)
    except FileNotFoundError:
        return False
    log.warning("minke: removed a build lock left by a stopped process (%s)", lock)
    return True


def machine_tag() -> str:
    """A short hash of this CPU's model and instruction-set flags."""
    info = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            info += "".join(line for line in f if line.startswith(("model name", "flags", "Features")))[:8192]
    except OSError:
        pass
    return hashlib.sha256(info.encode()).hexdigest()[:10]
