"""Bad input through the command line: one ``shear: error: ...`` line, exit status 2, no traceback,
and nothing written, whatever the option, target, config, weights or data file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from shear.cli import main
from shear.data import find_sources

TARGET = "layers=2,hidden=48,heads=2,kv_heads=1,intermediate=64"


def _refused(argv, capsys, message: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("shear: error: ") and message in last, err[-2000:]
    return last


@pytest.mark.parametrize(
    "options,message",
    [
        (["--stop-after", "0"], "stop_after must be positive, got 0"),
        (["--min-lr-ratio", "-3"], "min_lr_ratio must be in [0, 1], got -3.0"),
        (["--min-lr-ratio", "1.5"], "min_lr_ratio must be in [0, 1]"),
        (["--max-grad-norm", "-1"], "max_grad_norm must be positive, got -1.0"),
        (["--max-grad-norm", "nan"], "max_grad_norm must be positive, got nan"),
        (["--lr-masks", "-1"], "lr_masks must be a finite number >= 0, got -1.0"),
        (["--lr-weights", "-1"], "lr_weights must be a finite number >= 0"),
        (["--lr-weights", "nan"], "lr_weights must be a finite number >= 0, got nan"),
        (["--lr-lambdas", "inf"], "lr_lambdas must be a finite number >= 0, got inf"),
        (["--eval-sequences", "0"], "eval_sequences must be positive"),
        (["--device", "tpu"], "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        (["--domain-weights", '{"code": -1}'], "domain_weights must be finite and >= 0"),
        (["--reference-losses", '{"code": NaN}'], "reference_losses must be finite"),
        (["--target", "intermediate=64.7"], "target intermediate must be an integer, got '64.7'"),
        (["--target", "layers=2,layers=3"], "the target names layers twice (layers and layers)"),
        (["--target", "layers=2,num_hidden_layers=3"], "names layers twice (layers and num_hidden_layers)"),
    ],
)
def test_bad_run_options(tiny_source, data_dir, tmp_path, capsys, options, message):
    out = tmp_path / "run"
    argv = [
        "prune",
        "--model",
        tiny_source,
        "--target",
        TARGET,
        "--data",
        data_dir,
        "--out",
        str(out),
        *options,
    ]
    _refused(argv, capsys, message)
    assert not out.exists()


def test_cuda_asked_for_where_there_is_none(tiny_source, data_dir, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "run"
    argv = ["train", "--model", tiny_source, "--data", data_dir, "--out", str(out), "--device", "cuda"]
    _refused(argv, capsys, "--device cuda: no CUDA device is available here")
    assert not out.exists()


@pytest.mark.parametrize(
    "content,message",
    [
        ("[24, 384]", "holds list, not a JSON object of sizes"),
        ('"layers=2"', "holds str, not a JSON object of sizes"),
        ('"5"', "holds str"),
        ("5", "holds int"),
        ("null", "holds null"),
        (None, "target intermediate_size must be an integer, got 64.7"),
        (b"\xff\xfe{}", "is not valid JSON"),
    ],
)
def test_bad_target_files(tiny_source, data_dir, tmp_path, capsys, content, message):
    target = tmp_path / "target.json"
    if content is None:
        cfg = json.loads(Path(tiny_source, "config.json").read_text())
        target.write_text(json.dumps({**cfg, "num_hidden_layers": 2, "intermediate_size": 64.7}))
    elif isinstance(content, bytes):
        target.write_bytes(content)
    else:
        target.write_text(content)
    out = tmp_path / "run"
    argv = ["prune", "--model", tiny_source, "--target", str(target), "--data", data_dir, "--out", str(out)]
    _refused(argv, capsys, message)
    assert not out.exists()


def test_missing_options_and_bad_budgets(tiny_source, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    _refused(
        ["prune", "--target", TARGET, "--data", data_dir, "--out", str(out)], capsys, "--model is required"
    )
    _refused(["train", "--out", str(out)], capsys, "--model, --data are required")
    demo = tmp_path / "demo"
    _refused(["demo", "--out", str(demo), "--prune-steps", "-1"], capsys, "steps must be at least 0, got -1")
    _refused(["demo", "--out", str(demo), "--train-steps", "0"], capsys, "steps must be at least 1, got 0")
    _refused(["demo", "--out", str(demo), "--num-workers", "-1"], capsys, "num_workers must be >= 0")
    for option in ("--batch-size", "--eval-sequences"):
        _refused(
            ["eval", "--model", tiny_source, "--data", data_dir, option, "0"], capsys, f"{option} must be at"
        )
    assert not out.exists() and not demo.exists()


def test_bad_configs(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_bytes(b'{"model_type": "llama", "name": "\xe9t\xe9"}')
    _refused(["info", str(config)], capsys, "is not UTF-8 text, so not a JSON config")
    sizes = dict(
        hidden_size=50, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100
    )
    config.write_text(json.dumps(dict(model_type="llama", **sizes)))
    _refused(["info", str(config)], capsys, "not a valid LlamaConfig: Class validation error")


@pytest.fixture(scope="module")
def weights_folder(tiny_source, tmp_path_factory):
    """A small Llama folder with the tiny source's tokenizer and intact safetensors."""
    folder = tmp_path_factory.mktemp("weights") / "model"
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      vocab_size=49152, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(folder)
    for f in Path(tiny_source).iterdir():
        if f.name.startswith("tokenizer"):
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


