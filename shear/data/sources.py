"""Where a run's text comes from: domain folders or a saved Hugging Face dataset, read with ``datasets``.

Two layouts are accepted:

* a folder with one entry per domain: a sub-folder (every ``.txt``, ``.jsonl``
  and ``.parquet`` file under it) or a single such file (the domain is the file's stem).
  A ``.txt`` file is one document; ``.jsonl`` records and ``.parquet`` rows
  carry a ``text`` column. Files of other kinds are not data and are passed over.
  Symbolic links are followed wherever they are (a domain at the top, or a file or folder
  inside a domain) and wherever they lead; a link that leads nowhere, or into a loop, is
  an error naming it, so no domain or file is ever dropped silently. Names starting with
  a dot are hidden and passed over at every level;
* a dataset saved with ``Dataset.save_to_disk`` (or a ``DatasetDict``: its ``train``
  split) with a text column and a domain column.

:func:`find_sources` only lists the inputs and fingerprints them (file paths, sizes and
modification times), so the tokenisation cache can tell whether anything changed;
:func:`read_domain` reads one domain's documents.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shear.errors import ShearError

#: File suffix -> ``datasets`` builder.
BUILDERS = {".txt": "text", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class DomainSource:
    """One domain's input.

    Attributes:
        name: the domain.
        files: its files (folder layout), sorted; empty for a saved dataset.
        dataset: the saved dataset's folder (saved-dataset layout), else None.
        fingerprint: a hash of the domain's files (paths, sizes, modification times) or of
            the saved dataset's fingerprint and columns.
    """

    name: str
    files: tuple[Path, ...]
    dataset: Path | None
    fingerprint: str


@dataclass(frozen=True)
class DataSpec:
    """How to read a data path: which column holds the text and which the domain."""

    text_column: str = "text"
    domain_column: str = "domain"


#: The default columns: ``text`` and ``domain``.
DEFAULT_SPEC = DataSpec()


def _file_key(path: Path, root: Path) -> str:
    # Path, size and modification time, as make does: hashing the content would read every
    # byte of the data at each start, minutes for a large corpus.
    try:
        st = path.stat()
    except OSError as e:
        raise ShearError(f"cannot read {path}: {e}") from e
    return f"{path.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}"


def is_saved_dataset(path: Path) -> bool:
    """True for a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _load_saved(path: Path) -> Any:
    import datasets

    with _quiet_datasets():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # datasets raises several types for a damaged folder
            raise ShearError(f"cannot load the saved dataset {path}: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            return ds["train"]
        if len(ds) == 1:
            return next(iter(ds.values()))
        raise ShearError(f"{path} holds splits {list(ds)}; shear reads the 'train' split and found none")
    return ds


def find_sources(path: str | Path, spec: DataSpec = DEFAULT_SPEC) -> list[DomainSource]:
    """List the domains of a data path, with content fingerprints.

    Args:
        path: a domain folder or a saved Hugging Face dataset (see the module docstring).
        spec: column names.

    Returns:
        The domains, sorted by name.

    Raises:
        ShearError: a missing path, no domains, an empty domain folder, or a saved dataset
            without the text or domain column.
    """
    root = Path(path)
    if not root.is_dir():
        raise ShearError(f"data folder not found: {root}")
    if is_saved_dataset(root):
        ds = _load_saved(root)
        for col in (spec.text_column, spec.domain_column):
            if col not in ds.column_names:
                raise ShearError(
                    f"the saved dataset {root} has columns {ds.column_names}; it needs a {col!r} column "
                    f"(the text and the domain of each row)"
                )
        names = sorted({str(d) for d in ds.unique(spec.domain_column)})
        base = f"{ds._fingerprint}:{spec.text_column}:{spec.domain_column}"
        sources = [
            DomainSource(n, (), root, hashlib.sha256(f"{base}:{n}".encode()).hexdigest()) for n in names
        ]
    else:
        sources = []
        for entry in sorted(root.iterdir()):
            if entry.name.startswith("."):
                continue
            _check_link(entry)
            if entry.is_dir():
                files = tuple(sorted(_data_files(entry, (os.path.realpath(root),))))
                if not files:
                    raise ShearError(
                        f"domain {entry.name!r} in {root} has no {'/'.join(BUILDERS)} files ({entry})"
                    )
                name = entry.name
            elif entry.suffix in BUILDERS and entry.is_file():
                files, name = (entry,), entry.stem
            else:
                continue
            h = hashlib.sha256(f"{spec.text_column}".encode())
            for f in files:
                h.update(f"{_file_key(f, root)}\n".encode())
            sources.append(DomainSource(name, files, None, h.hexdigest()))
    if not sources:
        raise ShearError(
            f"{root} holds no domains: add one sub-folder or .txt/.jsonl/.parquet file per domain, "
            f"or give a saved Hugging Face dataset with a {spec.domain_column!r} column"
        )
    dup = sorted({s.name for s in sources if [t.name for t in sources].count(s.name) > 1})
    if dup:
        raise ShearError(f"{root}: domain(s) {dup} appear twice (a folder and a file of the same name?)")
    return sources


def _check_link(entry: Path) -> None:
    """Raise ShearError for a symbolic link that leads nowhere."""
    if entry.is_symlink() and not entry.exists():
        raise ShearError(
            f"{entry} is a symbolic link to {os.readlink(entry)}, which does not exist (or is a loop); "
            "fix or remove it"
        )


def _data_files(folder: Path, above: tuple[str, ...]) -> list[Path]:
    """Every data file under ``folder``, following symbolic links (see the module docstring).

    Args:
        folder: a domain folder or a folder inside one.
        above: real paths of the folders above it, to catch a link that loops back.
    """
    real = os.path.realpath(folder)
    if real in above:
        raise ShearError(
            f"{folder} is a symbolic link back into a folder above it (a loop); fix or remove it"
        )
    files = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        _check_link(entry)
        if entry.is_dir():
            files += _data_files(entry, (*above, real))
        elif entry.suffix in BUILDERS and entry.is_file():
            files.append(entry)
    return files


def _check_text(file: Path) -> None:
    """A clear error for a .txt file that is not UTF-8 text (binary, another encoding), before
    ``datasets`` reports it less plainly; read in pieces, so any size is checked."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(file, "rb") as f:
        while True:
            piece = f.read(1 << 20)
            if b"\0" in piece:
                where = offset + piece.index(0)
                raise ShearError(f"{file} is a binary file (a NUL byte at byte {where}), not text")
            try:
                decoder.decode(piece, final=not piece)
            except UnicodeDecodeError as e:
                raise ShearError(
                    f"{file}: not UTF-8 text ({e.reason} near byte {offset + max(e.start, 0)}); convert it, "
                    "e.g. `iconv -f latin1 -t utf-8`"
                ) from None
            if not piece:
                return
            offset += len(piece)


def _check_jsonl(file: Path, column: str) -> None:
    """A clear error for a malformed line or a file without records, before ``datasets``
    reports it less plainly."""
    records = 0
    with open(file, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ShearError(
                    f"{file}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of the line)"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ShearError(f"{file}:{n}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get(column), str):
                raise ShearError(f'{file}:{n}: each .jsonl line needs a string "{column}" field')
            records += 1
    if records == 0:
        raise ShearError(f"{file} holds no JSON records (it is empty or blank); fill it or remove it")


def read_domain(source: DomainSource, spec: DataSpec = DEFAULT_SPEC) -> Any:
    """Read one domain's documents with ``datasets``.

    Args:
        source: from :func:`find_sources`.
        spec: column names.

    Returns:
        A ``datasets.Dataset`` with one column, ``text``, one row per non-blank document.

    Raises:
        ShearError: unreadable files, a missing text column, or no text at all.
    """
    import datasets

    with _quiet_datasets():
        if source.dataset is not None:
            ds = _load_saved(source.dataset)
            ds = ds.filter(lambda d: str(d) == source.name, input_columns=spec.domain_column)
            ds = ds.select_columns([spec.text_column])
            parts = [ds if spec.text_column == "text" else ds.rename_column(spec.text_column, "text")]
        else:
            by_builder: dict[str, list[str]] = {}
            for f in source.files:
                if f.suffix == ".jsonl":
                    _check_jsonl(f, spec.text_column)
                elif f.suffix == ".txt":
                    _check_text(f)
                by_builder.setdefault(BUILDERS[f.suffix], []).append(str(f))
            parts = []
            for builder, files in by_builder.items():
                extra = {"sample_by": "document"} if builder == "text" else {}
                try:
                    part = datasets.load_dataset(builder, data_files=files, split="train", **extra)
                except Exception as e:  # pyarrow / json errors surface as many types
                    raise ShearError(f"cannot read domain {source.name!r} ({builder} files): {e}") from e
                column = "text" if builder == "text" else spec.text_column
                if column not in part.column_names:
                    raise ShearError(
                        f"domain {source.name!r}: {builder} files have columns {part.column_names}, "
                        f"no {column!r}"
                    )
                part = part.select_columns([column])
                parts.append(part if column == "text" else part.rename_column(column, "text"))
        ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        ds = ds.filter(lambda t: isinstance(t, str) and bool(t.strip()), input_columns="text")
    if len(ds) == 0:
        where = source.dataset or (source.files[0].parent if len(source.files) > 1 else source.files[0])
        raise ShearError(f"domain {source.name!r} has no text ({where})")
    return ds
