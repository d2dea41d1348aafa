"""Asset resolution: raw_dir, mirrors, download, checksums, trust, and the failure message.

Synthetic tests use tiny assets put into the manifest with monkeypatch and a local HTTP server on 127.0.0.1;
``realdata`` tests check the real mirror named by DETFLOW_ASSETS.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import io
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import assets
from pipeline.assets import ASSETS, Asset, fetch, list_assets, resolve
from pipeline.errors import AssetError
from pipeline.fileio import sha256_tree

FILE_BYTES = b"tiny weights\n" * 1000


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _make_tree(root: Path) -> Path:
    (root / "Annotations").mkdir(parents=True)
    (root / "Annotations" / "a.xml").write_text("<annotation/>\n")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\n")
    (root / "LICENSE").write_text("MIT\n")
    return root


@pytest.fixture
def tree_hash(tmp_path_factory: pytest.TempPathFactory) -> str:
    return sha256_tree(_make_tree(tmp_path_factory.mktemp("ref") / "tree"))


@pytest.fixture
def file_asset(monkeypatch: pytest.MonkeyPatch) -> Asset:
    a = Asset(
        name="tiny-file",
        kind="file",
        url="http://127.0.0.1:9/tiny.pt",
        sha256=_sha(FILE_BYTES),
        license="MIT",
        mirror_path="weights/tiny.pt",
        description="a small file asset",
    )
    monkeypatch.setitem(ASSETS, a.name, a)
    return a


@pytest.fixture
def dir_asset(monkeypatch: pytest.MonkeyPatch, tree_hash: str) -> Asset:
    a = Asset(
        name="tiny-dir",
        kind="dir",
        url="http://127.0.0.1:9/tiny.tar.gz",
        sha256=tree_hash,
        license="MIT",
        mirror_path="datasets/tiny",
        description="a small dir asset",
        archive_subdir="repo-abc/DATA",
        archive_extra=("repo-abc/LICENSE",),
        archive_exclude=(".DS_Store",),
    )
    monkeypatch.setitem(ASSETS, a.name, a)
    return a


@pytest.fixture(autouse=True)
def _no_env_mirrors(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """Synthetic tests must not see a real mirror from the environment unless they set one themselves."""
    if "realdata" not in request.keywords:
        monkeypatch.delenv(assets.ENV_MIRRORS, raising=False)


def _mirror(root: Path, file_asset: Asset | None = None, dir_asset: Asset | None = None) -> Path:
    if file_asset is not None:
        p = file_asset.mirror_location(root)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(FILE_BYTES)
    if dir_asset is not None:
        _make_tree(dir_asset.mirror_location(root))
    return root


def _listing(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*")) if path.exists() else []


# --- HTTP server ------------------------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _tarball(dest: Path, *, extra_members: dict[str, bytes] | None = None) -> Path:
    """A GitHub-style archive: one top folder holding the data folder, a LICENSE beside it, and junk."""
    members = {
        "repo-abc/README.md": b"readme\n",
        "repo-abc/LICENSE": b"MIT\n",
        "repo-abc/DATA/Annotations/a.xml": b"<annotation/>\n",
        "repo-abc/DATA/ImageSets/Main/train.txt": b"a\n",
        "repo-abc/DATA/.DS_Store": b"\0\0junk",
        "repo-abc/DATA/Annotations/.DS_Store": b"\0\0junk",
        **(extra_members or {}),
    }
    with tarfile.open(dest, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dest


# --- raw_dir and mirrors ----------------------------------------------------------------------------------


def test_manifest_entries() -> None:
    assert ASSETS["bccd"].kind == "dir" and ASSETS["bccd"].mirror_path == "datasets/bccd"
    assert ASSETS["bccd"].url.endswith("/archive/d272fb14cdff6e473fafeeeba32aba5f560e9e43.tar.gz")
    assert ASSETS["bccd"].archive_subdir == "BCCD_Dataset-d272fb14cdff6e473fafeeeba32aba5f560e9e43/BCCD"
    assert ASSETS["yolov5n-coco"].sha256 == "4f180cf23ba0717ada0badd6c685026d73d48f184d00fc159c2641284b2ac0a3"
    assert ASSETS["yolo11n-coco"].sha256 is None and ASSETS["yolo11s-coco"].sha256 is None
    for name, a in ASSETS.items():
        assert a.name == name and a.license and a.url.startswith("https://")
    with pytest.raises(ValueError):
        Asset("x", "file", "u", "abc", "MIT", "w/x.pt", "bad hash")


def test_unknown_asset_lists_known_names(tmp_path: Path) -> None:
    with pytest.raises(AssetError, match="known assets: .*bccd"):
        resolve("nope", raw_dir=tmp_path)


def test_resolve_from_raw_dir(tmp_path: Path, file_asset: Asset, dir_asset: Asset) -> None:
    raw = tmp_path / "raw"
    (raw / "tiny-file").mkdir(parents=True)
    (raw / "tiny-file" / "tiny.pt").write_bytes(FILE_BYTES)
    _make_tree(raw / "tiny-dir")
    assert resolve("tiny-file", raw_dir=raw, mirrors=[], download=False) == raw / "tiny-file" / "tiny.pt"
    assert resolve("tiny-dir", raw_dir=raw, mirrors=[], download=False) == raw / "tiny-dir"
    # No cache files or other hidden files were written into the asset folders.
    assert _listing(raw / "tiny-dir") == _listing(_make_tree(tmp_path / "ref"))
    assert _listing(raw / "tiny-file") == ["tiny.pt"]


def test_resolve_from_mirror_via_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, file_asset: Asset, dir_asset: Asset
) -> None:
    empty = tmp_path / "empty-mirror"
    empty.mkdir()
    mirror = _mirror(tmp_path / "mirror", file_asset, dir_asset)
    monkeypatch.setenv("DETFLOW_ASSETS", os.pathsep.join([str(empty), str(mirror)]))
    raw = tmp_path / "raw"
    assert resolve("tiny-file", raw_dir=raw, download=False) == mirror / "weights" / "tiny.pt"
    assert resolve("tiny-dir", raw_dir=raw, download=False) == mirror / "datasets" / "tiny"
    assert not raw.exists()  # used in place: nothing copied


def test_explicit_mirrors_replace_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, file_asset: Asset) -> None:
    mirror = _mirror(tmp_path / "mirror", file_asset)
    monkeypatch.setenv("DETFLOW_ASSETS", str(tmp_path / "does-not-exist"))
    assert resolve("tiny-file", raw_dir=tmp_path / "raw", mirrors=[mirror], download=False) == (
        mirror / "weights" / "tiny.pt"
    )
    monkeypatch.setenv("DETFLOW_ASSETS", str(mirror))
    with pytest.raises(AssetError):  # an explicit empty list means "no mirrors", not "use the env var"
        resolve("tiny-file", raw_dir=tmp_path / "raw", mirrors=[], download=False)


def test_raw_mismatch_falls_through_to_mirror(tmp_path: Path, file_asset: Asset, dir_asset: Asset) -> None:
    raw = tmp_path / "raw"
    (raw / "tiny-file").mkdir(parents=True)
    (raw / "tiny-file" / "tiny.pt").write_bytes(b"corrupt")
    _make_tree(raw / "tiny-dir")
    (raw / "tiny-dir" / "Annotations" / "a.xml").write_text("<annotation>edited</annotation>\n")
    mirror = _mirror(tmp_path / "mirror", file_asset, dir_asset)
    assert resolve("tiny-file", raw_dir=raw, mirrors=[mirror], download=False) == mirror / "weights" / "tiny.pt"
    assert resolve("tiny-dir", raw_dir=raw, mirrors=[mirror], download=False) == mirror / "datasets" / "tiny"


def test_tree_hash_cache_notices_changes(tmp_path: Path, dir_asset: Asset) -> None:
    raw = tmp_path / "raw"
    _make_tree(raw / "tiny-dir")
    assert resolve("tiny-dir", raw_dir=raw, mirrors=[], download=False) == raw / "tiny-dir"
    # Same size, different content and mtime: the cached hash must not be reused.
    f = raw / "tiny-dir" / "ImageSets" / "Main" / "train.txt"
    f.write_text("b\n")
    os.utime(f, ns=(time.time_ns(), f.stat().st_mtime_ns + 5_000_000_000))
    with pytest.raises(AssetError, match="checksum mismatch"):
        resolve("tiny-dir", raw_dir=raw, mirrors=[], download=False)
    # An added file changes the file list.
    f.write_text("a\n")
    (raw / "tiny-dir" / "extra.txt").write_text("x")
    with pytest.raises(AssetError, match="checksum mismatch"):
        resolve("tiny-dir", raw_dir=raw, mirrors=[], download=False)


def test_all_fail_message_names_remedies_and_reasons(tmp_path: Path, dir_asset: Asset) -> None:
    raw = tmp_path / "raw"
    bad_mirror = tmp_path / "bad-mirror"
    _make_tree(bad_mirror / "datasets" / "tiny")
    (bad_mirror / "datasets" / "tiny" / "LICENSE").write_text("changed\n")
    actual = sha256_tree(bad_mirror / "datasets" / "tiny")
    missing_mirror = tmp_path / "missing-mirror"
    with pytest.raises(AssetError) as exc:
        resolve("tiny-dir", raw_dir=raw, mirrors=[missing_mirror, bad_mirror], progress=False)
    msg = str(exc.value)
    assert "'tiny-dir'" in msg
    # what was tried and why each failed
    assert f"{raw / 'tiny-dir'}: missing" in msg
    assert f"{missing_mirror / 'datasets' / 'tiny'}: missing" in msg
    assert f"checksum mismatch: expected {dir_asset.sha256}, got {actual}" in msg
    assert "download http://127.0.0.1:9/tiny.tar.gz: download error:" in msg
    # the three remedies
    assert f"put it under {raw / 'tiny-dir'}" in msg and "dvc pull" in msg and "detflow assets fetch" in msg
    assert "DETFLOW_ASSETS" in msg and "--mirror" in msg and "datasets/tiny" in msg
    assert "connect to the internet" in msg and dir_asset.url in msg


def test_download_disabled_is_reported(tmp_path: Path, file_asset: Asset) -> None:
    with pytest.raises(AssetError, match="skipped \\(download disabled\\)"):
        resolve("tiny-file", raw_dir=tmp_path / "raw", mirrors=[], download=False)


# --- download -----------------------------------------------------------------------------------------------


def test_download_file_asset(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    http_root: tuple[Path, str],
    file_asset: Asset,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, base = http_root
    (root / "tiny.pt").write_bytes(FILE_BYTES)
    monkeypatch.setitem(ASSETS, "tiny-file", dataclasses.replace(file_asset, url=f"{base}/tiny.pt"))
    raw = tmp_path / "raw"
    got = resolve("tiny-file", raw_dir=raw, mirrors=[], progress=True)
    assert got == raw / "tiny-file" / "tiny.pt"
    assert got.read_bytes() == FILE_BYTES
    assert _listing(raw) == ["tiny-file", "tiny-file/tiny.pt"]  # no temp files left behind
    err = capsys.readouterr().err
    assert "tiny-file" in err and "100%" in err  # the tqdm bar ran to completion
    # Second call finds it in raw_dir (no server needed).
    (root / "tiny.pt").unlink()
    assert resolve("tiny-file", raw_dir=raw, mirrors=[]) == got


def test_download_progress_can_be_silenced(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    http_root: tuple[Path, str],
    file_asset: Asset,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, base = http_root
    (root / "tiny.pt").write_bytes(FILE_BYTES)
    monkeypatch.setitem(ASSETS, "tiny-file", dataclasses.replace(file_asset, url=f"{base}/tiny.pt"))
    resolve("tiny-file", raw_dir=tmp_path / "raw", mirrors=[], progress=False)
    assert "100%" not in capsys.readouterr().err


def test_download_checksum_mismatch_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http_root: tuple[Path, str], file_asset: Asset
) -> None:
    root, base = http_root
    (root / "tiny.pt").write_bytes(b"tampered")
    monkeypatch.setitem(ASSETS, "tiny-file", dataclasses.replace(file_asset, url=f"{base}/tiny.pt"))
    raw = tmp_path / "raw"
    with pytest.raises(AssetError) as exc:
        resolve("tiny-file", raw_dir=raw, mirrors=[], progress=False)
    assert f"checksum mismatch: expected {file_asset.sha256}, got {_sha(b'tampered')}" in str(exc.value)
    assert _listing(raw) == []


def test_download_http_error_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http_root: tuple[Path, str], file_asset: Asset
) -> None:
    _, base = http_root
    monkeypatch.setitem(ASSETS, "tiny-file", dataclasses.replace(file_asset, url=f"{base}/absent.pt"))
    with pytest.raises(AssetError, match="download error: HTTP Error 404"):
        resolve("tiny-file", raw_dir=tmp_path / "raw", mirrors=[], progress=False)
    assert _listing(tmp_path / "raw") == []


def test_download_tarball_dir_asset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http_root: tuple[Path, str], dir_asset: Asset
) -> None:
    root, base = http_root
    _tarball(root / "repo.tar.gz")
    monkeypatch.setitem(ASSETS, "tiny-dir", dataclasses.replace(dir_asset, url=f"{base}/repo.tar.gz"))
    raw = tmp_path / "raw"
    got = resolve("tiny-dir", raw_dir=raw, mirrors=[], progress=False)
    assert got == raw / "tiny-dir"
    assert sha256_tree(got) == dir_asset.sha256
    # subdir moved into place, LICENSE added, .DS_Store and README dropped, no staging folders left
    assert _listing(raw) == ["tiny-dir", *(f"tiny-dir/{p}" for p in _listing(_make_tree(tmp_path / "ref")))]


def test_download_tarball_mismatch_leaves_nothing_and_keeps_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http_root: tuple[Path, str], dir_asset: Asset
) -> None:
    root, base = http_root
    _tarball(root / "repo.tar.gz", extra_members={"repo-abc/DATA/surprise.txt": b"!"})
    monkeypatch.setitem(ASSETS, "tiny-dir", dataclasses.replace(dir_asset, url=f"{base}/repo.tar.gz"))
    raw = tmp_path / "raw"
    with pytest.raises(AssetError, match="checksum mismatch"):
        resolve("tiny-dir", raw_dir=raw, mirrors=[], progress=False)
    assert _listing(raw) == []
    # A corrupt existing copy is left exactly as it was (not half-replaced).
    (raw / "tiny-dir").mkdir(parents=True)
    (raw / "tiny-dir" / "old.txt").write_text("old")
    with pytest.raises(AssetError, match="checksum mismatch"):
        resolve("tiny-dir", raw_dir=raw, mirrors=[], progress=False)
    assert _listing(raw) == ["tiny-dir", "tiny-dir/old.txt"]


def test_download_tarball_missing_subdir_and_unsafe_member(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http_root: tuple[Path, str], dir_asset: Asset
) -> None:
    root, base = http_root
    _tarball(root / "repo.tar.gz", extra_members={"repo-abc/DATA/../../../evil.txt": b"x"})
    monkeypatch.setitem(ASSETS, "tiny-dir", dataclasses.replace(dir_asset, url=f"{base}/repo.tar.gz"))
    raw = tmp_path / "raw"
    with pytest.raises(AssetError, match="unsafe path in archive"):
        resolve("tiny-dir", raw_dir=raw, mirrors=[], progress=False)
    assert _listing(raw) == [] and not (tmp_path / "evil.txt").exists()

    _tarball(root / "repo.tar.gz")
    monkeypatch.setitem(
        ASSETS,
        "tiny-dir",
        dataclasses.replace(dir_asset, url=f"{base}/repo.tar.gz", archive_subdir="repo-abc/NOPE"),
    )
    with pytest.raises(AssetError, match="archive has no folder 'repo-abc/NOPE'"):
        resolve("tiny-dir", raw_dir=raw, mirrors=[], progress=False)
    assert _listing(raw) == []


def test_unreachable_url_fails_fast(tmp_path: Path, file_asset: Asset) -> None:
    # file_asset.url is http://127.0.0.1:9/ - nothing listens on the discard port.
    t0 = time.monotonic()
    with pytest.raises(AssetError, match="download error"):
        resolve("tiny-file", raw_dir=tmp_path / "raw", mirrors=[], progress=False)
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / "raw").exists()  # not even an empty raw_dir is left behind


def test_silent_server_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, file_asset: Asset) -> None:
    """A server that accepts the connection but never answers must not hang the pipeline."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/tiny.pt"
        monkeypatch.setitem(ASSETS, "tiny-file", dataclasses.replace(file_asset, url=url))
        t0 = time.monotonic()
        with pytest.raises(AssetError, match="download error"):
            resolve("tiny-file", raw_dir=tmp_path / "raw", mirrors=[], progress=False, timeout=0.5)
        assert time.monotonic() - t0 < 5
    finally:
        sock.close()
    assert assets.CONNECT_TIMEOUT_S <= 10


