"""dmdd_core.download against a loopback HTTP server: resuming, checksums, safe and atomic extraction, offline
failures. No test reaches the internet."""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dmdd_core import download as dl

RANGE_RE = re.compile(r"bytes=(\d+)-")


class FileServer(ThreadingHTTPServer):
    """Serves in-memory files; records each request's path and Range header; can misbehave on demand."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), FileHandler)
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.statuses: list[int] = []
        self.cut_after: int | None = None  # send only this many body bytes, then close (once)
        self.wrong_bytes = False  # serve the right length of wrong bytes
        self.ignore_range = False  # answer 200 with the whole file even to a Range request

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    @property
    def ranges(self) -> list[str | None]:
        return [r for _, r in self.requests]


class FileHandler(BaseHTTPRequestHandler):
    server: FileServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def _answer(self, status: int, headers: dict[str, str]) -> None:
        self.server.statuses.append(status)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        srv = self.server
        range_header = self.headers.get("Range")
        srv.requests.append((self.path, range_header))
        data = srv.files.get(self.path)
        if data is None:
            self._answer(404, {"Content-Length": "0"})
            return
        if srv.wrong_bytes:
            data = bytes(b ^ 0x5A for b in data)
        start, status = 0, 200
        if range_header and not srv.ignore_range:
            match = RANGE_RE.fullmatch(range_header)
            assert match, range_header
            start = int(match.group(1))
            if start >= len(data):
                self._answer(416, {"Content-Range": f"bytes */{len(data)}", "Content-Length": "0"})
                return
            status = 206
        body = data[start:]
        headers = {"Content-Length": str(len(body)), "Accept-Ranges": "bytes"}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._answer(status, headers)
        if srv.cut_after is not None:
            self.wfile.write(body[: srv.cut_after])
            srv.cut_after = None
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture(autouse=True)
def _quiet_offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No progress bars, and no proxy between the client and the loopback server."""
    monkeypatch.setenv("DMDD_FAST", "1")
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server() -> Iterator[FileServer]:
    srv = FileServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(2)


# A small MVTec-like tree: some random bytes so that the archive is large enough to cut in the middle.
TREE: dict[str, bytes] = {
    "bottle/train/good/000.png": b"\x89PNG fake image 0" + bytes(range(256)) * 20,
    "bottle/test/broken_large/000.png": b"\x89PNG fake defect" + bytes(range(255, -1, -1)) * 20,
    "bottle/ground_truth/broken_large/000_mask.png": b"\x89PNG fake mask",
    "license.txt": b"CC BY-NC-SA 4.0\n",
}


def _noise(n: int) -> bytes:
    """Deterministic incompressible bytes."""
    out = bytearray()
    seed = b"dmdd"
    while len(out) < n:
        seed = hashlib.sha256(seed).digest()
        out += seed
    return bytes(out[:n])


