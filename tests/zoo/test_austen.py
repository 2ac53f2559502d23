"""qcore.zoo.austen: R's serialization and lazy-load database read in Python, the .deb, the novels.

The parser is checked against bytes written out by hand from R's format (what ``serialize(x, NULL)``
writes), the .deb reader against an archive built here, the fetch's fallbacks with stand-ins, and
the whole against the real package where it is cached (skipped, with the reason, where it is not).
"""
import gzip
import hashlib
import io
import struct
import tarfile
import zlib

import pytest

from qcore import assets
from qcore.zoo import austen as A


def ints(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def char(s: str, flags: int = 9 | 64 << 12) -> bytes:  # CHARSXP, ASCII-marked as R writes it
    return ints(flags, len(s.encode())) + s.encode()


HEADER2 = b"X\n" + ints(2, 0x040201, 0x020300)                    # format 2, R 4.2.1, readable by 2.3.0
HEADER3 = b"X\n" + ints(3, 0x040201, 0x030500, 5) + b"UTF-8"      # format 3 names the native encoding
NIL = ints(254)


def test_character_vector_with_na_as_r_writes_it():
    # serialize(c("a", NA, "é"), NULL, version = 2): STRSXP of 3 CHARSXPs, NA has length -1
    data = HEADER2 + ints(16, 3) + char("a") + ints(9, -1) + char("é", 9 | 8 << 12)
    assert A.read_r(data) == ["a", None, "é"]
    # the same in format 3, and a latin-1 marked string
    assert A.read_r(HEADER3 + ints(16, 1) + ints(9 | 4 << 12, 1) + b"\xe9") == ["é"]


def test_named_list_numbers_and_symbol_references():
    # serialize(list(n = 1:2, x = 2.5, s = "s"), NULL): VECSXP with a names attribute (flag 1 << 9),
    # the attribute a pairlist with tags (1 << 10) whose first tag is the symbol `names`
    names = ints(16, 3) + char("n") + char("x") + char("s")
    data = (HEADER3 + ints(19 | 1 << 9, 3) + ints(13, 2, 1, 2) + ints(14, 1) + struct.pack(">d", 2.5)
            + ints(16, 1) + char("s") + ints(2 | 1 << 10, 1) + char("names") + names + NIL)
    assert A.read_r(data) == {"n": [1, 2], "x": [2.5], "s": ["s"]}
    # pairlist(a = TRUE, a = NULL): the second tag is a reference (REFSXP, index 1 above the type)
    pairs = HEADER2 + ints(2 | 1 << 10, 1) + char("a") + ints(10, 1, 1) + ints(2 | 1 << 10, 1 << 8 | 255) + NIL + NIL
    assert A.read_r(pairs) == {"a": None}  # both tags read as "a"; a dict keeps the last
    assert A.read_r(HEADER2 + NIL) is None


def test_unsupported_input_is_a_clear_error():
    with pytest.raises(ValueError, match="XDR"):
        A.read_r(b"A\n" + ints(2, 0, 0))                       # the ASCII format
    with pytest.raises(ValueError, match="R type 3"):
        A.read_r(HEADER2 + ints(3))                            # a closure
    with pytest.raises(ValueError, match="truncated"):
        A.read_r(HEADER2 + ints(16, 2) + char("only one"))


def lazyload_db(objects: dict[str, bytes]) -> tuple[bytes, bytes]:
    """An rdb of zlib records and its gzip'd index, as R's makeLazyLoadDB writes them."""
    rdb, variables = b"", []
    for name, body in objects.items():
        record = ints(len(body)) + zlib.compress(body)
        variables.append((name, ints(13, 2, len(rdb), len(record))))
        rdb += record
    names = ints(16, len(variables)) + b"".join(char(n) for n, _ in variables)
    var_list = ints(19 | 1 << 9, len(variables)) + b"".join(v for _, v in variables)
    var_list += ints(2 | 1 << 10, 1) + char("names") + names + NIL
    index = (HEADER2 + ints(19 | 1 << 9, 3) + var_list + ints(19, 0) + ints(10, 1, 1)
             + ints(2 | 1 << 10, 1 << 8 | 255))  # attribute `names`: a reference to the symbol above
    index += ints(16, 3) + char("variables") + char("references") + char("compressed") + NIL
    return rdb, gzip.compress(index)


def test_lazyload_database_round_trip():
    first = HEADER2 + ints(16, 2) + char("line one") + char("")
    second = HEADER2 + ints(16, 1) + char("x" * 1000)
    rdb, rdx = lazyload_db({"first": first, "second": second})
    assert A.read_lazyload(rdb, rdx, "second") == ["x" * 1000]
    assert A.read_lazyload(rdb, rdx, "first") == ["line one", ""]
    with pytest.raises(KeyError, match="first"):
        A.read_lazyload(rdb, rdx, "third")


def test_paragraphs_join_hard_wraps():
    lines = ["", "CHAPTER 1", "", "It is a truth universally", "acknowledged, that a single", None,
             "  However little  ", "known", ""]
    assert A.paragraphs(lines) == ("CHAPTER 1\n\nIt is a truth universally acknowledged, that a single"
                                   "\n\nHowever little known")


def fake_deb(files: dict[str, bytes], odd: bool = True) -> bytes:
    """An ar archive: debian-binary, control.tar.xz, data.tar.xz (odd sizes get a padding byte)."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    out = b"!<arch>\n"
    for name, body in [("debian-binary", b"2.0\n"), ("control.tar.xz", b"c" * (3 if odd else 4)),
                       ("data.tar.xz", tar_bytes.getvalue())]:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode() + body
        out += b"\n" * (len(body) % 2)
    return out


def test_deb_member_reads_data_tar():
    deb = fake_deb({"usr/share/a.txt": b"alpha", "usr/share/b.txt": b"beta"})
    assert A.deb_member(deb, "usr/share/b.txt") == b"beta"
    with pytest.raises(ValueError, match="ar header"):
        A.deb_member(b"PK\x03\x04", "x")


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOURSE_CACHE", str(tmp_path))
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    return tmp_path


def test_a_package_that_cannot_be_had_names_every_source_and_the_command(empty_cache, monkeypatch):
    def no_apt(cmd, **kw):
        raise FileNotFoundError("apt-get")

    wrong = empty_cache / "wrong.deb"
    wrong.write_bytes(fake_deb({}))
    monkeypatch.setattr(A.subprocess, "run", no_apt)
    monkeypatch.setattr(A, "DEB_URLS", (wrong.as_uri(), (empty_cache / "missing.deb").as_uri()))
    with pytest.raises(assets.AssetError) as info:
        A.fetch_austen(verbose=False)
    message = str(info.value)
    assert "apt-get download r-cran-janeaustenr=1.0.0-1" in message and "unexpected sha256 (refused)" in message
    assert "missing.deb" in message and "make setup" in message
    assert not A.austen_ready() and not (empty_cache / "austen").exists()


def test_under_the_grader_nothing_is_fetched(empty_cache, monkeypatch):
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    monkeypatch.setattr(A, "fetch_austen", lambda **kw: pytest.fail("fetched under the grader"))
    with pytest.raises(assets.AssetError, match=r"Run: make setup +\(or: python -m qcore\.zoo prepare\)"):
        A.load_austen()


# ----------------------------------------------------------------------------- the real package
def skip_unless_cached():
    if not (A.austen_ready() and (assets.cache_dir() / "downloads" / A.DEB).is_file()):
        pytest.skip(f"the Jane Austen package is not cached in {assets.cache_dir()}: "
                    "run `python -m qcore.zoo prepare` (it runs `apt-get download r-cran-janeaustenr=1.0.0-1`)")


@pytest.fixture(scope="module")
def real_deb() -> bytes:
    """The cached .deb's bytes (read before a test's ``empty_cache`` moves the cache)."""
    skip_unless_cached()
    return (assets.cache_dir() / "downloads" / A.DEB).read_bytes()


def test_the_http_fallback_fetches_and_verifies_the_package(real_deb, empty_cache, monkeypatch):
    def no_apt(cmd, **kw):
        raise OSError("no apt-get here")

    source = empty_cache / "pool" / A.DEB
    source.parent.mkdir()
    source.write_bytes(real_deb)
    monkeypatch.setattr(A.subprocess, "run", no_apt)
    monkeypatch.setattr(A, "DEB_URLS", ((empty_cache / "nothing").as_uri(), source.as_uri()))
    A.fetch_austen(verbose=False)
    assert A.austen_ready() and (empty_cache / "downloads" / A.DEB).is_file()
    assert sorted(p.name for p in (empty_cache / "austen").iterdir()) == ["Rdata.rdb", "Rdata.rdx"]


@pytest.fixture(scope="module")
def books():
    skip_unless_cached()
    return A.load_austen()


def test_the_six_novels(books):
    assert list(books) == list(A.NOVELS.values())
    assert books["Pride and Prejudice"].split("\n\n")[3].startswith(
        "It is a truth universally acknowledged, that a single man in possession of a good fortune")
    assert books["Persuasion"].startswith("Persuasion\n\nby\n\nJane Austen") and books["Emma"].endswith("FINIS")
    for title, text in books.items():
        paragraphs = text.split("\n\n")
        assert 400_000 < len(text) < 900_000, title
        assert all(p and p == p.strip() and "\n" not in p for p in paragraphs), title
        assert 1_000 < len(paragraphs) < 6_000, title  # joined lines: far fewer paragraphs than lines


def test_the_cached_files_and_the_deb_have_the_pinned_hashes(real_deb):
    assert hashlib.sha256(real_deb).hexdigest() == A.DEB_SHA256
    for member, sha in A.MEMBERS.items():
        assert assets.sha256_of(A.austen_dir() / member) == sha