# --- trust for unpinned assets ----------------------------------------------------------------------------


def test_unpinned_asset_requires_trust(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http_root: tuple[Path, str]
) -> None:
    root, base = http_root
    (root / "u.pt").write_bytes(b"whatever upstream serves")
    a = Asset("unpinned", "file", f"{base}/u.pt", None, "AGPL-3.0", "weights/u.pt", "not pinned")
    monkeypatch.setitem(ASSETS, a.name, a)
    raw = tmp_path / "raw"
    with pytest.raises(AssetError, match="no pinned sha256.*trust=True"):
        resolve("unpinned", raw_dir=raw, mirrors=[], progress=False)
    assert not raw.exists()  # refused before touching anything
    got = resolve("unpinned", raw_dir=raw, mirrors=[], progress=False, trust=True)
    assert got.read_bytes() == b"whatever upstream serves"
    # Even when present locally it still needs trust.
    with pytest.raises(AssetError, match="trust=True"):
        resolve("unpinned", raw_dir=raw, mirrors=[])
    assert resolve("unpinned", raw_dir=raw, mirrors=[], trust=True) == got


def test_real_unpinned_entries_require_trust(tmp_path: Path) -> None:
    for name in ("yolo11n-coco", "yolo11s-coco"):
        with pytest.raises(AssetError, match=f"'{name}' has no pinned sha256"):
            resolve(name, raw_dir=tmp_path, mirrors=[], download=False)


