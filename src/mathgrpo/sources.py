"""Reading a data source into rows (dicts keyed by column name): a parquet/jsonl/json/csv file, a folder of them
(the files of one split when their names carry split names; a `hf_config` sub-folder first), a folder written by
`save_to_disk`, or anything else through `datasets.load_dataset`. Every error is a `DataError` naming the file and
line (or the dataset, split and cause). data.py maps the rows' columns, extracts the gold answers and filters.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Callable

from .files import JsonlError, read_jsonl


class DataError(ValueError):
    """A data source that cannot be used; the message names the file, line or column at fault."""


def _read_text(path: Path) -> str:
    """The file as text; not UTF-8 is an error naming the line and byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); "
                        f"convert the file to UTF-8") from None


def _read_jsonl(path: Path) -> list[dict]:
    try:
        return read_jsonl(path, text=_read_text(path))
    except JsonlError as e:
        raise DataError(str(e)) from None


def _read_json(path: Path) -> list[dict]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line, named .json
            return _read_jsonl(path)
        raise DataError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1 and all(isinstance(r, dict) for r in lists[0]):  # {"data": [{...}, ...]}
            data = lists[0]
        elif data and len(lists) == len(data) and len({len(v) for v in lists}) == 1:  # columnar {col: [...]}
            data = [dict(zip(data, vals)) for vals in zip(*data.values())]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects (or JSON lines), got a {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: item {i}: expected a JSON object, got {type(row).__name__}")
    return data


def _read_csv(path: Path) -> list[dict]:
    # the csv module, not pandas: pandas silently takes a first column as the index when the first row has
    # one field more than the header (an unquoted comma), shifting every column. Everything stays text.
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), strict=True)
    rows = []
    try:
        header = next(reader, None)
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(header):
                raise DataError(f"{path}: line {reader.line_num}: {len(fields)} fields, but the header has "
                                f"{len(header)} ({', '.join(header)}); quote a value that holds a comma")
            rows.append(dict(zip(header, fields)))
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: not a readable CSV file: {e}") from None
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file: {e}") from None


READERS: dict[str, Callable[[Path], list[dict]]] = {
    ".parquet": _read_parquet, ".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
}

# Split names in file names, as the hub lays them out (aliases -> canonical name).
_SPLIT_ALIASES = {"train": "train", "training": "train", "test": "test", "testing": "test", "eval": "test",
                  "evaluation": "test", "validation": "validation", "valid": "validation", "val": "validation",
                  "dev": "validation"}


def _split_of(rel: Path) -> str | None:
    for part in reversed(rel.with_suffix("").parts):  # the file name decides before its folders
        for word in re.split(r"[^a-z0-9]+", part.lower()):
            if word in _SPLIT_ALIASES:
                return _SPLIT_ALIASES[word]
    return None


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _read_saved(folder: Path, split: str) -> tuple[list[dict], str]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:  # noqa: BLE001 - any failure here means an unreadable saved dataset
        raise DataError(f"{folder}: not a readable saved dataset: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{folder}: saved dataset has no split '{split}'; splits found: {', '.join(ds)} "
                            f"(set data.hf_split)")
        return ds[split].to_list(), f"saved dataset {folder} (split {split})"
    return ds.to_list(), f"saved dataset {folder}"


def _check_fit(folder: Path, tables: dict[Path, list[dict]], columns: dict[str, str]) -> None:
    """A folder is read as one table: a file without a mapped column that other files have (another layout) is
    an error naming it, not its rows dropped one by one under the folder's row numbers."""
    found = {p: set().union(*rows) if rows else set() for p, rows in tables.items()}
    for key, col in columns.items():
        having = [p for p in tables if col in found[p]]
        lacking = [p for p in tables if tables[p] and col not in found[p]]
        if having and lacking:
            p = lacking[0]
            raise DataError(f"{p}: no column '{col}' ({key}), which {having[0].relative_to(folder)} has; its columns: "
                            f"{', '.join(sorted(found[p])) or '(none)'}. The files of folder {folder} are read as "
                            f"one table: give them the same columns, or move this one out")


def _read_folder(folder: Path, split: str, config: str | None, columns: dict[str, str] | None = None
                 ) -> tuple[list[dict], str]:
    if config and (folder / config).is_dir():
        folder = folder / config
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in READERS
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise DataError(f"{folder}: no {'/'.join(s[1:] for s in READERS)} files in this folder")
    splits = {p: _split_of(p.relative_to(folder)) for p in files}
    skipped: list[Path] = []
    if any(splits.values()):
        want = _SPLIT_ALIASES.get(split.lower(), split.lower())
        chosen = [p for p in files if splits[p] == want]
        if not chosen:
            found = sorted({s for s in splits.values() if s})
            raise DataError(f"{folder}: no files for split '{split}'; splits found in file names: "
                            f"{', '.join(found)} (set data.hf_split)")
        skipped = [p for p in files if p not in chosen]
        files = chosen
    tables = {p: READERS[p.suffix.lower()](p) for p in files}
    _check_fit(folder, tables, columns or {})
    rows = [row for table in tables.values() for row in table]
    desc = f"folder {folder}: {', '.join(str(p.relative_to(folder)) for p in files)}"
    if skipped:
        desc += f" (split {split}; not read: {', '.join(str(p.relative_to(folder)) for p in skipped)})"
    return rows, desc


def _looks_like_path(source: str) -> bool:
    # "owner/name" is a hub id unless "owner" is a local folder.
    parent = Path(source).expanduser().parent
    return (source.startswith((".", "/", "~")) or "\\" in source or (parent != Path(".") and parent.is_dir())
            or any(source.lower().endswith(s) for s in READERS))


def read_source(source: str, split: str = "train", config: str | None = None,
                columns: dict[str, str] | None = None) -> tuple[list[dict], str]:
    """Rows of any non-built-in source, and a one-line description of what was read. `columns` (config key ->
    column name) are the mapped columns: a folder's file lacking one that its other files have is an error."""
    path = Path(source).expanduser()
    if path.is_file():
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise DataError(f"{path}: unsupported file type '{path.suffix}'; use one of "
                            f"{', '.join(READERS)} (or a folder of them)")
        return reader(path), f"file {path}"
    if path.is_dir():
        return _read_saved(path, split) if _is_saved_dataset(path) else _read_folder(path, split, config, columns)
    if _looks_like_path(source):
        raise DataError(f"data file not found: {source}")
    import datasets

    try:
        ds = datasets.load_dataset(source, config, split=split)
    except Exception as e:  # noqa: BLE001 - hub/spec failures come in many types; keep the cause
        raise DataError(f"could not load '{source}' (not a local file or folder; as a HF dataset "
                        f"with config={config!r}, split={split!r}: {type(e).__name__}: {e})") from None
    return ds.to_list(), f"HF dataset {source} (config {config}, split {split})"


def read_rows(source: str, *, hf_split: str = "train", hf_config: str | None = None) -> list[dict]:
    """The raw rows of a file, folder, saved dataset or HF dataset, as dicts keyed by column name."""
    return read_source(source, hf_split, hf_config)[0]