def test_damaged_weights(weights_folder, data_dir, tmp_path, capsys):
    good = (weights_folder / "model.safetensors").read_bytes()
    marker = tmp_path / "pickle-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    cases = {
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "garbage": os.urandom(2048),
        "header only": good[:8] + b"{" * 16,
    }
    for name, data in cases.items():
        folder = tmp_path / name.replace(" ", "-")
        folder.mkdir()
        for f in weights_folder.iterdir():
            (folder / f.name).write_bytes(data if f.name == "model.safetensors" else f.read_bytes())
        _refused(
            ["eval", "--model", str(folder), "--data", data_dir], capsys, "could not load the weights in"
        )
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in weights_folder.iterdir():
        if f.name != "model.safetensors":
            (pickled / f.name).write_bytes(f.read_bytes())
    torch.save({"model.embed_tokens.weight": Payload()}, pickled / "pytorch_model.bin")
    last = _refused(
        ["eval", "--model", str(pickled), "--data", data_dir],
        capsys,
        "it holds Python objects besides tensors and numbers; refused unread, nothing in it ran",
    )
    assert "weights_only=False" not in last and "weights_only" not in last  # no advice to run it
    assert not marker.exists()  # refused, not run
    save_file({"x": torch.zeros(2)}, tmp_path / "ok.safetensors")  # the library itself is fine


def _domain(folder: Path, name: str, text: str = "Plenty of words in a row. " * 400) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.txt").write_text(text)
    return folder / f"{name}.txt"


def test_bad_data_files(weights_folder, tmp_path, capsys):
    data = tmp_path / "data"
    _domain(data, "prose")
    (data / "blob.jsonl").write_bytes(b'{"text": "fine"}\n' + os.urandom(64) + b"\xff\n")
    _refused(
        ["eval", "--model", str(weights_folder), "--data", str(data)], capsys, "blob.jsonl:2: not UTF-8 text"
    )
    (data / "blob.jsonl").unlink()
    (data / "gone").symlink_to(tmp_path / "nowhere")
    _refused(["eval", "--model", str(weights_folder), "--data", str(data)], capsys, "which does not exist")
    (data / "gone").unlink()
    (data / "code" / "inner").mkdir(parents=True)
    _domain(data / "code", "a")
    (data / "code" / "inner" / "loop").symlink_to(data / "code")
    _refused(["eval", "--model", str(weights_folder), "--data", str(data)], capsys, "a loop")