def test_trust_does_not_bypass_a_pinned_checksum(tmp_path: Path, file_asset: Asset) -> None:
    raw = tmp_path / "raw"
    (raw / "tiny-file").mkdir(parents=True)
    (raw / "tiny-file" / "tiny.pt").write_bytes(b"corrupt")
    with pytest.raises(AssetError, match="checksum mismatch"):
        resolve("tiny-file", raw_dir=raw, mirrors=[], download=False, trust=True)


# --- fetch and list -----------------------------------------------------------------------------------------


def test_fetch_copies_from_mirror(tmp_path: Path, file_asset: Asset, dir_asset: Asset) -> None:
    mirror = _mirror(tmp_path / "mirror", file_asset, dir_asset)
    # A read-only mirror, like /work/shared: the copy must still come out writable.
    for p in sorted(mirror.rglob("*"), reverse=True):
        p.chmod(0o555 if p.is_dir() else 0o444)
    raw = tmp_path / "raw"
    try:
        f = fetch("tiny-file", raw, [mirror], download=False)
        d = fetch("tiny-dir", raw, [mirror], download=False)
    finally:
        for p in mirror.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert f == raw / "tiny-file" / "tiny.pt" and f.read_bytes() == FILE_BYTES
    assert d == raw / "tiny-dir" and sha256_tree(d) == dir_asset.sha256
    assert _listing(raw / "tiny-dir") == _listing(mirror / "datasets" / "tiny")
    assert sorted(p.name for p in raw.iterdir()) == ["tiny-dir", "tiny-file"]  # no staging leftovers
    assert os.access(f, os.W_OK) and os.access(d / "Annotations", os.W_OK)
    # Already there: fetch is a no-op that returns the raw copy.
    assert fetch("tiny-dir", raw, [], download=False) == d


