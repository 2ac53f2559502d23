"""qcore.assets: pinned, verified, cached, fetched again when corrupt, clear when missing."""
import dataclasses
import os
import sys

import pytest

from qcore import assets

VADER_MEMBER = "hutto_ICWSM_2014/tweets_GroundTruth.txt"


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOURSE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_under_the_grader_a_missing_cache_names_the_command(empty_cache, monkeypatch):
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")  # a graded run fetches nothing
    with pytest.raises(assets.AssetError, match="does not fetch them. Run: make setup"):
        assets.path("vader", VADER_MEMBER)
    assert assets.status() == {"minilm": False, "smollm2": False, "vader": False}
    assert not empty_cache.exists()


def test_elsewhere_a_missing_file_is_fetched_on_first_use(empty_cache, monkeypatch, capsys):
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    local = assets.path("vader", VADER_MEMBER)
    assert "vader: fetched vadersentiment==3.3.2" in capsys.readouterr().out
    assert assets.sha256_of(local) == assets.PACKAGES["vader"].files[VADER_MEMBER]
    assert assets.status()["vader"] and not assets.status()["minilm"]  # only what was asked for


def test_fetch_verifies_and_is_idempotent(empty_cache, capsys):
    assets.fetch(["vader"])
    assert "fetched" in capsys.readouterr().out
    local = assets.path("vader", VADER_MEMBER)
    stamp = local.stat().st_mtime_ns
    assets.fetch(["vader"])
    assert "ok (4 files verified)" in capsys.readouterr().out
    assert local.stat().st_mtime_ns == stamp  # nothing rewritten


def test_corrupt_or_partial_file_is_detected_and_fetched_again(empty_cache, monkeypatch):
    assets.fetch(["vader"], verbose=False)
    local = empty_cache / "vader" / VADER_MEMBER
    good = local.read_bytes()
    local.write_bytes(good[: len(good) // 2])  # a partial file
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    with pytest.raises(assets.AssetError, match="corrupt"):
        assets.path("vader", VADER_MEMBER)
    monkeypatch.delenv("NBGRADER_EXECUTION")
    assert assets.path("vader", VADER_MEMBER).read_bytes() == good  # from the cached archive
    # the cached archive is corrupt too: it must be downloaded again, not trusted
    local.write_bytes(b"")
    archive = empty_cache / "downloads" / assets.PACKAGES["vader"].archive
    archive.write_bytes(b"garbage")
    assets.fetch(["vader"], verbose=False)
    assert local.read_bytes() == good
    assert assets.sha256_of(archive) == assets.PACKAGES["vader"].sha256


def test_the_download_bar_follows_the_bytes_written(tmp_path):
    """`_run_with_bar` reports the command's output whatever the bar shows, and the bytes it
    counts are those of the files under the watched folders."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_bytes(b"1234")
    (tmp_path / "y").write_bytes(b"12")
    assert assets._bytes_under([tmp_path / "a", tmp_path / "y", tmp_path / "absent"]) == 6
    write = "import sys; open(sys.argv[1], 'wb').write(b'0' * 5000); print('done'); sys.exit(3)"
    done = assets._run_with_bar([sys.executable, "-c", write, str(tmp_path / "a" / "z")], dict(os.environ),
                                [tmp_path / "a"], 5000, "test")
    assert (done.returncode, done.stdout) == (3, "done\n")
    assert assets._bytes_under([tmp_path / "a"]) == 5004


def test_unexpected_hash_from_the_index_is_refused(empty_cache, monkeypatch):
    bad = dataclasses.replace(assets.PACKAGES["vader"], sha256="0" * 64)
    monkeypatch.setitem(assets.PACKAGES, "vader", bad)
    with pytest.raises(assets.AssetError, match="unexpected sha256"):
        assets.fetch(["vader"], verbose=False)
    assert not (empty_cache / "vader").exists()


def test_no_network_gives_a_clear_error(empty_cache, monkeypatch):
    # an index nobody listens on, and no local mirrors: pip cannot reach anything
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(assets.AssetError, match="could not download vadersentiment"):
        assets.fetch(["vader"], verbose=False)


def test_unknown_member_lists_the_known_ones():
    with pytest.raises(assets.AssetError, match="known"):
        assets.path("vader", "../../etc/passwd")


def test_command_line_status(capsys):
    code = assets.main(["status"])
    out = capsys.readouterr().out
    assert "vader:" in out and code in (0, 1)
    assert assets.main(["nonsense"]) == 2
