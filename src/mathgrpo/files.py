"""Small file-system facts with one home each: atomic folder and file writes, JSON-lines reading and
appending, and the `<prefix><step>` folders that checkpoints live in. Imports nothing of mathgrpo (the lowest
layer, docs/architecture.md), so every module may use it.

    with atomic_dir(run / "checkpoints" / "checkpoint-10") as tmp:   # written into tmp, renamed at the end
        save(tmp)
    rows = read_jsonl(run / "metrics.jsonl")                         # JsonlError names file and line
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator


# --- atomic writes ----------------------------------------------------------------------------------------

def temp_sibling(target: Path) -> Path:
    """The temp name `atomic_dir` / `atomic_write_text` write under: hidden, beside `target`, per process (so a
    leftover of a killed write is recognisable as `.tmp-<name>-*`)."""
    return target.with_name(f".tmp-{target.name}-{os.getpid()}")


@contextlib.contextmanager
def atomic_dir(target: Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temp folder path beside `target` (not created: `save_pretrained` creates its own) and rename it to
    `target` when the block ends, so a reader never sees a half-written folder. An existing `target` is replaced
    (replace=True) or kept and the new one dropped (replace=False: a cache somebody else filled first). On an
    exception the temp folder is removed and the exception propagates."""
    target = Path(target)
    tmp = temp_sibling(target)
    try:
        yield tmp
        if target.exists() and not replace:
            shutil.rmtree(tmp)
            return
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to a temp file beside `path`, then rename it over `path` (a crash leaves the old file)."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- JSON lines -------------------------------------------------------------------------------------------

class JsonlError(ValueError):
    """A line of a JSON-lines file that is not one JSON object: `path`, `line` (1-based) and `why`."""

    def __init__(self, path, line: int, why: str):
        self.path, self.line, self.why = path, line, why
        super().__init__(f"{path}: line {line}: {why}")


def jsonl_rows(lines: Iterable[str], path, first: int = 1) -> Iterator[tuple[int, str, dict]]:
    """(line number, line, object) for every non-blank line; JsonlError at the first line that is not an object."""
    for lineno, line in enumerate(lines, first):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise JsonlError(path, lineno, f"not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(row, dict):
            raise JsonlError(path, lineno, f"expected a JSON object, got {type(row).__name__}")
        yield lineno, line, row


def read_jsonl(path: Path, text: str | None = None) -> list[dict]:
    """The objects of a JSON-lines file (`text`: its contents when already read, e.g. decoded with care)."""
    if text is None:
        text = Path(path).read_text(encoding="utf-8")
    return [row for _, _, row in jsonl_rows(text.split("\n"), path)]


def append_jsonl(path: Path, row: dict) -> None:
    """Append one object as a line."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


# --- numbered folders -------------------------------------------------------------------------------------

def step_dirs(folder: Path, prefix: str = "checkpoint-") -> list[Path]:
    """The `<prefix><step>` folders in `folder`, oldest step first (none when `folder` does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(f"{prefix}*") if p.is_dir() and p.name[len(prefix):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(prefix):]))