def test_fetch_replaces_corrupt_raw_copy(tmp_path: Path, file_asset: Asset) -> None:
    mirror = _mirror(tmp_path / "mirror", file_asset)
    raw = tmp_path / "raw"
    (raw / "tiny-file").mkdir(parents=True)
    (raw / "tiny-file" / "tiny.pt").write_bytes(b"corrupt")
    assert fetch("tiny-file", raw, [mirror], download=False).read_bytes() == FILE_BYTES


def test_list_assets(tmp_path: Path, file_asset: Asset, dir_asset: Asset) -> None:
    mirror = _mirror(tmp_path / "mirror", file_asset, dir_asset)
    (mirror / "datasets" / "tiny" / "LICENSE").write_text("changed\n")
    raw = tmp_path / "raw"
    (raw / "tiny-file").mkdir(parents=True)
    (raw / "tiny-file" / "tiny.pt").write_bytes(b"corrupt")

    rows = {r["name"]: r for r in list_assets(raw, [mirror])}
    assert {"bccd", "yolov5n-coco", "yolo11n-coco", "yolo11s-coco", "tiny-file", "tiny-dir"} <= rows.keys()
    row = rows["tiny-file"]
    assert {k: row[k] for k in ("kind", "license", "url", "sha256")} == {
        "kind": "file",
        "license": "MIT",
        "url": file_asset.url,
        "sha256": file_asset.sha256,
    }
    # Cheap listing: existence only, nothing verified.
    assert [(loc["where"], loc["status"], loc["verified"]) for loc in row["locations"]] == [
        ("raw", "present", False),
        ("mirror", "present", False),
    ]
    assert [loc["status"] for loc in rows["tiny-dir"]["locations"]] == ["missing", "present"]

    rows = {r["name"]: r for r in list_assets(raw, [mirror], verify=True)}
    assert [(loc["status"], loc["verified"]) for loc in rows["tiny-file"]["locations"]] == [
        ("mismatch", False),
        ("present", True),
    ]
    assert rows["tiny-file"]["locations"][0]["actual_sha256"] == _sha(b"corrupt")
    assert [loc["status"] for loc in rows["tiny-dir"]["locations"]] == ["missing", "mismatch"]
    assert rows["tiny-dir"]["available"] is False and rows["tiny-file"]["available"] is True