def make_tar_gz(files: dict[str, bytes], prefix: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, data in {**files, "bottle/train/good/noise.bin": _noise(40_000)}.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_zip(files: dict[str, bytes], prefix: str = "") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in files.items():
            zf.writestr(prefix + name, data)
    return buffer.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def closed_port_url() -> str:
    """A loopback URL on a port nobody listens on (connection refused at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/mvtec_anomaly_detection.tar.xz"


def assert_tree(folder: Path) -> None:
    for name, data in TREE.items():
        assert (folder / name).read_bytes() == data, name


# --- normal use ----------------------------------------------------------------------------------------------


def test_download_extracts_writes_marker_removes_archive_and_second_call_is_offline(
    server: FileServer, tmp_path: Path
) -> None:
    payload = make_tar_gz(TREE)
    server.files["/mvtec.tar.gz"] = payload
    root = tmp_path / "datasets"
    url = server.url("/mvtec.tar.gz")

    folder = dl.download_dataset("mvtec", root, url=url, sha256=sha(payload), progress=False)

    assert folder == root / "mvtec_anomaly_detection"
    assert_tree(folder)
    marker = json.loads((folder / dl.MARKER_NAME).read_text())
    assert marker["source"] == "mvtec" and marker["url"] == url and marker["sha256"] == sha(payload)
    assert marker["archive"] == "mvtec.tar.gz" and marker["extracted"]
    assert dl.read_marker(folder) == marker
    assert sorted(p.name for p in root.iterdir()) == ["mvtec_anomaly_detection"]  # no archive, .part or staging
    assert len(server.requests) == 1

    # Complete: returned at once, no request at all (even with an address that would fail).
    assert dl.download_dataset("mvtec", root, url=url, sha256=sha(payload), progress=False) == folder
    assert dl.download_dataset("mvtec", root, url=closed_port_url(), progress=False) == folder
    assert len(server.requests) == 1


def test_zip_with_wrapper_folder_is_unwrapped_and_archive_can_be_kept(server: FileServer, tmp_path: Path) -> None:
    payload = make_zip(TREE, prefix="mvtec_anomaly_detection/")
    server.files["/mvtec.zip"] = payload
    folder = dl.download_dataset(
        "mvtec", tmp_path, url=server.url("/mvtec.zip"), sha256=sha(payload), progress=False, keep_archive=True
    )
    assert folder == tmp_path / "mvtec_anomaly_detection"
    assert_tree(folder)
    assert not (folder / "mvtec_anomaly_detection").exists()
    assert (tmp_path / "mvtec.zip").read_bytes() == payload


def test_download_returns_existing_verified_file_without_network(server: FileServer, tmp_path: Path) -> None:
    server.files["/a.bin"] = data = _noise(5000)
    dest = tmp_path / "a.bin"
    assert dl.download(server.url("/a.bin"), dest, sha256=sha(data), progress=False) == dest
    assert dl.download(server.url("/a.bin"), dest, sha256=sha(data), progress=False) == dest
    assert dl.download(server.url("/a.bin"), dest, progress=False) == dest
    assert len(server.requests) == 1
    assert dest.read_bytes() == data


# --- interrupted transfers -----------------------------------------------------------------------------------


def test_interrupted_transfer_keeps_part_and_resumes_with_range(server: FileServer, tmp_path: Path) -> None:
    payload = make_tar_gz(TREE)
    cut = 10_000
    assert len(payload) > 2 * cut
    server.files["/mvtec.tar.gz"] = payload
    server.cut_after = cut
    url = server.url("/mvtec.tar.gz")
    part = tmp_path / "mvtec.tar.gz.part"

    with pytest.raises(dl.IncompleteDownload, match="run again to resume") as info:
        dl.download_dataset("mvtec", tmp_path, url=url, sha256=sha(payload), progress=False)
    assert str(part) in str(info.value)
    assert part.read_bytes() == payload[:cut]
    assert not (tmp_path / "mvtec.tar.gz").exists()
    assert not (tmp_path / "mvtec_anomaly_detection").exists()

    folder = dl.download_dataset("mvtec", tmp_path, url=url, sha256=sha(payload), progress=False, keep_archive=True)
    assert server.ranges == [None, f"bytes={cut}-"]
    assert server.statuses == [200, 206]
    assert (tmp_path / "mvtec.tar.gz").read_bytes() == payload
    assert dl.file_sha256(tmp_path / "mvtec.tar.gz") == sha(payload)
    assert not part.exists()
    assert_tree(folder)


def test_server_ignoring_range_still_gives_the_right_file(server: FileServer, tmp_path: Path) -> None:
    server.files["/a.bin"] = data = _noise(30_000)
    server.cut_after = 7_000
    dest = tmp_path / "a.bin"
    with pytest.raises(dl.IncompleteDownload, match="run again to resume"):
        dl.download(server.url("/a.bin"), dest, sha256=sha(data), progress=False)
    assert (tmp_path / "a.bin.part").stat().st_size == 7_000

    server.ignore_range = True
    assert dl.download(server.url("/a.bin"), dest, sha256=sha(data), progress=False) == dest
    assert server.ranges == [None, "bytes=7000-"]
    assert server.statuses == [200, 200]
    assert dest.read_bytes() == data
    assert not (tmp_path / "a.bin.part").exists()


def test_complete_part_answered_416_is_finished_without_downloading_again(server: FileServer, tmp_path: Path) -> None:
    server.files["/a.bin"] = data = _noise(4_000)
    dest = tmp_path / "a.bin"
    (tmp_path / "a.bin.part").write_bytes(data)
    assert dl.download(server.url("/a.bin"), dest, sha256=sha(data), progress=False) == dest
    assert server.statuses == [416]
    assert dest.read_bytes() == data


def test_part_longer_than_the_file_restarts_from_zero(server: FileServer, tmp_path: Path) -> None:
    server.files["/a.bin"] = data = _noise(4_000)
    dest = tmp_path / "a.bin"
    (tmp_path / "a.bin.part").write_bytes(_noise(6_000))
    assert dl.download(server.url("/a.bin"), dest, sha256=sha(data), progress=False) == dest
    assert server.ranges == ["bytes=6000-", None]
    assert server.statuses == [416, 200]
    assert dest.read_bytes() == data


# --- verification and extraction failures --------------------------------------------------------------------


def test_checksum_mismatch_deletes_everything_and_extracts_nothing(server: FileServer, tmp_path: Path) -> None:
    payload = make_tar_gz(TREE)
    server.files["/mvtec.tar.gz"] = payload
    server.wrong_bytes = True
    with pytest.raises(ValueError, match="Checksum mismatch") as info:
        dl.download_dataset("mvtec", tmp_path, url=server.url("/mvtec.tar.gz"), sha256=sha(payload), progress=False)
    message = str(info.value)
    assert sha(payload) in message
    assert sha(bytes(b ^ 0x5A for b in payload)) in message
    assert "Run again" in message
    assert list(tmp_path.iterdir()) == []  # no archive, no .part, no dataset folder


def test_corrupted_archive_raises_and_leaves_no_half_extraction(server: FileServer, tmp_path: Path) -> None:
    payload = b"this is not an archive at all\n" * 200
    server.files["/mvtec.tar.gz"] = payload
    with pytest.raises(ValueError, match="download it again") as info:
        dl.download_dataset("mvtec", tmp_path, url=server.url("/mvtec.tar.gz"), sha256=sha(payload), progress=False)
    assert "mvtec.tar.gz" in str(info.value)
    assert not (tmp_path / "mvtec_anomaly_detection").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mvtec.tar.gz"]  # the verified archive, nothing else


def test_truncated_tar_gz_fails_atomically(tmp_path: Path) -> None:
    archive = tmp_path / "cut.tar.gz"
    archive.write_bytes(make_tar_gz(TREE)[:-3_000])
    dest = tmp_path / "out" / "data"
    with pytest.raises(ValueError, match="cut.tar.gz") as info:
        dl.extract(archive, dest, progress=False)
    assert "Delete" in str(info.value)
    assert not dest.exists()
    assert list((tmp_path / "out").iterdir()) == []  # no staging folder left behind


def test_zip_member_with_dotdot_is_rejected(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    archive.write_bytes(make_zip({"data/ok.txt": b"ok", "../evil.txt": b"gotcha"}))
    dest = tmp_path / "out" / "data"
    with pytest.raises(ValueError, match="evil.txt"):
        dl.extract(archive, dest, progress=False)
    assert not dest.exists()
    assert not (tmp_path / "out" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_zip_member_with_absolute_path_is_rejected(tmp_path: Path) -> None:
    archive = tmp_path / "abs.zip"
    archive.write_bytes(make_zip({"/tmp/dmdd-abs.txt": b"gotcha"}))
    with pytest.raises(ValueError, match="absolute"):
        dl.extract(archive, tmp_path / "data", progress=False)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("kind", ["dotdot", "symlink"])
def test_tar_traversal_is_blocked(tmp_path: Path, kind: str) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        ok = tarfile.TarInfo("data/ok.txt")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"ok"))
        if kind == "dotdot":
            evil = tarfile.TarInfo("../evil.txt")
            evil.size = 6
            tf.addfile(evil, io.BytesIO(b"gotcha"))
        else:
            link = tarfile.TarInfo("data/link")
            link.type = tarfile.SYMTYPE
            link.linkname = "../../../../etc/passwd"
            tf.addfile(link)
    archive = tmp_path / "evil.tar.gz"
    archive.write_bytes(buffer.getvalue())
    dest = tmp_path / "out" / "data"
    with pytest.raises(ValueError, match="Refusing to extract"):
        dl.extract(archive, dest, progress=False)
    assert not dest.exists()
    assert not (tmp_path / "out" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_extract_refuses_a_non_empty_destination(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(make_zip(TREE))
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        dl.extract(archive, dest, progress=False)
    assert [p.name for p in dest.iterdir()] == ["mine.txt"]


def test_folder_made_by_hand_is_never_overwritten(server: FileServer, tmp_path: Path) -> None:
    (tmp_path / "mvtec_anomaly_detection" / "bottle").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="--data"):
        dl.download_dataset("mvtec", tmp_path, url=server.url("/x.tar.gz"), sha256="0" * 64, progress=False)
    assert server.requests == []


# --- unavailable ---------------------------------------------------------------------------------------------


def test_offline_fails_fast_with_manual_instructions(tmp_path: Path) -> None:
    url = closed_port_url()
    start = time.monotonic()
    with pytest.raises(dl.DownloadUnavailable) as info:
        dl.download_dataset("mvtec", tmp_path / "root", url=url, progress=False, timeout=3.0)
    assert time.monotonic() - start < 5.0
    message = str(info.value)
    target = tmp_path / "root" / "mvtec_anomaly_detection"
    assert "could not be reached" in message
    assert url in message
    assert f"--data {target}" in message
    assert f"{target}/<category>/train/good" in message
    assert f"{target}/<category>/ground_truth/<type>/<stem>_mask.png" in message
    assert not target.exists()


def test_unresolvable_host_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def no_dns(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(dl.socket, "getaddrinfo", no_dns)
    start = time.monotonic()
    with pytest.raises(dl.DownloadUnavailable, match="could not be reached") as info:
        dl.download_dataset("visa", tmp_path, progress=False, timeout=3.0)
    assert time.monotonic() - start < 5.0
    message = str(info.value)
    assert str(dl.DOWNLOADS["visa"].url) in message
    assert f"--data {tmp_path / 'visa'}" in message
    assert "split_csv/1cls.csv" in message
    assert list(tmp_path.iterdir()) == []


def test_hanging_name_lookup_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def slow_dns(*args: object, **kwargs: object) -> None:
        time.sleep(1.5)

    monkeypatch.setattr(dl.socket, "getaddrinfo", slow_dns)
    start = time.monotonic()
    with pytest.raises(dl.DownloadUnavailable, match="could not be reached"):
        dl.download("https://dataset-host.invalid/a.tar", tmp_path / "a.tar", progress=False, timeout=0.3)
    assert time.monotonic() - start < 1.0


def test_http_error_is_unavailable_with_instructions(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(dl.DownloadUnavailable, match="HTTP 404") as info:
        dl.download_dataset("dtd", tmp_path, url=server.url("/gone.tar.gz"), progress=False)
    assert info.value.http_status == 404
    assert f"{tmp_path / 'dtd'}/images/<class>/*.jpg" in str(info.value)


def test_mpdd_has_no_address_and_explains_the_layout(tmp_path: Path) -> None:
    with pytest.raises(dl.DownloadUnavailable) as info:
        dl.download_dataset("mpdd", tmp_path, progress=False)
    assert isinstance(info.value, RuntimeError)
    message = str(info.value)
    assert "stepanje/MPDD" in message
    assert f"{tmp_path / 'mpdd'}/<category>/train/good" in message
    assert f"--data {tmp_path / 'mpdd'}" in message
    assert list(tmp_path.iterdir()) == []


def test_mpdd_can_be_fetched_from_a_url_of_your_own(server: FileServer, tmp_path: Path) -> None:
    payload = make_zip(TREE)
    server.files["/MPDD.zip"] = payload
    folder = dl.download_dataset("mpdd", tmp_path, url=server.url("/MPDD.zip"), progress=False)
    assert folder == tmp_path / "mpdd"
    assert_tree(folder)


# --- registry and settings -----------------------------------------------------------------------------------


def test_registry_entries_are_well_formed() -> None:
    assert set(dl.DOWNLOADS) >= {"mvtec", "visa", "dtd", "mpdd"}
    folders = [s.folder for s in dl.DOWNLOADS.values()]
    assert len(set(folders)) == len(folders)
    for name, source in dl.DOWNLOADS.items():
        assert source.name == name
        assert source.title and source.licence and source.layout and source.manual
        for url in filter(None, (source.url, *source.alternative_urls)):
            assert url.startswith("https://"), url
        if source.url is not None:
            assert source.archive and source.url.endswith(source.archive)
            assert source.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", source.sha256), name
        assert source.size is None or source.size > 0
    assert dl.DOWNLOADS["mpdd"].url is None and dl.DOWNLOADS["mpdd"].sha256 is None


def test_progress_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DMDD_FAST", raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert dl.progress_enabled(None) is True
    assert dl.progress_enabled(False) is False
    monkeypatch.setenv("CI", "true")
    assert dl.progress_enabled(None) is False
    assert dl.progress_enabled(True) is True
    monkeypatch.delenv("CI")
    monkeypatch.setenv("DMDD_FAST", "1")
    assert dl.progress_enabled(None) is False


def test_bad_checksum_argument_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="SHA-256"):
        dl.download("http://127.0.0.1:9/x", tmp_path / "x", sha256="abc", progress=False)


# --- through the command line ------------------------------------------------------------------------------------
def test_cli_download_gives_a_dataset_the_loaders_read(server: FileServer, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from conftest import make_mvtec_tree
    from dmdd_core.cli import main
    from dmdd_core.data import TestDataset, open_source

    make_mvtec_tree(tmp_path / "src", "bottle", n_train=3, defects={"good": 1, "broken_large": 2})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tf:
        tf.add(tmp_path / "src" / "bottle", arcname="bottle")
    payload = buffer.getvalue()
    server.files["/mvtec_anomaly_detection.tar.xz"] = payload
    args = ["download", "mvtec", "--root", str(tmp_path / "data"), "--url", server.url("/mvtec_anomaly_detection.tar.xz")]
    assert main([*args, "--sha256", sha(payload)]) == 0
    folder = tmp_path / "data" / "mvtec_anomaly_detection"
    assert f"pass --data {folder}" in capsys.readouterr().out
    source = open_source(folder)
    assert source.kind == "mvtec" and source.categories() == ["bottle"]
    assert TestDataset(source, "bottle", 32).labels == [1, 1, 0]
    assert main(args) == 0 and len(server.requests) == 1  # present: nothing fetched again

    offline = ["download", "visa", "--root", str(tmp_path / "v"), "--url", closed_port_url(), "--timeout", "3"]
    assert main(offline) == 3
    err = capsys.readouterr().err
    assert "could not be reached" in err and f"--data {tmp_path / 'v' / 'visa'}" in err


# --- MVTec AD one category at a time ---------------------------------------------------------------------------
def _category_tar(category: str) -> bytes:
    """A per-category archive as MVTec publishes it: one folder, ``<category>/``."""
    files = {f"{category}/train/good/000.png": b"\x89PNG " + category.encode() + _noise(3000),
             f"{category}/test/good/000.png": b"\x89PNG test", f"{category}/test/crack/000.png": b"\x89PNG crack",
             f"{category}/ground_truth/crack/000_mask.png": b"\x89PNG mask"}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_mvtec_categories_one_archive_each_after_a_dead_mirror(server: FileServer, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from dmdd_core.catalog import MVTEC_CATEGORY_ARCHIVES
    from dmdd_core.data import open_source

    payloads = {c: _category_tar(c) for c in ("bottle", "carpet")}
    for category, data in payloads.items():
        server.files[f"/good/{MVTEC_CATEGORY_ARCHIVES[category]}/{category}.tar.xz"] = data
    closed = closed_port_url().rsplit("/", 1)[0]
    mirrors = [closed + "/{archive}/{category}.tar.xz",  # nobody listens: the next mirror is tried
               server.url("/dead/{archive}/{category}.tar.xz"),  # answers 404: the next mirror is tried
               server.url("/good/{archive}/{category}.tar.xz")]
    folder = dl.download_mvtec_categories(["bottle", "carpet"], tmp_path, mirrors=mirrors)
    assert folder == tmp_path / "mvtec_anomaly_detection"
    assert sorted(p.name for p in folder.iterdir()) == ["bottle", "carpet"] and not list(tmp_path.glob("*.tar.xz"))
    assert [p for p, _ in server.requests] == [
        f"/{kind}/{MVTEC_CATEGORY_ARCHIVES[c]}/{c}.tar.xz" for c in ("bottle", "carpet") for kind in ("dead", "good")]
    for category, data in payloads.items():
        marker = dl.read_marker(folder / category)
        assert marker["sha256"] is None and marker["sha256_unverified"] == sha(data)
        assert (folder / category / "ground_truth" / "crack" / "000_mask.png").read_bytes() == b"\x89PNG mask"
    assert "no known SHA-256" in capsys.readouterr().err
    assert open_source(folder).categories() == ["bottle", "carpet"]  # reads like the whole dataset
    asked = len(server.requests)
    assert dl.download_mvtec_categories(["carpet"], tmp_path, mirrors=mirrors) == folder
    assert len(server.requests) == asked  # finished categories: no network


def test_a_known_category_checksum_is_checked(server: FileServer, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from dmdd_core import catalog

    server.files[f"/{catalog.MVTEC_CATEGORY_ARCHIVES['screw']}/screw.tar.xz"] = _category_tar("screw")
    monkeypatch.setitem(catalog.MVTEC_CATEGORY_SHA256, "screw", "0" * 64)
    with pytest.raises(ValueError, match="Checksum mismatch"):
        dl.download_mvtec_categories(["screw"], tmp_path, mirrors=[server.url("/{archive}/{category}.tar.xz")])
    assert not (tmp_path / "mvtec_anomaly_detection" / "screw").exists()
    with pytest.raises(ValueError, match="unknown MVTec AD category 'bolt'"):
        dl.download_mvtec_categories(["bolt"], tmp_path)


def test_cli_downloads_mvtec_categories_and_refuses_them_elsewhere(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    from dmdd_core.cli import main

    calls: list[tuple[list[str], Path]] = []
    monkeypatch.setattr(dl, "download_mvtec_categories",
                        lambda cats, root, **kw: calls.append((list(cats), Path(root))) or Path(root) / "m")
    assert main(["download", "mvtec", "--categories", "bottle", "carpet", "--root", str(tmp_path)]) == 0
    assert calls == [(["bottle", "carpet"], tmp_path)]
    assert main(["download", "visa", "--categories", "candle", "--root", str(tmp_path)]) == 2


def test_a_category_archive_that_cannot_be_read_is_not_kept(server: FileServer, tmp_path: Path) -> None:
    from dmdd_core.catalog import MVTEC_CATEGORY_ARCHIVES

    path = f"/{MVTEC_CATEGORY_ARCHIVES['tile']}/tile.tar.xz"
    server.files[path] = b"<html>an error page, not an archive</html>"
    mirrors = [server.url("/{archive}/{category}.tar.xz")]
    with pytest.raises(ValueError, match="not a readable archive"):
        dl.download_mvtec_categories(["tile"], tmp_path, mirrors=mirrors)
    assert not (tmp_path / "tile.tar.xz").exists()  # no checksum vouched for it: fetched afresh next time
    server.files[path] = _category_tar("tile")
    assert (dl.download_mvtec_categories(["tile"], tmp_path, mirrors=mirrors) / "tile" / "train").is_dir()


def test_without_a_checksum_a_part_continues_only_from_the_address_it_was_begun_from(
        server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server.files["/a.bin"] = first = _noise(20_000)
    server.files["/mirror/a.bin"] = second = bytes(b ^ 0xFF for b in first)  # another copy: same size, other bytes
    dest = tmp_path / "a.bin"
    server.cut_after = 5_000
    with pytest.raises(dl.IncompleteDownload):
        dl.download(server.url("/a.bin"), dest, progress=False)
    assert (tmp_path / "a.bin.part.from").read_text() == server.url("/a.bin")
    assert dl.download(server.url("/mirror/a.bin"), dest, progress=False) == dest
    assert "starting afresh" in capsys.readouterr().err
    assert server.ranges == [None, None] and dest.read_bytes() == second  # not first[:5000] + second[5000:]
    assert not (tmp_path / "a.bin.part.from").exists()
    dest.unlink()
    server.cut_after = 5_000
    with pytest.raises(dl.IncompleteDownload):
        dl.download(server.url("/a.bin"), dest, progress=False)
    assert dl.download(server.url("/a.bin"), dest, progress=False) == dest  # the same address: continued
    assert server.ranges[-2:] == [None, "bytes=5000-"] and dest.read_bytes() == first


def test_a_category_extracted_by_hand_is_used_and_a_half_one_is_refused(server: FileServer, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from dmdd_core.catalog import MVTEC_CATEGORY_ARCHIVES

    whole = tmp_path / "mvtec_anomaly_detection"  # the whole dataset unpacked by hand: no marker file
    for part in ("train/good", "test/crack", "ground_truth/crack"):
        (whole / "bottle" / part).mkdir(parents=True)
    (whole / "bottle" / "train" / "good" / "000.png").write_bytes(b"\x89PNG")
    (whole / "carpet" / "train" / "good").mkdir(parents=True)  # half a category: not taken for a complete one
    server.files[f"/{MVTEC_CATEGORY_ARCHIVES['carpet']}/carpet.tar.xz"] = _category_tar("carpet")
    mirrors = [server.url("/{archive}/{category}.tar.xz")]
    assert dl.download_mvtec_categories(["bottle"], tmp_path, mirrors=mirrors) == whole
    assert not server.requests and "used as it is" in capsys.readouterr().err
    with pytest.raises(FileExistsError, match="carpet already exists"):
        dl.download_mvtec_categories(["bottle", "carpet"], tmp_path, mirrors=mirrors)
