"""files.py: atomic writes, JSON lines, numbered folders."""

import pytest

from mathgrpo.files import JsonlError, append_jsonl, atomic_dir, atomic_write_text, read_jsonl, step_dirs


def test_atomic_dir_renames_at_the_end_and_replaces(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("new")
        assert not target.exists()  # nothing visible while the block writes
    assert (target / "a.txt").read_text() == "new"
    with atomic_dir(target) as tmp:
        tmp.mkdir()
        (tmp / "b.txt").write_text("newer")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp folder left


def test_atomic_dir_keeps_the_existing_folder_when_asked(tmp_path):
    target = tmp_path / "cache"
    target.mkdir()
    (target / "first.txt").write_text("1")
    with atomic_dir(target, replace=False) as tmp:
        tmp.mkdir()
        (tmp / "second.txt").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    assert [p.name for p in target.iterdir()] == ["first.txt"]


def test_atomic_dir_removes_its_temp_folder_on_error(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(target) as tmp:
            tmp.mkdir()
            (tmp / "half").write_text("x")
            raise OSError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert (target / "old.txt").read_text() == "old"  # the previous folder is kept


def test_atomic_write_text(tmp_path):
    p = tmp_path / "config.yaml"
    p.write_text("old")
    atomic_write_text(p, "new")
    assert p.read_text() == "new" and [q.name for q in tmp_path.iterdir()] == ["config.yaml"]


def test_jsonl_round_trip_and_errors(tmp_path):
    p = tmp_path / "m.jsonl"
    append_jsonl(p, {"step": 1, "x": 0.5})
    append_jsonl(p, {"step": 2, "text": "é"})
    assert read_jsonl(p) == [{"step": 1, "x": 0.5}, {"step": 2, "text": "é"}]
    assert read_jsonl(p, text='{"a": 1}\n\n{"a": 2}\n') == [{"a": 1}, {"a": 2}]  # blank lines skipped
    with pytest.raises(JsonlError, match=r"m\.jsonl: line 2: not valid JSON") as err:
        read_jsonl(p, text='{"a": 1}\n{"a": \n')
    assert err.value.line == 2
    with pytest.raises(JsonlError, match=r"line 1: expected a JSON object, got list"):
        read_jsonl(p, text="[1, 2]\n")


def test_step_dirs_sorted_by_step(tmp_path):
    for name in ("checkpoint-10", "checkpoint-9", "checkpoint-x", ".tmp-checkpoint-11-5", "other"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-12").write_text("a file, not a folder")
    assert [p.name for p in step_dirs(tmp_path)] == ["checkpoint-9", "checkpoint-10"]
    assert step_dirs(tmp_path / "missing") == []