def test_import_has_no_side_effects(tmp_path: Path) -> None:
    code = "import pipeline.assets"
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, env={**os.environ})
    assert list(tmp_path.iterdir()) == []


# --- the real mirror ----------------------------------------------------------------------------------------

needs_mirror = pytest.mark.skipif(
    not os.environ.get("DETFLOW_ASSETS"), reason="set DETFLOW_ASSETS to the asset mirror (e.g. ../shared)"
)


@pytest.mark.realdata
@needs_mirror
@pytest.mark.parametrize("name", ["bccd", "yolov5n-coco"])
def test_real_mirror_resolves_and_verifies(name: str, tmp_path: Path) -> None:
    asset = ASSETS[name]
    got = resolve(name, raw_dir=tmp_path / "raw", download=False)
    assert got in [asset.mirror_location(m) for m in assets.mirror_dirs()]  # used in place, not copied
    actual = sha256_tree(got) if asset.kind == "dir" else hashlib.sha256(got.read_bytes()).hexdigest()
    assert actual == asset.sha256
    assert not (tmp_path / "raw").exists()


@pytest.mark.realdata
@needs_mirror
def test_real_mirror_bccd_contents_and_listing(tmp_path: Path) -> None:
    got = resolve("bccd", raw_dir=tmp_path / "raw", download=False)
    assert len(list((got / "JPEGImages").glob("*.jpg"))) == 364
    assert len(list((got / "Annotations").glob("*.xml"))) == 364
    assert (got / "LICENSE").is_file()
    rows = {r["name"]: r for r in list_assets(tmp_path / "raw", verify=True)}
    for name in ("bccd", "yolov5n-coco"):
        assert rows[name]["available"], rows[name]
        assert any(loc["where"] == "mirror" and loc["verified"] for loc in rows[name]["locations"])


@pytest.mark.realdata
@needs_mirror
def test_real_mirror_fetch_yolov5n(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    got = fetch("yolov5n-coco", raw, download=False)
    assert got == raw / "yolov5n-coco" / "yolov5n.pt"
    assert hashlib.sha256(got.read_bytes()).hexdigest() == ASSETS["yolov5n-coco"].sha256
    assert os.access(got, os.W_OK)
