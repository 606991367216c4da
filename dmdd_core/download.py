"""Download the public datasets onto a networked machine (Colab, a workstation): fetch, verify, extract.

Nothing in the package downloads implicitly. Training and evaluation only read folders that already exist; a
download happens only when asked for, through this module or the ``dmdd download`` command. On a machine
without internet access every function here fails within seconds and says exactly where to put the files by
hand instead.

What a download does (:func:`download_dataset`):

1. if ``ROOT/<folder>`` holds the marker file :data:`MARKER_NAME`, the dataset is complete: it is returned at
   once, with no network access;
2. the archive is streamed into ``ROOT/<archive>.part`` (:func:`download`). An interrupted transfer keeps the
   ``.part`` file and the next call resumes it with an HTTP ``Range`` request;
3. its SHA-256 checksum is checked; only then is ``.part`` renamed to the archive's name;
4. the archive is unpacked into a staging folder beside ``ROOT/<folder>`` and moved into place in one step
   (:func:`extract`), so an interrupted or failed extraction leaves nothing at the destination; the marker is
   written inside before the move;
5. the archive is deleted (unless asked to keep it) and ``ROOT/<folder>`` is returned: the folder to pass as
   ``--data``.

Layouts after extraction (``ROOT/<folder>`` is the dataset root):

MVTec AD (``mvtec``, folder ``mvtec_anomaly_detection``)::

    ROOT/<category>/train/good/*.png
    ROOT/<category>/test/<type>/*.png                  <type> is "good" or a defect type
    ROOT/<category>/ground_truth/<type>/<stem>_mask.png

VisA (``visa``, folder ``visa``)::

    ROOT/<category>/Data/Images/Normal/*.JPG
    ROOT/<category>/Data/Images/Anomaly/*.JPG
    ROOT/<category>/Data/Masks/Anomaly/*.png
    ROOT/split_csv/1cls.csv                            the standard one-class split

DTD, the Describable Textures Dataset (``dtd``, folder ``dtd``)::

    dtd/images/<class>/*.jpg                           47 texture classes; use dtd/images as the texture folder

MPDD (``mpdd``, folder ``mpdd``; no stable direct address, set it up by hand)::

    ROOT/<category>/train/good/*.png                   same layout as MVTec AD
    ROOT/<category>/test/<type>/*.png
    ROOT/<category>/ground_truth/<type>/<stem>_mask.png

Addresses and checksums come from anomalib's dataset modules (openvinotoolkit/anomalib, now
open-edge-platform/anomalib) and the datasets' own pages; see :data:`DOWNLOADS`.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import http.client
import ipaddress
import json
import logging
import lzma
import os
import re
import shlex
import shutil
import socket
import sys
import tarfile
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm.auto import tqdm

from dmdd_core.catalog import DOWNLOADS, DownloadSource
from dmdd_core.config import progress_disabled

__all__ = [
    "MARKER_NAME",
    "DOWNLOADS",
    "DownloadError",
    "DownloadSource",
    "DownloadUnavailable",
    "IncompleteDownload",
    "download",
    "download_dataset",
    "extract",
    "file_sha256",
    "get_source",
    "manual_instructions",
    "progress_enabled",
    "read_marker",
]

log = logging.getLogger(__name__)

MARKER_NAME = ".dmdd_download.json"
"""File written inside a dataset folder once its extraction is complete."""

USER_AGENT = "dmdd-download/1 (Python urllib)"

_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class DownloadError(RuntimeError):
    """A download did not succeed; the message says why and what to do."""


class DownloadUnavailable(DownloadError):
    """The dataset cannot be downloaded from here: no stable address, the host cannot be reached, or the server
    refused. The message says how to get the files by hand and where to put them."""

    def __init__(self, message: str, *, url: str | None = None, http_status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.http_status = http_status
        """The HTTP status the server answered with, or None when it was not reached at all."""


class IncompleteDownload(DownloadError):
    """The transfer stopped before the end; the ``.part`` file is kept and running again resumes it."""


class _RestartFromZero(Exception):
    """Internal: the server cannot continue the saved partial file, so start again from byte 0."""


# --- small helpers -------------------------------------------------------------------------------------------


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc


def get_source(name: str) -> DownloadSource:
    """The registry entry called ``name``; a ValueError lists the known names otherwise."""
    try:
        return DOWNLOADS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DOWNLOADS)}") from None


def progress_enabled(progress: bool | None = None) -> bool:
    """Whether to show progress bars: ``progress`` when given, else on unless DMDD_FAST=1 or CI is set."""
    return not progress_disabled(progress)


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file's contents, as 64 lower-case hex digits."""
    digest = hashlib.sha256()
    _hash_into(digest, Path(path), chunk_size)
    return digest.hexdigest()


