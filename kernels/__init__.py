"""shear.kernels: fused Triton kernels for the masked forward and backward passes.

Installed as ``shear.kernels`` (setup.py's package_dir), never as a top-level ``kernels``.
The plain-PyTorch oracle these kernels must reproduce lives in :mod:`shear.ops`.
"""
