"""Student submissions as an LMS exports them: a folder or a zip, one notebook per student.

Accepted layouts (the student id comes from the file or folder name)::

    SUBMISSIONS/alice.ipynb                  -> alice
    SUBMISSIONS/lab01_precision_formats_bob.ipynb or bob_lab01_precision_formats.ipynb -> bob
    SUBMISSIONS/carol/<anything>.ipynb       -> carol   (one notebook in the folder)

A zip is checked entry by entry before anything is written: an absolute path, a ``..``
component or a link is refused with a clear error, and nothing is extracted.
"""
from __future__ import annotations

import re
import stat
import zipfile
from pathlib import Path, PurePosixPath

_ID_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
MAX_NOTEBOOK_BYTES = 50 * 2**20


class SubmissionError(ValueError):
    """The submissions as a whole cannot be used (unsafe zip, no notebooks, clashing ids)."""


def student_id(name: str, lab: str) -> str:
    """A safe student id from a file or folder name, with the lab name taken off.

    Example:
        >>> student_id("lab01_precision_formats_Bob Smith.ipynb", "lab01_precision_formats")
        'Bob_Smith'
        >>> student_id("alice", "lab01_precision_formats")
        'alice'
    """
    stem = name[:-6] if name.endswith(".ipynb") else name
    for affix in (f"{lab}_", f"{lab}-"):
        if stem.startswith(affix):
            stem = stem[len(affix):]
    for affix in (f"_{lab}", f"-{lab}"):
        if stem.endswith(affix):
            stem = stem[: -len(affix)]
    return _ID_CHARS.sub("_", stem).strip("._-")


def check_zip(path: Path) -> list[zipfile.ZipInfo]:
    """The zip's entries, after refusing absolute paths, ``..`` components and links."""
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise SubmissionError(f"{path} is not a readable zip file: {e}") from None
    with zf:
        infos = zf.infolist()
    for info in infos:
        name = info.filename.replace("\\", "/")
        parts = PurePosixPath(name).parts
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts:
            raise SubmissionError(f"{path}: refusing unsafe entry {info.filename!r} "
                                  "(absolute path or '..'); nothing was extracted")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise SubmissionError(f"{path}: refusing symbolic link {info.filename!r}; nothing was extracted")
    return infos


def extract_zip(path: Path, dest: Path) -> Path:
    """Extract a checked zip into ``dest`` (only after every entry passed ``check_zip``)."""
    infos = check_zip(path)
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path) as zf:
        for info in infos:
            if info.is_dir() or "__MACOSX" in info.filename:
                continue
            target = dest / PurePosixPath(info.filename.replace("\\", "/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                out.write(src.read(MAX_NOTEBOOK_BYTES + 1))
    return dest


def collect(folder: Path, lab: str) -> dict[str, Path]:
    """``{student id: notebook path}`` for a folder of submissions.

    Raises ``SubmissionError`` when two notebooks claim one id or no notebook is found.
    """
    found: dict[str, Path] = {}

    def add(sid: str, nb: Path) -> None:
        if not sid:
            raise SubmissionError(f"cannot derive a student id from {nb}")
        if sid in found:
            raise SubmissionError(f"two submissions for student {sid!r}: {found[sid]} and {nb}")
        found[sid] = nb

    entries = sorted(p for p in Path(folder).iterdir() if not p.name.startswith((".", "__MACOSX")))
    # a zip often wraps everything in one top folder: look inside it when it holds several
    if len(entries) == 1 and entries[0].is_dir():
        inner = [p for p in entries[0].iterdir() if p.is_dir() or p.suffix == ".ipynb"]
        if len(inner) > 1:
            entries = sorted(inner)
    for entry in entries:
        if entry.is_file() and entry.suffix == ".ipynb":
            add(student_id(entry.name, lab), entry)
        elif entry.is_dir():
            notebooks = sorted(p for p in entry.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
            preferred = [p for p in notebooks if p.name == f"{lab}.ipynb"]
            if preferred or len(notebooks) == 1:
                add(student_id(entry.name, lab), (preferred or notebooks)[0])
            elif notebooks:
                raise SubmissionError(f"{entry} holds several notebooks and none is named {lab}.ipynb")
    if not found:
        raise SubmissionError(f"no notebooks found in {folder}")
    return found
