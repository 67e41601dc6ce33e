"""restune.atomic: a file appears whole or not at all, and concurrent writers never share a temporary file."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from restune.atomic import atomic_write, atomic_write_bytes, atomic_write_text


def test_the_file_appears_whole_and_only_at_the_rename(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "result.json"  # the folder is created
    atomic_write_text(target, "old\n")
    seen = []

    def write(tmp: Path) -> None:
        with tmp.open("w") as handle:
            handle.write("new, first half; ")
            handle.flush()
            seen.append(target.read_text())  # a reader during the write sees the old file
            handle.write("second half\n")

    assert atomic_write(target, write) == target
    assert seen == ["old\n"]
    assert target.read_text() == "new, first half; second half\n"
    assert os.listdir(target.parent) == ["result.json"]
    assert atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failing_write_leaves_the_old_file_and_no_temporary(tmp_path: Path, error: type[BaseException]) -> None:
    target = tmp_path / "summary.csv"
    target.write_text("complete old content\n")

    def write(tmp: Path) -> None:
        tmp.write_text("half of the new")
        raise error("disk full")

    with pytest.raises(error):
        atomic_write(target, write)
    assert target.read_text() == "complete old content\n"
    assert os.listdir(tmp_path) == ["summary.csv"]


def test_a_failing_first_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        atomic_write(tmp_path / "x.png", lambda tmp: (_ for _ in ()).throw(ValueError("no figure")))
    assert os.listdir(tmp_path) == []


def test_two_writers_in_one_folder_use_different_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "metrics.jsonl"
    temporaries: list[Path] = []

    def inner(tmp: Path) -> None:
        temporaries.append(tmp)
        tmp.write_text("inner\n")

    def outer(tmp: Path) -> None:
        temporaries.append(tmp)
        tmp.write_text("outer\n")
        atomic_write(target, inner)  # a second writer of the same file while the first is mid-write
        assert tmp.read_text() == "outer\n"  # its temporary was not touched

    atomic_write(target, outer)
    assert len(set(temporaries)) == 2 and all(t.parent == tmp_path for t in temporaries)
    assert target.read_text() == "outer\n"  # the last rename wins, with a complete file
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


def test_concurrent_writers_leave_one_complete_file(tmp_path: Path) -> None:
    target = tmp_path / "suite.json"
    contents = [f"writer {i}\n" * 2000 for i in range(8)]
    threads = [threading.Thread(target=atomic_write_text, args=(target, text)) for text in contents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert target.read_text() in contents
    assert os.listdir(tmp_path) == ["suite.json"]


def test_permissions_are_those_of_a_new_file_unless_given(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open() gives under this process's umask (mkstemp alone would give 0600)
    atomic_write_text(tmp_path / "atomic.txt", "x")
    assert (tmp_path / "atomic.txt").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    atomic_write_bytes(tmp_path / "weights.bin", b"w")
    atomic_write(tmp_path / "shipped.bin", lambda tmp: tmp.write_bytes(b"w"), mode=0o644)
    assert (tmp_path / "shipped.bin").stat().st_mode & 0o777 == 0o644
