"""minke's C++ decode kernels (kernels/decode.cpp), built for this machine on first use.

``cpp_kernels()`` compiles decode.cpp with ``-O3 -march=native`` through torch's extension loader the
first time it is asked (about 25 s; torch caches the build under TORCH_EXTENSIONS_DIR, by default
~/.cache/torch_extensions), naming the build by this CPU's model and instruction-set flags, since a
-march=native build runs only where it was made. Where it cannot be built (no C++ compiler) it logs
why once and returns None, and every caller runs its torch path instead; ``MINKE_CPP_KERNELS=0`` turns
it off. Callers: kernels/linear.py (decode GEMVs), kernels/attention.py (absorbed attention).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading

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
                    from torch.utils.cpp_extension import load
                    src = os.path.join(os.path.dirname(__file__), "decode.cpp")
                    _built = load(name=f"minke_decode_{machine_tag()}", sources=[src],
                                  extra_cflags=["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno"], verbose=False)
                except Exception as e:  # noqa: BLE001 - any build failure means: decode without it
                    log.warning("minke: the C++ decode kernels could not be built (%s); torch's paths run instead", e)
    return _built or None


def machine_tag() -> str:
    """A short hash of this CPU's model and instruction-set flags."""
    info = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            info += "".join(line for line in f if line.startswith(("model name", "flags", "Features")))[:8192]
    except OSError:
        pass
    return hashlib.sha256(info.encode()).hexdigest()[:10]
