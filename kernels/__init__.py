"""shear.kernels: fused Triton kernels for the masked forward and backward passes.

Installed as ``shear.kernels`` (setup.py's package_dir), never as a top-level ``kernels``.
One op per file (``masked_linear``, ``masked_mlp``, ``masked_attention``, ``masked_rms_norm``,
``hard_concrete``, ``linear_kl``): its kernels, launchers, autograd Function, functional API
and the layer the masked model runs (``linear_kl``: the distillation loss, its layer for a
training objective). ``heuristics`` holds every block size / warps / stages choice;
``aot`` compiles every launch for sm_80 and sm_90 without a GPU and checks it. The
plain-PyTorch oracle these kernels must reproduce lives in :mod:`shear.ops`.
"""
