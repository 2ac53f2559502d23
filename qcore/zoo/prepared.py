"""The models the labs load, prepared once: their cache folders, built on first use, written atomically.

Each prepared model is a folder ``<cache>/models/<name>`` holding what ``from_pretrained`` reads
plus ``qcourse.json`` (where it came from, how it was made). The folder is written as
``<name>.partial`` and renamed at the end, so a crash never leaves a half-written model where a
lab would load it. A missing one is built where it is first loaded, by the same function that
``make setup`` runs; under the grader it is an ``AssetError`` naming that command instead.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Callable, Iterator

from qcore import assets

META_FILE = "qcourse.json"


def model_dir(name: str) -> Path:
    """Where the prepared model ``name`` lives (whether or not it is there).

    Example:
        >>> model_dir("x").relative_to(assets.cache_dir()).as_posix()
        'models/x'
    """
    return assets.cache_dir() / "models" / name


def read_meta(name: str) -> dict | None:
    """The ``qcourse.json`` of a prepared model, or ``None`` when it is not prepared."""
    file = model_dir(name) / META_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def prepared_dir(name: str, what: str, prepare: Callable[[], object] | None = None) -> Path:
    """The folder of a prepared model, built by ``prepare()`` when it is missing (not under the grader).

    Without ``prepare``, or where nothing is prepared on first use (``assets.fetch_on_first_use``),
    a missing model is an ``AssetError`` naming ``make setup``.

    Example:
        >>> prepared_dir("no-such-model", "the model")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        qcore.assets.AssetError: the model is not prepared in .../models/no-such-model. Run: make setup ...
    """
    path = model_dir(name)
    if not (path / META_FILE).is_file() and prepare is not None and assets.fetch_on_first_use():
        from qcore.train import random_state_kept

        with random_state_kept():  # the lab's later cells draw what they would have drawn anyway
            prepare()
    if not (path / META_FILE).is_file():
        raise assets.AssetError(f"{what} is not prepared in {path}. Run: {assets.SETUP_COMMAND}")
    return path


@contextlib.contextmanager
def writing(name: str, meta: dict) -> Iterator[Path]:
    """Write a prepared model: the block saves into the folder it is given; at its end ``meta``
    is written and the folder replaces ``model_dir(name)`` in one rename. On an error nothing is
    replaced and the partial folder is removed."""
    out = model_dir(name)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        for f in tmp.rglob("*"):  # readable by every user: graders run kernels as users of their own
            f.chmod(0o755 if f.is_dir() else 0o644)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
