"""The C++ gather extension (csrc/gather.cpp) and the export backends.

The contract is exact: the extension writes the same bytes as the plain-PyTorch
reference ``shear.export.gather`` (no tolerance anywhere in this file), and a whole
export through the ``cpp`` backend is byte-identical, file by file, to the ``torch``
backend's. The first test run compiles the extension into the shear cache (about 30 s
on 2 cores) unless setup.py built it; later runs load it at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import PER_GROUP_KIND, TINY_TARGETS, make_per_group_masked, make_tiny
from safetensors import safe_open
from safetensors.torch import load_file

import shear.extension as extension
from shear.cli import main
from shear.errors import ShearError
from shear.export import (
    GatherSpec,
    check_spec,
    export_plan,
    export_pruned,
    gather,
    gather_cpp,
    parse_size,
    resolve_backend,
    shard,
    write_safetensors,
)
from shear.masks import MASK_TYPES
from shear.patch import apply_masks

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(scope="module")
def ext():
    """The extension, built once (or loaded from setup.py's build or the cache)."""
    return extension.load_extension()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, for exact comparisons (NaN == NaN, -0 != +0)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _assert_same_bytes(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if not torch.equal(_bits(got), _bits(want)):
        bad = (_bits(got) != _bits(want)).nonzero()[0].item() // want.element_size()
        flat_g, flat_w = got.reshape(-1), want.reshape(-1)
        raise AssertionError(
            f"{what}: element {bad} is {flat_g[bad].item()!r}, reference {flat_w[bad].item()!r}"
        )


def _hard_values(g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """fp32 values that exercise rounding: a wide exponent range, exact bf16 / fp16 ties,
    fp16 overflow and underflow, fp32 denormals, signed zeros."""
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-30, 30, shape, generator=g).float())
    flat = x.view(-1)
    n = flat.numel()
    picks = torch.randint(0, n, (max(1, n // 8),), generator=g)
    # bf16 ties: low 16 bits exactly 0x8000 (odd and even upper halves both occur)
    flat[picks[0::5]] = (flat[picks[0::5]].view(torch.int32) & ~0xFFFF | 0x8000).view(torch.float32)
    flat[picks[1::5]] = 70000.0  # overflows fp16 to inf
    flat[picks[2::5]] = 1e-40  # fp32 denormal
    flat[picks[3::5]] = -0.0
    flat[picks[4::5]] = 3e-8  # fp16 subnormal range
    return x


def _sorted_subset(g: torch.Generator, size: int, runs: bool = False) -> torch.Tensor:
    if runs:  # a few long runs of consecutive indices (the memcpy path)
        cut = sorted(torch.randint(0, size + 1, (4,), generator=g).tolist())
        idx = torch.cat([torch.arange(cut[0], cut[1]), torch.arange(cut[2], cut[3])])
        return idx if len(idx) else torch.tensor([size - 1])
    keep = torch.rand(size, generator=g) < 0.6
    keep[torch.randint(0, size, (1,), generator=g)] = True  # never empty
    return keep.nonzero().flatten()


def _random_specs(seed: int, count: int = 24) -> list[GatherSpec]:
    """Random gathers over every source/output dtype pair, 1-D and 2-D, with and without
    indices and scales; odd sizes, size 1, and one tensor spanning several 1 MiB chunks."""
    g = torch.Generator().manual_seed(seed)
    specs = []
    for k in range(count):
        sdt, odt = DTYPES[k % 3], DTYPES[(k // 3) % 3]
        one_d = k % 4 == 3
        if k == 0:
            shape = (700, 450)  # 700 x 450 kept rows of fp32 > 1 MiB: several chunks
        elif one_d:
            shape = (int(torch.randint(1, 130, (1,), generator=g)),)
        else:
            shape = tuple(int(v) for v in torch.randint(1, 70, (2,), generator=g))
        src = _hard_values(g, shape).to(sdt)
        mode = int(torch.randint(0, 4, (1,), generator=g))
        rows = _sorted_subset(g, shape[0], runs=mode == 1) if mode != 3 else None
        cols = None
        if not one_d and mode != 2:
            cols = _sorted_subset(g, shape[1], runs=mode == 1)
        n_rows = len(rows) if rows is not None else shape[0]
        n_cols = (len(cols) if cols is not None else shape[1]) if not one_d else 1
        row_scale = col_scale = None
        if k % 2:  # scales, with exact zeros as the hard-concrete clamp gives
            row_scale = torch.rand(n_rows, generator=g) * (torch.rand(n_rows, generator=g) > 0.2)
        if not one_d and k % 3 == 1:
            col_scale = torch.rand(n_cols, generator=g) * 3
        specs.append(GatherSpec(f"t{k}", src, rows, cols, row_scale, col_scale, dtype=odt))
    return specs


@pytest.fixture(params=[True, False], ids=["simd", "scalar"])
def simd(ext, request):
    """Both column-gather paths: AVX-512 compress (where the CPU has it) and scalar."""
    on = ext.set_simd(request.param)
    if request.param and not on:
        pytest.skip("this CPU has no AVX-512 VBMI2: only the scalar path exists here")
    yield on
    ext.set_simd(True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gather_matches_the_reference_byte_for_byte(ext, simd, seed):
    specs = _random_specs(seed)
    got = gather_cpp(specs)
    for spec, out in zip(specs, got, strict=True):
        _assert_same_bytes(
            out, gather(spec), f"{spec.name} {spec.src.dtype}->{spec.dtype} {tuple(spec.shape)}"
        )
    # the thread count changes the split of the work, never the bytes
    for spec, out in zip(specs, gather_cpp(specs, num_threads=3), strict=True):
        _assert_same_bytes(out, gather(spec), spec.name)


def test_every_output_element_is_written_and_nan_bits_survive_copies(ext, simd):
    g = torch.Generator().manual_seed(5)
    src = torch.randn(33, 129, generator=g)
    src[::4, ::3] = float("nan")
    src.view(torch.int32)[1, 1] = 0x7F800123  # a NaN with a payload: copied, not canonicalised
    specs = [
        check_spec(GatherSpec("copy", src, torch.arange(0, 33, 2), torch.arange(1, 129, 2))),
        check_spec(GatherSpec("runs", src, None, torch.cat([torch.arange(0, 60), torch.arange(70, 129)]))),
        check_spec(
            GatherSpec("scaled", src.bfloat16(), None, torch.arange(5, 100), torch.rand(33, generator=g))
        ),
    ]
    # Poison: not NaN, since the source holds torch's NaN and an unwritten NaN would pass
    # a bit comparison there; 0xABAB... is a pattern none of these gathers produces.
    outs = [torch.empty(s.shape, dtype=s.dtype or s.src.dtype) for s in specs]
    for o in outs:
        o.view(torch.uint8).fill_(0xAB)
    ext.gather_into(
        [s.src for s in specs],
        [s.rows for s in specs],
        [s.cols for s in specs],
        [s.row_scale for s in specs],
        [s.col_scale for s in specs],
        outs,
        2,
    )
    for spec, out in zip(specs[:2], outs[:2], strict=True):
        _assert_same_bytes(out, gather(spec), spec.name)
    ref = gather(specs[2])
    # NaN bits under a dtype conversion are not part of the contract (torch's own vectorised
    # and scalar fp32 -> bf16 paths disagree on them); that they are NaN is.
    assert torch.equal(outs[2].isnan(), ref.isnan())
    mask = ~ref.isnan()
    assert torch.equal(_bits(outs[2][mask]), _bits(ref[mask]))


def _ext_args(src, rows=None, cols=None, rs=None, cs=None):
    return [src], [rows], [cols], [rs], [cs]


@pytest.mark.parametrize(
    "args,message",
    [
        (_ext_args(torch.zeros(4, 3), rows=torch.tensor([0, 4])), "out of range"),
        (_ext_args(torch.zeros(4, 3), cols=torch.tensor([-1])), "out of range"),
        (_ext_args(torch.zeros(4, 3, dtype=torch.float64)), "supported: float32"),
        (_ext_args(torch.zeros(4, 3).t()), "contiguous"),
        (_ext_args(torch.zeros(4, 3), rows=torch.tensor([0, 1], dtype=torch.int32)), "must be Long"),
        (_ext_args(torch.zeros(4, 3), rs=torch.ones(3)), "expected 4"),
        (_ext_args(torch.zeros(4, 3), cols=torch.tensor([1, 0])), "strictly increasing"),
        (_ext_args(torch.zeros(4), cols=torch.tensor([0])), "1-D"),
        (([torch.zeros(2)], [None, None], [None], [None], [None]), "one entry per tensor"),
    ],
)
def test_the_extension_checks_its_input(ext, args, message):
    """Without the Python validation in front, the C++ checks still refuse bad input
    with a RuntimeError (never a crash)."""
    srcs = args[0]
    outs = [torch.empty(0) for _ in srcs]
    with pytest.raises(RuntimeError, match=message):
        ext.gather_into(*args, outs, 2)


@pytest.mark.parametrize(
    "spec,message",
    [
        (GatherSpec("w", torch.zeros(4, 3), rows=torch.tensor([0, 4])), "index 4 is out of range"),
        (GatherSpec("w", torch.zeros(4, 3), cols=torch.tensor([0, 0, 1])), "sorted and unique"),
        (GatherSpec("w", torch.zeros(4, 3), rows=torch.tensor([2, 1])), "sorted and unique"),
        (GatherSpec("w", torch.zeros(4, 3), rows=torch.tensor([0.0, 1.0])), "must hold integers"),
        (GatherSpec("w", torch.zeros(4, 3), rows=torch.tensor([0, 1]), row_scale=torch.ones(3)), "3 entries"),
        (GatherSpec("w", torch.zeros(4, 3), col_scale=torch.ones(2)), "2 entries"),
        (GatherSpec("w", torch.zeros(4), cols=torch.tensor([0])), "1-D tensor takes no column"),
        (GatherSpec("w", torch.zeros(2, 2, 2)), "only 1-D and 2-D"),
        (GatherSpec("w", torch.zeros(4, 3), dtype=torch.int32), "floating point"),
        (GatherSpec("w", torch.zeros(4, 3, dtype=torch.float64)), "fp32, fp16 and bf16"),
        (GatherSpec("w", torch.zeros(4, 6)[:, ::2]), "not contiguous"),
    ],
)
def test_bad_specs_raise_clear_errors_and_write_nothing(ext, tmp_path, spec, message):
    with pytest.raises(ShearError, match=message):
        gather_cpp([spec])
    with pytest.raises(ShearError, match=message):
        write_safetensors(tmp_path / "x.safetensors", [spec], backend="cpp")
    assert list(tmp_path.iterdir()) == []


def test_files_are_identical_to_the_torch_backend_and_readable(ext, tmp_path):
    specs = _random_specs(7, count=18)
    a = write_safetensors(tmp_path / "cpp.safetensors", specs, backend="cpp")
    b = write_safetensors(tmp_path / "torch.safetensors", specs, backend="torch")
    assert a.read_bytes() == b.read_bytes()  # header, order, padding and data
    loaded = load_file(a)
    for spec in specs:
        _assert_same_bytes(loaded[spec.name], gather(spec), spec.name)
    with safe_open(a, "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpp.safetensors", "torch.safetensors"]


def test_sharding_follows_hugging_face():
    from huggingface_hub import split_torch_state_dict_into_shards

    sizes = [10, 10, 30, 5, 5, 5, 20, 1]  # fp32: 4 bytes each; 30 is alone above 80 bytes
    specs = [GatherSpec(f"w{k}", torch.zeros(n)) for k, n in enumerate(sizes)]
    for limit in (80, 40, 200, "1KB"):
        ours = [[s.name for s in p] for p in shard(specs, limit)]
        hf = split_torch_state_dict_into_shards(
            {s.name: s.src for s in specs}, max_shard_size=limit, filename_pattern="m{suffix}"
        )
        assert ours == list(hf.filename_to_tensors.values()), limit
    assert len(shard(specs)) == 1
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123
    with pytest.raises(ShearError, match="cannot read the size"):
        parse_size("five gigs")


_LOAD = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    for folder, tokens, out in json.loads(sys.argv[1]):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            torch.save(model(torch.tensor(tokens), use_cache=False).logits, out)
    """
)


def _masked(kind: str, seed: int, dtype=torch.float32):
    model = make_tiny(kind, seed=seed).to(dtype)
    masks = apply_masks(model, TINY_TARGETS[kind], types=list(MASK_TYPES))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for la in masks.log_alpha.values():
            la.copy_(torch.randn(la.shape, generator=g) * 2.0)
    return model, masks


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    skip = {"shear_export.json"}
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name not in skip}


def test_cpp_export_loads_and_matches_the_masked_model(ext, tmp_path, tokens, capfd):
    jobs, expected = [], {}
    # the fp32 case keeps both KV groups of the GQA Llama, each group its own query heads
    cases = [("llama_gqa_bias_untied", None, "5GB"), ("qwen2_gqa_bias_tied", torch.bfloat16, "20KB")]
    for kind, dtype, max_shard in cases:
        model, masks = make_per_group_masked(seed=11) if kind == PER_GROUP_KIND else _masked(kind, seed=11)
        with torch.no_grad():
            expected[kind] = model(tokens, use_cache=False).logits
        out = export_pruned(
            model, masks, tmp_path / kind, dtype=dtype, backend="cpp", max_shard_size=max_shard
        )
        assert "shear: export backend: cpp (C++ gather extension" in capfd.readouterr().err
        report = json.loads((out / "shear_export.json").read_text())
        assert report["backend"] == "cpp" and report["backend_detail"].startswith("cpp (")
        ref = export_pruned(
            model, masks, tmp_path / f"{kind}-torch", dtype=dtype, backend="torch", max_shard_size=max_shard
        )
        assert json.loads((ref / "shear_export.json").read_text())["backend_detail"] == "torch (requested)"
        assert _folder_bytes(out) == _folder_bytes(ref)  # every shard and the index: the same bytes
        jobs.append((str(out), tokens.tolist(), str(tmp_path / f"{kind}.pt")))
    # the bf16 export is sharded, with an index as save_pretrained writes it
    folder = tmp_path / "qwen2_gqa_bias_tied"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards
    total, names = 0, set()
    for name in shards:
        with safe_open(folder / name, "pt") as f:
            for key in f.keys():
                assert index["weight_map"][key] == name
                t = f.get_tensor(key)
                assert t.dtype == torch.bfloat16
                total += t.numel() * t.element_size()
                names.add(key)
    assert index["metadata"]["total_size"] == total and names == set(index["weight_map"])
    assert (
        json.loads((folder / "shear_export.json").read_text())["weights"][-1]
        == "model.safetensors.index.json"
    )
    subprocess.run([sys.executable, "-c", _LOAD, json.dumps(jobs)], check=True)
    got = torch.load(jobs[0][2], weights_only=True)
    # the same tolerance as tests/test_export.py: fp32 sums in a different association order
    torch.testing.assert_close(got, expected["llama_gqa_bias_untied"], rtol=0, atol=1e-4)
    got = torch.load(jobs[1][2], weights_only=True)
    assert got.shape == expected["qwen2_gqa_bias_tied"].shape and got.isfinite().all()  # bf16 weights: loads
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failed_writes_leave_nothing(ext, tmp_path):
    model, masks = _masked("mistral_gqa_untied", seed=3)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ShearError, match="cannot write the export"):
        export_pruned(model, masks, blocker / "out", backend="cpp")
    # a write that fails half-way (the file size limit makes pwrite fail with EFBIG)
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_export_cpp import _masked
        from shear.errors import ShearError
        from shear.export import export_pruned
        model, masks = _masked("mistral_gqa_untied", seed=3)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
        for backend in ("cpp", "torch"):
            try:
                export_pruned(model, masks, {str(tmp_path / "out")!r}, backend=backend)
            except ShearError as e:
                print(backend, "failed:", e)
        # the extension's own pwrite error path (the export sizes the file first, so its
        # ftruncate fails before the extension runs)
        import os, torch
        from shear.extension import load_extension
        ext = load_extension()
        fd = os.open({str(tmp_path / "raw")!r}, os.O_WRONLY | os.O_CREAT)
        try:
            ext.gather_to_files([torch.zeros(100, 100)], [None], [None], [None], [None], [ext.FLOAT32],
                                [fd], [0], 2)
        except RuntimeError as e:
            print("extension failed:", e)
        os.close(fd)
        os.remove({str(tmp_path / "raw")!r})
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    out = run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 3, out
    assert lines[0].startswith("cpp failed: ") and "File too large" in lines[0], out
    assert lines[1].startswith("torch failed: ") and "File too large" in lines[1], out
    assert lines[2].startswith("extension failed: shear gather: writing tensor 0 failed: File too large"), out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_backend_choice_is_stated_never_silent(ext, tmp_path, monkeypatch, capfd):
    with pytest.raises(ShearError, match="unknown export backend 'fast'"):
        resolve_backend("fast")
    monkeypatch.setenv("SHEAR_EXPORT_BACKEND", "torch")
    assert resolve_backend().detail == "torch (requested)"
    monkeypatch.setenv("SHEAR_EXPORT_BACKEND", "cuda")
    with pytest.raises(ShearError, match=r"unknown export \$SHEAR_EXPORT_BACKEND"):
        resolve_backend()
    monkeypatch.delenv("SHEAR_EXPORT_BACKEND")
    assert resolve_backend().name == "cpp"
    # auto: a dtype the extension does not handle goes to torch, saying why; cpp refuses it
    fp64 = [GatherSpec("w", torch.zeros(3, dtype=torch.float64))]
    assert resolve_backend("auto", fp64).detail.startswith(
        "torch (C++ extension not applicable: w is torch.float64"
    )
    with pytest.raises(ShearError, match="cannot write this"):
        resolve_backend("cpp", fp64)
    # no extension and no compiler: cpp fails with what to do; auto says why it used torch
    monkeypatch.setattr(extension, "_loaded", None)
    monkeypatch.setattr(extension, "_import_prebuilt", lambda: (None, "not built by setup.py"))
    monkeypatch.setenv("SHEAR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(ShearError, match=r"no C\+\+ compiler found .*apt-get install g\+\+.*backend='torch'"):
        resolve_backend("cpp")
    model, masks = _masked("llama_mha_tied", seed=2)
    out = export_pruned(model, masks, tmp_path / "out")
    detail = json.loads((out / "shear_export.json").read_text())["backend_detail"]
    assert detail.startswith("torch (extension unavailable: ") and "no C++ compiler found" in detail
    assert "shear: export backend: torch (extension unavailable" in capfd.readouterr().err
    status = extension.extension_status()
    assert not status.available and not status.can_build and "no C++ compiler" in status.reason
    assert main(["doctor"]) == 0
    assert "C++ gather extension: unavailable" in capfd.readouterr().out
    assert main(["doctor", "--build"]) == 2
    assert "no C++ compiler found" in capfd.readouterr().err


def test_doctor_reports_the_build(ext, capsys):
    assert main(["doctor", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["extension"]["available"] and r["extension"]["origin"] in (
        "setup.py build",
        "JIT cache",
        "JIT build",
    )
    assert r["export_backend"]["uses"] in ("cpp", "torch (requested)")
    assert main(["doctor"]) == 0
    assert "C++ gather extension: built (" in capsys.readouterr().out


@pytest.mark.parametrize("per_group_heads", [False, True], ids=["kv-pruned", "per-group-heads"])
def test_plan_of_a_real_export_gathers_identically(ext, simd, per_group_heads):
    """Every tensor of a real export plan (all mask types, biases, bf16 output)."""
    model, masks = (
        make_per_group_masked(seed=8) if per_group_heads else _masked("llama_gqa_bias_untied", seed=8)
    )
    plan, _ = export_plan(model, masks)
    for dtype in (None, torch.bfloat16, torch.float16):
        for spec in plan:
            spec.dtype = dtype
        for spec, out in zip(plan, gather_cpp(plan), strict=True):
            _assert_same_bytes(out, gather(spec), f"{spec.name} -> {dtype}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sources_are_gathered_on_the_device(ext):
    specs = _random_specs(3, count=9)
    cuda = [
        GatherSpec(s.name, s.src.cuda(), s.rows, s.cols, s.row_scale, s.col_scale, s.dtype) for s in specs
    ]
    for spec, out in zip(specs, gather_cpp(cuda), strict=True):
        _assert_same_bytes(out, gather(spec), spec.name)


_FOREIGN_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void ran(void) {
    FILE *f = fopen(getenv("SHEAR_TEST_MARKER"), "w");
    if (f) fclose(f);
}
"""


@pytest.fixture
def foreign_cache(tmp_path, monkeypatch):
    """An empty shear cache with no setup.py build in sight, a foreign ``shear_gather.so``
    (its initialisation creates a marker file) and a build that records its calls."""
    monkeypatch.setattr(extension, "_loaded", None)
    monkeypatch.setattr(extension, "_import_prebuilt", lambda: (None, "not built by setup.py"))
    monkeypatch.setenv("SHEAR_CACHE", str(tmp_path / "cache"))
    marker = tmp_path / "foreign-code-ran"
    monkeypatch.setenv("SHEAR_TEST_MARKER", str(marker))
    cache = extension.jit_cache_dir()
    cache.mkdir(parents=True)
    (tmp_path / "foreign.c").write_text(_FOREIGN_C)
    lib = cache / f"{extension.JIT_NAME}.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(tmp_path / "foreign.c")], check=True)
    builds = []

    def build(src, folder, verbose):
        builds.append(folder)
        assert not folder.exists()  # nothing of the foreign build is reused
        return type("Built", (), {"set_bf16_nan": staticmethod(lambda bits: None)})()

    monkeypatch.setattr(extension, "_build", build)
    return cache, lib, marker, builds


@pytest.mark.parametrize("record", ["none", "another library", "other sources"])
def test_a_library_in_the_cache_that_shear_did_not_build_is_never_imported(foreign_cache, record, capfd):
    cache, lib, marker, builds = foreign_cache
    src = extension.source_path()
    if record == "another library":  # a genuine record, the library swapped afterwards
        entry = {"key": extension.build_key(src), "sha256": "0" * 64}
    else:
        entry = {"key": "0" * 64, "sha256": hashlib.sha256(lib.read_bytes()).hexdigest()}
    if record != "none":
        (cache / extension.BUILD_RECORD).write_text(json.dumps(entry))
    status = extension.extension_status()
    assert not status.available and status.origin is None
    extension.load_extension()
    assert not marker.exists(), "the foreign library's code ran"
    assert builds == [cache]
    assert "rebuilding the C++ gather extension" in capfd.readouterr().err


def test_a_cache_others_can_write_is_refused(foreign_cache, capfd):
    cache, lib, marker, builds = foreign_cache
    src = extension.source_path()
    record = {"key": extension.build_key(src), "sha256": hashlib.sha256(lib.read_bytes()).hexdigest()}
    (cache / extension.BUILD_RECORD).write_text(json.dumps(record))
    cache.parent.chmod(0o777)
    with pytest.raises(ShearError, match=r"can be written by other users .*chmod go-w"):
        extension.load_extension()
    assert main(["doctor"]) == 0
    assert "can be written by other users" in capfd.readouterr().out
    assert not marker.exists() and builds == []


@pytest.mark.slow
def test_a_jit_build_is_recorded_and_loaded_from_the_cache(tmp_path):
    """A real build into an empty cache, then a new process loads it from there without compiling."""
    code = (
        "import shear.extension as e; e._import_prebuilt = lambda: (None, 'x'); "
        "e.load_extension(); print(e.extension_status().origin)"
    )
    env = dict(os.environ, SHEAR_CACHE=str(tmp_path / "cache"))
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
            for _ in range(2)]  # fmt: skip
    assert [r.stdout.strip() for r in runs] == ["JIT build", "JIT cache"], runs[0].stderr[-2000:]
    assert "compiling" in runs[0].stderr and "compiling" not in runs[1].stderr
