"""minke's C++ decode kernels (kernels/decode.cpp), built for this machine on first use.

``cpp_kernels()`` compiles decode.cpp with ``-O3 -march=native`` through torch's extension loader the
first time it is asked (about 30 s; torch caches the build under TORCH_EXTENSIONS_DIR, by default
~/.cache/torch_extensions, and rebuilds it when the source changes), naming the build by this CPU's
model and instruction-set flags, since a -march=native build runs only where it was made. A build
lock left by a process killed mid-build, which would make torch wait forever, is removed. Where it cannot be built (no C++ compiler) it logs
why once and returns None, and every caller runs its torch path instead; ``MINKE_CPP_KERNELS=0`` turns
it off. Callers: kernels/linear.py (decode GEMVs), kernels/attention.py (absorbed attention).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import time

log = logging.getLogger(__name__)

_built: object = None  # the extension module; False once it could not be built (or is turned off)
_lock = threading.Lock()


def cpp_kernels():
    """The built extension (functions linear_t, absorb_query, absorb_value, latent_attention), or None."""
    global _built
    with _lock:
        if _built is None:
            _built = False
            if os.environ.get("MINKE_CPP_KERNELS", "1") != "0":
                try:
                    from torch.utils import cpp_extension
                    name = f"minke_decode_{machine_tag()}"
                    _clear_stale_lock(cpp_extension, name)
                    log.info("minke: building the C++ decode kernels for this machine (first use: about 30 s)")
                    src = os.path.join(os.path.dirname(__file__), "decode.cpp")
                    _built = cpp_extension.load(name=name, sources=[src], verbose=False,
                                                extra_cflags=["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno"])
                except Exception as e:  # noqa: BLE001 - any build failure means: decode without it
                    log.warning("minke: the C++ decode kernels could not be built (%s); torch's paths run instead", e)
    return _built or None


STALE_LOCK_S = 600  # a build takes ~30 s: a lock older than this was left by a process killed mid-build


def _clear_stale_lock(cpp_extension, name: str) -> None:
    """torch's loader waits, forever, while another process holds the build's lock file; one that was
    killed mid-build leaves it behind. Such a lock (older than STALE_LOCK_S) is removed."""
    try:
        lock = os.path.join(cpp_extension._get_build_directory(name, False), "lock")
        if time.time() - os.path.getmtime(lock) > STALE_LOCK_S:
            os.remove(lock)
            log.warning("minke: removed a stale build lock %s", lock)
    except (AttributeError, OSError):  # no lock (the usual case), or a torch without that helper
        pass


def machine_tag() -> str:
    """A short hash of this CPU's model and instruction-set flags."""
    info = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            info += "".join(line for line in f if line.startswith(("model name", "flags", "Features")))[:8192]
    except OSError:
        pass
    return hashlib.sha256(info.encode()).hexdigest()[:10]
