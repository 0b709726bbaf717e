"""genkv kernels (installed as ``genkv.kernels``): block-sparse attention over KV block lists and routing.

``block_sparse_attention`` dispatches by device (``auto_backend``): the Triton kernel (``kernels/block_sparse.py``) on
CUDA, compiled FlexAttention on CUDA where the kernel does not apply (float32, head dims other than 16/32/64/128)
unless the call resumes from a partial (``initial``), returns the LSE or reads a quantized history, which flex
cannot, and gathering each query block's listed key blocks (``kernels/gather.py``: work independent of the cache
length) for those calls and on other devices;
``GENKV_KERNEL_BACKEND=torch|gather|flex|triton|auto`` (or ``backend=``) forces one (``torch`` is the dense-mask
reference the others are tested against). On an H100 the kernel is
1.1x faster than compiled FlexAttention given a prebuilt ``BlockMask`` and needs no mask build or compilation per
shape (docs/BENCHMARKS.md, issue 3). It runs under ``TRITON_INTERPRET=1`` on CPU for tests.
"""

import os
import sys


def _real_kernels_package(search_path: list[str]):
    """What ``import kernels`` should give instead of this folder: Hugging Face's package if it is on
    ``search_path``, else an empty stand-in with no ``__file__`` and no version, which transformers and diffusers
    read as "not installed" (their test for a folder that merely shadows a package name)."""
    import importlib.machinery
    import importlib.util
    import types

    spec = importlib.machinery.PathFinder.find_spec("kernels", search_path)
    if spec is None or spec.loader is None:
        stand_in = types.ModuleType("kernels", "not installed: genkv's kernels/ folder is genkv.kernels")
        stand_in.__file__ = None
        stand_in.__path__ = []
        return stand_in, None
    return importlib.util.module_from_spec(spec), spec


if __name__ == "kernels":
    # This folder is genkv.kernels. It is imported as a top-level ``kernels`` only when a checkout's root is on
    # sys.path (``python -c`` / ``python -m`` run from the checkout) and transformers or diffusers look for Hugging
    # Face's ``kernels`` package. Hand that import over: the import statement returns sys.modules["kernels"].
    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _module, _spec = _real_kernels_package([p for p in sys.path if os.path.abspath(p or os.getcwd()) != _checkout])
    sys.modules["kernels"] = _module
    if _spec is not None:
        _spec.loader.exec_module(_module)
else:
    from .dispatch import *  # noqa: F401,F403
    from .dispatch import __all__  # noqa: F401
