"""Submissions as LMS exports them: ids, layouts, and zips that try to escape."""
import zipfile

import pytest

from qcourse.submissions import SubmissionError, collect, extract_zip, student_id

LAB = "lab01_precision_formats"


@pytest.mark.parametrize("name,expected", [
    ("alice.ipynb", "alice"), (f"{LAB}_bob.ipynb", "bob"), (f"carol_{LAB}.ipynb", "carol"),
    ("Dan Brown (2).ipynb", "Dan_Brown_2"), ("eve", "eve"),
])
def test_student_ids(name, expected):
    assert student_id(name, LAB) == expected


def test_collect_files_and_folders(tmp_path):
    (tmp_path / "alice.ipynb").write_text("{}")
    (tmp_path / "bob").mkdir()
    (tmp_path / "bob" / "whatever.ipynb").write_text("{}")
    (tmp_path / "carol" / ".ipynb_checkpoints").mkdir(parents=True)
    (tmp_path / "carol" / f"{LAB}.ipynb").write_text("{}")
    (tmp_path / "carol" / "scratch.ipynb").write_text("{}")
    (tmp_path / "carol" / ".ipynb_checkpoints" / f"{LAB}-checkpoint.ipynb").write_text("{}")
    found = collect(tmp_path, LAB)
    assert sorted(found) == ["alice", "bob", "carol"]
    assert found["carol"].name == f"{LAB}.ipynb"


def test_collect_refuses_clashing_ids(tmp_path):
    (tmp_path / "alice.ipynb").write_text("{}")
    (tmp_path / f"{LAB}_alice.ipynb").write_text("{}")
    with pytest.raises(SubmissionError, match="two submissions"):
        collect(tmp_path, LAB)


def test_collect_empty_folder(tmp_path):
    with pytest.raises(SubmissionError, match="no notebooks"):
        collect(tmp_path, LAB)


def test_zip_with_one_top_folder(tmp_path):
    z = tmp_path / "export.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("export/alice.ipynb", "{}")
        zf.writestr("export/bob.ipynb", "{}")
        zf.writestr("__MACOSX/export/._alice.ipynb", "junk")
    out = extract_zip(z, tmp_path / "x")
    assert sorted(collect(out, LAB)) == ["alice", "bob"]


@pytest.mark.parametrize("evil", ["../escape.ipynb", "/etc/evil.ipynb", "a/../../b.ipynb", "C:/win.ipynb"])
def test_zip_slip_is_refused_and_nothing_written(tmp_path, evil):
    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("alice.ipynb", "{}")
        zf.writestr(evil, "{}")
    dest = tmp_path / "out"
    with pytest.raises(SubmissionError, match="unsafe entry"):
        extract_zip(z, dest)
    assert not dest.exists()
    assert not (tmp_path / "escape.ipynb").exists()


def test_zip_symlink_is_refused(tmp_path):
    z = tmp_path / "link.zip"
    info = zipfile.ZipInfo("alice.ipynb")
    info.external_attr = (0o120777 << 16)
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(SubmissionError, match="symbolic link"):
        extract_zip(z, tmp_path / "out")


def test_not_a_zip(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_text("nope")
    with pytest.raises(SubmissionError, match="not a readable zip"):
        extract_zip(bad, tmp_path / "out")
