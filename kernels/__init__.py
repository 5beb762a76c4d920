"""shear.kernels: fused Triton kernels for the masked forward and backward passes.

Installed as ``shear.kernels`` (setup.py's package_dir), never as a top-level ``kernels``.
One op per file (``masked_linear``, ``masked_mlp``, ``masked_attention``, ``masked_rms_norm``,
``hard_concrete``, ``linear_kl``): its kernels, launchers, autograd Function, functional API
and the layer the masked model runs (``linear_kl``: the distillation loss, its layer for a
training objective). ``heuristics`` holds every block size / warps / stages choice;
``aot`` compiles every launch for sm_80 and sm_90 without a GPU and checks it. The
plain-PyTorch oracle these kernels must reproduce lives in :mod:`shear.ops`.
"""

import sys

if __name__ == "kernels":
    # Python puts the working directory first on sys.path (`python -c`, `python -m`, a notebook),
    # so from a checkout's root this folder is found as a top-level ``kernels``. That name belongs
    # to Hugging Face's kernels package, which transformers and setuptools import: load the next
    # ``kernels`` on the path in this module's place, or fail as if the folder were absent.
    import importlib.machinery
    import importlib.util
    import os

    def _is_shear_checkout(entry: str) -> bool:
        init = os.path.join(entry or os.curdir, "kernels", "__init__.py")
        try:
            with open(init, encoding="utf-8") as f:
                return f.read(len(__doc__) + 3).startswith('"""' + __doc__.split("\n")[0])
        except OSError:
            return False

    _path = [p for p in sys.path if isinstance(p, str) and not _is_shear_checkout(p)]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # the import statement returns what sys.modules holds
    if _spec.loader is not None:
        _spec.loader.exec_module(_module)
