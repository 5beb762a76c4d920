"""shear.kernels: fused Triton kernels for the masked forward and backward passes.

One op per file (``masked_linear``, ``masked_mlp``, ``masked_attention``, ``masked_rms_norm``,
``hard_concrete``, ``linear_kl``): its kernels, launchers, autograd Function, functional API
and the layer the masked model runs (``linear_kl``: the distillation loss, its layer for a
training objective). ``heuristics`` holds every block size / warps / stages choice;
``aot`` compiles every launch for sm_80 and sm_90 without a GPU and checks it. The
plain-PyTorch oracle these kernels must reproduce lives in :mod:`shear.ops`.

The modules live in the checkout's top-level ``kernels/`` folder, which has no
``__init__.py`` of its own: from the checkout's root Python also finds that folder as a
top-level ``kernels``, a name that belongs to Hugging Face's package (transformers and
setuptools import it), and a folder without ``__init__.py`` never wins over an installed
package. This file is the package's initialisation instead: an install (setup.py) puts it
beside the modules; in a checkout (the source tree, an editable install) it adds the
top-level folder to the package's path.
"""

import os as _os

_checkout_kernels = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.dirname(__file__))), "kernels")
if not _os.path.isfile(_os.path.join(__path__[0], "heuristics.py")) and _os.path.isfile(
    _os.path.join(_checkout_kernels, "heuristics.py")
):
    __path__.append(_checkout_kernels)