def _hash_into(digest: Any, path: Path, chunk_size: int = 1 << 20) -> None:
    """Feed the contents of ``path`` into ``digest``."""
    with path.open("rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)


def _normalise_sha256(sha256: str | None) -> str | None:
    """``sha256`` in lower case, checked to be 64 hex digits; None stays None."""
    if sha256 is None:
        return None
    value = sha256.strip().lower()
    if not _SHA256_RE.fullmatch(value):
        raise ValueError(f"not a SHA-256 checksum (64 hex digits): {sha256!r}")
    return value


def _part_path(dest: Path) -> Path:
    """Where the bytes of ``dest`` are written until they are verified."""
    return dest.with_name(dest.name + ".part")


def _human_size(size: int) -> str:
    """A byte count for people: 4.9 GiB, 596.3 MiB."""
    if size >= 1 << 30:
        return f"{size / (1 << 30):.1f} GiB"
    return f"{size / (1 << 20):.1f} MiB"


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The contents of the completion marker in ``folder``, or None when the folder has no readable marker
    (so its extraction is not known to be complete)."""
    path = Path(folder) / MARKER_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --- manual instructions -------------------------------------------------------------------------------------


def manual_instructions(
    source: str | DownloadSource,
    root: str | Path,
    *,
    url: str | None = None,
    sha256: str | None = None,
    reason: str | None = None,
) -> str:
    """Step-by-step text for setting a dataset up by hand under ``root``: what to download, where to extract it
    (the exact folder and its expected layout) and what to pass to dmdd. ``url`` and ``sha256`` replace the
    registry's address and checksum; ``reason`` comes first when given."""
    src = get_source(source) if isinstance(source, str) else source
    base = Path(root).expanduser()
    target = base / src.folder
    address = url or src.url
    checksum = sha256 or src.sha256
    archive = src.archive or (PurePosixPath(urllib.parse.urlsplit(address).path).name if address else "")
    lines: list[str] = []
    if reason:
        lines += [reason.rstrip(), ""]
    lines.append(f"To set up {src.title} by hand:")
    if address:
        facts = [_human_size(src.size)] if src.size else []
        if checksum:
            facts.append(f"SHA-256 {checksum}; check it with `sha256sum {archive}`")
        lines += ["  1. On a machine with internet access, download", f"       {address}"]
        if facts:
            lines.append(f"     ({'; '.join(facts)}).")
        lines.append(f"     {src.manual}")
    else:
        lines.append(f"  1. {src.manual}")
    lines += ["  2. Extract it so that this folder exists:", f"       {target}"]
    if archive.endswith(".zip"):
        lines += ["     for example:", f"       unzip {shlex.quote(archive)} -d {shlex.quote(str(target))}"]
    elif archive and src.archive_has_folder:
        parent = base / PurePosixPath(src.folder).parent  # the folder holding the archive's own folder
        lines += ["     for example:", f"       mkdir -p {shlex.quote(str(parent))} && tar -xf {shlex.quote(archive)} "
                                       f"-C {shlex.quote(str(parent))}"]
    elif archive:
        quoted = shlex.quote(str(target))
        lines += ["     for example:", f"       mkdir -p {quoted} && tar -xf {shlex.quote(archive)} -C {quoted}"]
    lines.append("     with this layout:")
    lines += [f"       {target}/{pattern}" for pattern in src.layout.splitlines()]
    lines.append(f"  3. {src.usage.format(path=target, parent=target.parent)}")
    return "\n".join(lines)


# --- download ------------------------------------------------------------------------------------------------


def _check_host(url: str, timeout: float) -> None:
    """Fail fast when the host's name cannot be resolved (offline machine). DNS lookups ignore socket timeouts,
    so the lookup runs in a helper thread that is waited for at most ``timeout`` (and 10) seconds."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname
    if not host or parts.scheme not in ("http", "https"):
        return
    try:
        ipaddress.ip_address(host)
        return  # an address needs no lookup
    except ValueError:
        pass
    if parts.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(host):
        return  # the proxy resolves the name
    outcome: list[OSError | None] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM)
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=resolve, name="dmdd-dns-lookup", daemon=True)
    worker.start()
    wait = min(timeout, 10.0)
    worker.join(wait)
    if not outcome:
        raise DownloadUnavailable(
            f"The host {host} could not be reached: looking up its name took longer than {wait:g} s. "
            "This machine seems to be offline.",
            url=url,
        )
    if outcome[0] is not None:
        raise DownloadUnavailable(
            f"The host {host} could not be reached: its name could not be resolved ({outcome[0]}). "
            "This machine seems to be offline.",
            url=url,
        )


def _unreachable(url: str, exc: BaseException, timeout: float) -> DownloadUnavailable:
    """The error for a server that could not be connected to or did not answer."""
    host = urllib.parse.urlsplit(url).hostname or url
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, TimeoutError):
        detail = f"no answer within {timeout:g} s"
    else:
        detail = str(reason) or type(reason).__name__
    return DownloadUnavailable(
        f"The host {host} could not be reached ({detail}). This machine seems to be offline, or the server is down.",
        url=url,
    )


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from a Content-Range header such as ``bytes 100-199/200`` or ``bytes */200``."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", header or "")
    if not match:
        return None, None
    first = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return first, total


def _transfer(url: str, part: Path, hashing: bool, show: bool, timeout: float, chunk_size: int) -> str | None:
    """Fetch ``url`` into ``part``, continuing it when it already holds a prefix. Returns the SHA-256 of the
    whole file when ``hashing``, else None. Raises _RestartFromZero when the saved prefix cannot be continued."""
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # The saved range starts at or past the end: the .part is either complete or longer than the file.
            _, total = _content_range(exc.headers.get("Content-Range") if exc.headers else None)
            exc.close()
            if total == offset:
                return file_sha256(part) if hashing else None
            raise _RestartFromZero from None
        exc.close()
        raise DownloadUnavailable(
            f"The server answered HTTP {exc.code} ({exc.reason}) for {url}: the file may have moved or be "
            "temporarily unavailable.",
            url=url,
            http_status=exc.code,
        ) from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _unreachable(url, exc, timeout) from exc

    with response:
        status = getattr(response, "status", None) or 200
        digest = hashlib.sha256() if hashing else None
        if status == 206:
            first, total = _content_range(response.headers.get("Content-Range"))
            if first != offset:
                raise _RestartFromZero
            if total is None:
                length = response.headers.get("Content-Length")
                total = offset + int(length) if length and length.isdigit() else None
            mode = "ab"
            if digest is not None and offset:
                _hash_into(digest, part)
        else:
            # 200: a first request, or a server that ignores Range and sends the whole file again.
            if offset:
                log.info("%s ignored the Range request; downloading %s from the start", url, part.name)
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            mode = "wb"
        received = offset
        reader = getattr(response, "read1", response.read)
        bar = tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=part.name.removesuffix(".part"),
            disable=not show,
        )
        with bar, part.open(mode) as fh:
            try:
                while chunk := reader(chunk_size):
                    fh.write(chunk)
                    if digest is not None:
                        digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as exc:
                raise IncompleteDownload(
                    f"The download of {url} stopped after {received} of {total or 'an unknown number of'} bytes "
                    f"({exc or type(exc).__name__}). The partial file {part} was kept; run again to resume."
                ) from exc
    if total is not None and received < total:
        raise IncompleteDownload(
            f"The server closed the connection after {received} of {total} bytes of {url}. "
            f"The partial file {part} was kept; run again to resume."
        )
    return digest.hexdigest() if digest is not None else None


def download(
    url: str,
    dest_file: str | Path,
    *,
    sha256: str | None = None,
    progress: bool | None = None,
    timeout: float = 15.0,
    chunk_size: int = 1 << 20,
) -> Path:
    """Download ``url`` to ``dest_file`` and return its path.

    If ``dest_file`` already exists and matches ``sha256`` (or no checksum is given) it is returned without any
    network access. Otherwise the bytes are streamed into ``dest_file + ".part"``; an existing ``.part`` is
    continued with a ``Range`` request (a server that ignores it sends the whole file, which then replaces the
    ``.part``); without a checksum, only a ``.part`` begun from the same ``url`` is continued (its address is kept
    in ``.part.from``), as nothing could catch a file joined from two mirrors' differing copies. The SHA-256 is checked after the transfer and only then is ``.part`` renamed to ``dest_file``.

    ``progress``: show a progress bar (None: yes, unless DMDD_FAST=1 or CI is set). ``timeout``: seconds to
    wait for the server to connect or send data.

    Raises :class:`DownloadUnavailable` when the host cannot be reached or answers with an HTTP error (within
    about ``timeout`` seconds), :class:`IncompleteDownload` when the transfer stops early (the ``.part`` is kept:
    run again to resume), and ValueError when the checksum does not match (the ``.part`` is deleted).
    """
    dest = Path(dest_file).expanduser()
    expected = _normalise_sha256(sha256)
    if dest.is_file():
        if expected is None:
            return dest
        got = file_sha256(dest)
        if got == expected:
            return dest
        log.warning("%s does not match its SHA-256 (expected %s, got %s); downloading it again", dest, expected, got)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(dest)
    show = progress_enabled(progress)
    _check_host(url, timeout)
    origin = part.with_name(part.name + ".from")  # the address a .part was begun from
    if expected is None:
        # with no checksum nothing would catch the first half of one mirror's file joined to another's second half
        begun = origin.read_text().strip() if origin.is_file() else None
        if part.exists() and begun != url:
            print(f"{part} was begun from {begun or 'an address not recorded'}, and there is no checksum to check a "
                  f"joined file with: starting afresh from {url}", file=sys.stderr)
            part.unlink()
        origin.write_text(url)
    for _ in range(3):
        try:
            digest = _transfer(url, part, expected is not None, show, timeout, chunk_size)
            break
        except _RestartFromZero:
            part.unlink(missing_ok=True)
    else:
        raise IncompleteDownload(
            f"The server for {url} keeps refusing to continue {part}; delete it and run again to start afresh."
        )
    if expected is not None:
        got = digest if digest is not None else file_sha256(part)
        if got != expected:
            part.unlink(missing_ok=True)
            raise ValueError(
                f"Checksum mismatch for {url}: expected SHA-256 {expected}, got {got}. The downloaded file was "
                "deleted. Run again to download it afresh; if the mismatch persists, the file on the server has "
                "changed or something between you and it alters it: check the dataset's web page, then pass the "
                "new address and checksum (url=/sha256=, or --url/--sha256) or download the file by hand."
            )
    os.replace(part, dest)
    origin.unlink(missing_ok=True)
    return dest


# --- extraction ----------------------------------------------------------------------------------------------


def _corrupt(archive: Path, exc: BaseException) -> ValueError:
    """The error for an archive that cannot be read to the end."""
    return ValueError(
        f"{archive} is not a readable archive or is damaged ({exc or type(exc).__name__}). Nothing was "
        f"extracted. Delete {archive} and download it again."
    )


def _unsafe(archive: Path, member: str, why: str) -> ValueError:
    """The error for an archive member that would land outside the destination."""
    return ValueError(
        f"Refusing to extract {archive}: its member {member!r} {why}. Nothing was extracted; the archive is not "
        "what it should be: delete it and download it again from the dataset's official address."
    )


def _check_zip_name(archive: Path, name: str) -> None:
    """Reject a zip member with an absolute path, a drive letter or a ``..`` component."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"[A-Za-z]:", posix):
        raise _unsafe(archive, name, "has an absolute path")
    if ".." in posix.split("/"):
        raise _unsafe(archive, name, "points outside the destination ('..')")


def _counting(items: Iterator[Any], show: bool, desc: str) -> Iterator[Any]:
    """Yield ``items`` while counting them on a progress bar."""
    with tqdm(unit=" files", desc=desc, disable=not show) as bar:
        for item in items:
            yield item
            bar.update(1)


def _check_tar_member_fallback(archive: Path, member: tarfile.TarInfo, target: Path) -> None:
    """For Pythons without tarfile's ``data`` filter: reject absolute or escaping paths, links out, devices."""
    name = member.name.replace("\\", "/")
    if name.startswith("/") or ".." in name.split("/"):
        raise _unsafe(archive, member.name, "points outside the destination")
    if member.isdev() or member.isfifo():
        raise _unsafe(archive, member.name, "is a device or pipe")
    if member.issym() or member.islnk():
        base = target.resolve()
        link_from = (target / name).parent if member.issym() else target
        resolved = (link_from / member.linkname).resolve()
        if member.linkname.startswith("/") or not resolved.is_relative_to(base):
            raise _unsafe(archive, member.name, f"links outside the destination ({member.linkname!r})")


def _is_tar(archive: Path) -> bool:
    """Whether ``archive`` opens as a tar file (reads only its first header)."""
    try:
        return tarfile.is_tarfile(archive)
    except (OSError, EOFError, zlib.error, lzma.LZMAError):
        return False


def _unpack(archive: Path, target: Path, show: bool) -> None:
    """Unpack a tar (any compression) or zip archive into the empty folder ``target``, refusing unsafe members."""
    if archive.suffix.lower() == ".zip" or (not _is_tar(archive) and zipfile.is_zipfile(archive)):
        try:
            with zipfile.ZipFile(archive) as zf:
                infos = zf.infolist()
                for info in infos:
                    _check_zip_name(archive, info.filename)
                for info in _counting(iter(infos), show, f"extracting {archive.name}"):
                    zf.extract(info, target)
        except (zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError) as exc:
            raise _corrupt(archive, exc) from exc
        return
    try:
        with tarfile.open(archive, "r:*") as tf:
            members = _counting(iter(tf), show, f"extracting {archive.name}")
            if hasattr(tarfile, "data_filter"):
                tf.extractall(target, members=members, filter="data")
            else:  # Python 3.10 before 3.10.12: check each member ourselves
                for member in members:
                    _check_tar_member_fallback(archive, member, target)
                    tf.extract(member, target)
    except tarfile.FilterError as exc:
        name = getattr(getattr(exc, "tarinfo", None), "name", "?")
        raise _unsafe(archive, name, f"is unsafe ({exc})") from exc
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as exc:
        raise _corrupt(archive, exc) from exc
    except OSError as exc:
        if exc.errno is not None:  # a real file-system error (disk full, permissions): not the archive's fault
            raise
        raise _corrupt(archive, exc) from exc  # e.g. bz2's "Invalid data stream"


def extract(
    archive: str | Path,
    dest_dir: str | Path,
    *,
    expected_folder: str | None = None,
    marker: Mapping[str, Any] | None = None,
    progress: bool | None = None,
) -> Path:
    """Extract a tar (gz, bz2, xz or none) or zip archive so that ``dest_dir`` holds its contents; return
    ``dest_dir``.

    When the archive holds a single top-level folder named ``expected_folder`` (default: ``dest_dir``'s name),
    that folder's contents become ``dest_dir``; otherwise the archive's top level does. Extraction happens in a
    staging folder beside ``dest_dir`` that is moved into place with one ``os.replace``, so an interrupted or
    failed extraction leaves nothing at ``dest_dir`` (the staging folder is removed in every case). The marker
    file :data:`MARKER_NAME` (archive name, date, and the entries of ``marker``) is written inside first.

    Members with absolute paths or ``..`` are refused (tar through tarfile's ``data`` filter, which also
    refuses links out of the destination and device files). A damaged archive raises ValueError naming it.
    ``dest_dir`` must not exist, or be an empty folder.
    """
    src = Path(archive).expanduser()
    dest = Path(dest_dir).expanduser()
    if not src.is_file():
        raise FileNotFoundError(f"archive not found: {src}")
    if dest.exists():
        if dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir()):
            dest.rmdir()
        else:
            raise FileExistsError(f"{dest} already exists and is not empty; move it away or delete it first")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extracting-", dir=dest.parent))
    try:
        content = staging / "content"
        content.mkdir()
        _unpack(src, content, progress_enabled(progress))
        top = content
        wrapper = expected_folder or dest.name
        entries = [p for p in content.iterdir() if p.name != "__MACOSX"]
        if len(entries) == 1 and entries[0].name == wrapper and entries[0].is_dir() and not entries[0].is_symlink():
            top = entries[0]
        if not any(top.iterdir()):
            raise ValueError(f"{src} holds no files. Delete it and download it again.")
        record: dict[str, Any] = {
            "archive": src.name,
            "extracted": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        record.update(marker or {})
        (top / MARKER_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.replace(top, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


# --- the whole job -------------------------------------------------------------------------------------------


def _archive_name(source: DownloadSource, url: str) -> str:
    """File name for the downloaded archive: the registry's, else the URL's last path segment."""
    if source.archive and url in (source.url, *source.alternative_urls):
        return source.archive
    name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    if name and "." in name and name not in (".", ".."):
        return name
    return source.archive or f"{source.name}-archive"


def download_dataset(
    name: str,
    root: str | Path,
    *,
    progress: bool | None = None,
    timeout: float = 15.0,
    keep_archive: bool = False,
    url: str | None = None,
    sha256: str | None = None,
) -> Path:
    """Download, verify and extract the dataset ``name`` (a key of :data:`DOWNLOADS`) under ``root``; return the
    dataset folder ``root/<folder>``, the one to pass as ``--data``.

    A folder whose marker says it is complete is returned at once, with no network access. Otherwise the archive
    is downloaded into ``root`` (resuming a ``.part`` left by an interrupted run), its SHA-256 checked, extracted
    atomically, and deleted unless ``keep_archive``.

    ``url`` replaces the registry's address (a mirror, or a test server); ``sha256`` replaces the registry's
    checksum (when only ``url`` is given, the registry's checksum still applies, as a mirror serves the same
    file). Raises :class:`DownloadUnavailable` with step-by-step manual instructions when the dataset has no
    stable address (``mpdd``) or the host cannot be reached (within about ``timeout`` seconds);
    :class:`IncompleteDownload` when the transfer stops early (run again to resume); ValueError for a checksum
    mismatch or a damaged archive; FileExistsError when ``root/<folder>`` exists without the marker.
    """
    return _fetch(get_source(name), root, progress=progress, timeout=timeout, keep_archive=keep_archive, url=url,
                  sha256=sha256)


def download_mvtec_categories(
    categories: Sequence[str],
    root: str | Path,
    *,
    progress: bool | None = None,
    timeout: float = 15.0,
    keep_archive: bool = False,
    mirrors: Sequence[str] | None = None,
) -> Path:
    """Download only these MVTec AD categories, each its own archive (MVTec publishes them per category as well as
    whole), into ``root/mvtec_anomaly_detection/<category>``; return ``root/mvtec_anomaly_detection``, the folder to
    pass as ``--data``. A lab needs one or three categories, not the 4.9 GiB of all fifteen.

    Each archive is handled like a whole dataset's (:func:`download_dataset`): skipped when its folder is complete,
    resumable, extracted atomically with its marker file. The addresses are tried in order
    (:data:`~dmdd_core.catalog.MVTEC_CATEGORY_MIRRORS`, or ``mirrors``: templates with ``{archive}`` and
    ``{category}``). An archive is checked against its SHA-256 where one is known
    (:data:`~dmdd_core.catalog.MVTEC_CATEGORY_SHA256`); otherwise its own SHA-256 is printed and recorded in the
    marker. When the whole dataset is already there, nothing is downloaded; a category folder extracted by hand
    (the layout, no marker) is used as it is."""
    from .catalog import MVTEC_CATEGORY_MIRRORS, mvtec_category_source

    sources = [mvtec_category_source(c, tuple(mirrors or MVTEC_CATEGORY_MIRRORS)) for c in categories]
    folder = Path(root).expanduser() / get_source("mvtec").folder
    if read_marker(folder) is not None:
        return folder
    for category, source in zip(categories, sources):
        own = folder / category
        if read_marker(own) is None and _looks_like_a_category(own):
            print(f"{own} is already there, not from a download (no {MARKER_NAME}); it is used as it is: delete it "
                  f"to download {category} afresh", file=sys.stderr)
            continue
        _fetch(source, root, progress=progress, timeout=timeout, keep_archive=keep_archive)
    return folder


def _looks_like_a_category(folder: Path) -> bool:
    """Whether ``folder`` has an MVTec category's layout (train/good with files, test and ground_truth), as a
    hand-extracted copy of the whole dataset has."""
    good = folder / "train" / "good"
    return good.is_dir() and any(good.iterdir()) and (folder / "test").is_dir() and (folder / "ground_truth").is_dir()


def _fetch(source: DownloadSource, root: str | Path, *, progress: bool | None, timeout: float, keep_archive: bool,
           url: str | None = None, sha256: str | None = None) -> Path:
    """Download, verify and extract one archive of the registry (or of a category) under ``root``."""
    base = Path(root).expanduser()
    target = base / source.folder
    if read_marker(target) is not None:
        return target
    urls = [url] if url else ([source.url, *source.alternative_urls] if source.url else [])
    if not urls:
        raise DownloadUnavailable(
            manual_instructions(source, base, reason=f"{source.title} cannot be downloaded automatically.")
        )
    checksum = _normalise_sha256(sha256) if sha256 is not None else source.sha256
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise FileExistsError(
            f"{target} already exists but has no {MARKER_NAME}, so it was not made by a complete download. If it "
            f"holds the whole dataset, pass --data {target}; otherwise delete it and run again."
        )
    base.mkdir(parents=True, exist_ok=True)
    archive = base / _archive_name(source, urls[0])
    for index, address in enumerate(urls):
        try:
            download(address, archive, sha256=checksum, progress=progress, timeout=timeout)
            break
        except DownloadUnavailable as exc:
            # Another address is worth a try when the server answered (a moved link) or lives on another host;
            # not when the same host cannot be reached (offline).
            if index + 1 < len(urls) and (exc.http_status is not None or _host(urls[index + 1]) != _host(address)):
                log.info("%s; trying %s", exc, urls[index + 1])
                continue
            raise DownloadUnavailable(
                manual_instructions(source, base, url=address, sha256=checksum, reason=str(exc)),
                url=address,
                http_status=exc.http_status,
            ) from exc
    record = {
        "source": source.name,
        "title": source.title,
        "url": address,
        "sha256": checksum,
        "archive_bytes": archive.stat().st_size,
    }
    if checksum is None:
        record["sha256_unverified"] = file_sha256(archive)
        print(f"{source.title}: no known SHA-256 to check {archive.name} against; its SHA-256 is "
              f"{record['sha256_unverified']} (recorded in {MARKER_NAME})", file=sys.stderr)
    try:
        extract(archive, target, expected_folder=PurePosixPath(source.folder).name, marker=record, progress=progress)
    except ValueError:
        if checksum is None:  # nothing vouches for this file (an error page, a truncated copy): fetch it afresh next time
            archive.unlink(missing_ok=True)
        raise
    if not keep_archive:
        archive.unlink(missing_ok=True)
    return target
