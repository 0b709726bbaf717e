"""genkv kernels (installed as ``genkv.kernels``): block-sparse attention over KV block lists and routing.

``block_sparse_attention`` dispatches by device: the Triton kernel (``kernels/block_sparse.py``) on CUDA, compiled
FlexAttention on CUDA where the kernel does not apply (head dims other than 16/32/64/128), and on other devices
gathering each query block's listed key blocks (``kernels/gather.py``: work independent of the cache length);
``GENKV_KERNEL_BACKEND=torch|gather|flex|triton|auto`` (or ``backend=``) forces one (``torch`` is the dense-mask
reference the others are tested against). On an H100 the kernel is
1.1x faster than compiled FlexAttention given a prebuilt ``BlockMask`` and needs no mask build or compilation per
shape (docs/BENCHMARKS.md, issue 3). It runs under ``TRITON_INTERPRET=1`` on CPU for tests.
"""

import os
import sys

if __name__ == "kernels":
    # This folder is genkv.kernels. It is imported as a top-level ``kernels`` only when a checkout's root is on
    # sys.path (``python -c`` / ``python -m`` run from the checkout) and diffusers imports Hugging Face's
    # ``kernels`` package (transformers installs it): hand that import over to the real package. The import
    # statement returns sys.modules["kernels"], so the caller gets the real package, not this file.
    import importlib.machinery
    import importlib.util

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ImportError("no 'kernels' package outside this genkv checkout (genkv's own kernels are genkv.kernels)")
    _real = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _real
    _spec.loader.exec_module(_real)
else:
    from .dispatch import *  # noqa: F401,F403
    from .dispatch import __all__  # noqa: F401
