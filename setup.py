"""Install shear. The top-level ``kernels/`` folder installs as ``shear.kernels``.

Install torch first (``pip install torch==2.13.0``, or the CUDA build on a GPU machine),
then ``pip install -c constraints.txt --no-build-isolation -e ".[dev]"`` so that nothing pulls another
torch (constraints.txt pins the versions the suite was tested with).

The C++ gather extension (``csrc/gather.cpp``, module ``shear._gather``) is compiled here
when torch is importable and a C++ compiler works (ninja is used when it is on PATH). If
not, the install still succeeds with a warning, and ``shear.extension`` compiles the
extension into the shear cache on first use instead (``shear doctor`` tells which).
"""

import hashlib
import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
GATHER_SOURCE = os.path.join("csrc", "gather.cpp")


def _extension_args():
    """``ext_modules`` and ``cmdclass`` for the C++ gather extension, or nothing."""
    if os.environ.get("SHEAR_NO_EXTENSION"):
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("shear: torch is not importable at build time; the C++ gather extension will be "
              "compiled on first use (install with --no-build-isolation to build it now)",
              file=sys.stderr)  # fmt: skip
        return {}

    class OptionalBuildExtension(BuildExtension):
        """Never fail the install over the extension: warn, and leave it to the JIT build."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as e:  # noqa: BLE001 (compiler missing or failing: any error)
                self._skip(e)

        def _skip(self, error):
            for ext in self.extensions:
                ext.optional = True  # setuptools then skips copying the missing file in place
            print(f"shear: WARNING: the C++ gather extension was not compiled ({type(error).__name__}: "
                  f"{str(error).strip().splitlines()[-1] if str(error).strip() else ''}); it will be "
                  "compiled on first use, see `shear doctor`", file=sys.stderr)  # fmt: skip

    with open(os.path.join(HERE, GATHER_SOURCE), "rb") as f:
        digest = "h" + hashlib.sha256(f.read()).hexdigest()[:16]  # as shear.extension.source_hash
    ext = CppExtension(
        "shear._gather",
        [GATHER_SOURCE],
        # the flags of shear.extension.CXX_FLAGS
        extra_compile_args=["-O3", "-ffp-contract=off", f"-DSHEAR_GATHER_SOURCE_HASH={digest}"],
        optional=True,
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension}}


def _setup_args() -> dict:
    """The extension's arguments, with the ``build_py`` that places ``shear.kernels``' init."""
    args = _extension_args()
    args["cmdclass"] = {**args.get("cmdclass", {}), "build_py": BuildPy}
    return args


def _packages() -> tuple[list[str], dict[str, str]]:
    """Every package under ``shear/`` and ``kernels/`` (as ``shear.kernels``), found, never listed
    by hand; ``csrc/`` rides along as ``shear.csrc`` so that an installed shear can compile the
    extension on first use (see shear.extension.source_path)."""
    packages = ["shear"] + [f"shear.{p}" for p in find_packages("shear", exclude=["kernels", "kernels.*"])]
    packages += ["shear.kernels"] + [f"shear.kernels.{p}" for p in find_packages("kernels")]
    package_dir = {"shear": "shear", "shear.kernels": "kernels", "shear.csrc": "csrc"}
    return packages + ["shear.csrc"], package_dir


PACKAGES, PACKAGE_DIR = _packages()


class BuildPy(build_py):
    """``shear.kernels`` takes its modules from ``kernels/`` and its ``__init__.py`` from
    ``shear/kernels/``: ``kernels/`` has none, so that from the checkout's root it never
    shadows Hugging Face's top-level ``kernels`` (see shear/kernels/__init__.py)."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package == "shear.kernels":
            modules.append((package, "__init__", os.path.join("shear", "kernels", "__init__.py")))
        return modules

    def check_package(self, package, package_dir):
        return None if package == "shear.kernels" else super().check_package(package, package_dir)

setup(
    name="shear",
    version="0.1.0",
    description="Targeted structured pruning (Sheared LLaMA) of LLaMA-family models with fused kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # ``kernels/`` must never install as a top-level ``kernels`` module: that name
    # belongs to Hugging Face's kernels package, which transformers probes.
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"shear": ["py.typed"], "shear.csrc": ["*.cpp"]},
    # Lower bounds only: the tested versions are pinned in constraints.txt, which the README's
    # commands and CI install with; a user who brings newer releases is not blocked.
    install_requires=[
        "torch>=2.6",  # FSDP2's public fully_shard
        "triton>=3.6",  # the oldest Triton the kernels are compiled with
        "numpy",
        "transformers>=5",
        "datasets",
        "safetensors",
        "gguf",
        "accelerate",
        "tqdm",
        "matplotlib",
        "ninja",
    ],
    extras_require={
        # the tests exercise the optional integrations too
        "dev": ["pytest", "pytest-benchmark", "ruff", "lm-eval>=0.4", "tensorboard>=2.10"],
        "eval": ["lm-eval>=0.4"],
        "tensorboard": ["tensorboard>=2.10"],
    },
    entry_points={"console_scripts": ["shear=shear.cli:main"]},
    **_setup_args(),
)