def test_symbolic_links_in_data_folders_follow_one_rule(tmp_path):
    """Followed everywhere, to wherever they lead; never dropped silently."""
    outside = tmp_path / "elsewhere"
    _domain(outside / "books", "austen")
    _domain(outside / "more-code", "b")
    data = tmp_path / "data"
    _domain(data / "code", "a")
    (data / "books").symlink_to(outside / "books")  # a domain at the top
    (data / "wiki.txt").symlink_to(_domain(outside, "wiki"))  # a single-file domain
    (data / "code" / "linked").symlink_to(outside / "more-code")  # a folder inside a domain
    (data / "code" / "c.txt").symlink_to(outside / "more-code" / "b.txt")  # a file inside a domain
    (data / ".hidden").mkdir()  # hidden: passed over at every level
    _domain(data / "code" / ".cache", "skipped")
    sources = {s.name: [f.relative_to(data).as_posix() for f in s.files] for s in find_sources(data)}
    assert sources == {
        "books": ["books/austen.txt"],
        "code": ["code/a.txt", "code/c.txt", "code/linked/b.txt"],
        "wiki": ["wiki.txt"],
    }


def test_input_that_is_not_what_it_claims(tiny_source, weights_folder, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    prune = ["prune", "--model", tiny_source, "--data", data_dir, "--out", str(out)]
    huge = "a" * 100_000  # neither a file nor sizes: the refusal does not print it whole
    for target in (huge, "/" + huge):
        assert main([*prune, "--target", target]) in (1, 2)
        err = capsys.readouterr().err
        assert err.startswith("shear: error: ") and "characters left out" in err, err[:300]
        assert len(err) < 3000
    # a run folder where a model is expected: named, with the model to pass instead
    run = tmp_path / "a-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "m", "shear_run": {"task": "prune", "cwd": "/"}}))
    _refused(["eval", "--model", str(run), "--data", data_dir], capsys,
             f"{run} is the folder of a `shear prune` run, not a model: pass its model, {run / 'export'} "
             f"(not written yet: `shear export {run}` writes it)")  # fmt: skip
    (run / "export").mkdir()
    last = _refused(["train", "--model", str(run), "--data", data_dir, "--out", str(out)], capsys,
                    f"pass its model, {run / 'export'}")  # fmt: skip
    assert last.endswith(str(run / "export"))
    # sequences longer than the model's positions (2048 for these Llamas)
    message = "--seq-len 4096 is longer than the model's max_position_embeddings (2048)"
    evaluate = ["eval", "--model", str(weights_folder), "--data", data_dir]
    _refused([*evaluate, "--seq-len", "4096"], capsys, message)
    _refused([*prune, "--target", TARGET, "--seq-len", "4096"], capsys, message)
    assert not out.exists()


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("bin.txt", b"GIF89a\x00\x01" + os.urandom(256), "bin.txt is a binary file (a NUL byte at byte 6)"),
        ("latin.txt", "caf\u00e9 cr\u00e8me ".encode("latin-1") * 50, "latin.txt: not UTF-8 text (invalid"),
        ("blank.jsonl", b"\n  \n\n", "blank.jsonl holds no JSON records (it is empty or blank)"),
    ],
)
def test_data_files_that_are_not_text(weights_folder, tmp_path, capsys, name, content, message):
    data = tmp_path / "data"
    _domain(data, "prose")
    (data / name).write_bytes(content)
    _refused(["eval", "--model", str(weights_folder), "--data", str(data)], capsys, message)


def test_a_load_error_leaves_no_run_folder(tiny_source, weights_folder, data_dir, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in weights_folder.iterdir():
        data = f.read_bytes()
        (damaged / f.name).write_bytes(data[: len(data) // 2] if f.name == "model.safetensors" else data)
    empty = tmp_path / "no-text"
    empty.mkdir()
    (empty / "prose.txt").write_text("   \n")
    out = tmp_path / "runs" / "run"
    train = ["train", "--out", str(out), "--fixed"]
    _refused([*train, "--model", str(damaged), "--data", data_dir], capsys, "could not load the weights")
    assert not out.exists()
    _refused([*train, "--model", tiny_source, "--data", str(empty)], capsys, "has no text")
    assert not out.exists()
    prune = ["prune", "--model", tiny_source, "--target", TARGET, "--data", str(empty), "--out", str(out)]
    _refused(prune, capsys, "has no text")
    assert not out.exists()
    out.mkdir()  # a folder the user made is left where it is
    _refused(prune, capsys, "has no text")
    assert out.is_dir()
