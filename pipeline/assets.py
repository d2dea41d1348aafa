"""Named external assets (datasets, pretrained weights): where to find them and how to prove they are right.

Every asset is named in :data:`ASSETS` with its public URL and sha256. :func:`resolve` looks for it in three places,
in order, and uses the first copy whose checksum matches:

1. ``<raw_dir>/<name>`` (a DVC-tracked copy, e.g. after ``dvc pull`` or ``detflow assets fetch``);
2. each local mirror folder (``mirrors=`` or the ``DETFLOW_ASSETS`` environment variable) at ``<mirror>/<mirror_path>``;
3. a download from the public URL into ``<raw_dir>/<name>``.

Checksums are verified whichever way a file arrives, because a ``.pt`` checkpoint is a pickle that can run code when
loaded, and because a silently different dataset makes every metric downstream meaningless. A copy that fails its
checksum is skipped (and reported), never used. Nothing here touches the disk or the network at import time.

Size: about a third is the manifest (data); the rest is the one resolver every asset goes through.
"""

from __future__ import annotations

import http.client
import logging
import os
import posixpath
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pipeline.errors import AssetError
from pipeline.fileio import atomic_directory, sha256_file, sha256_tree

log = logging.getLogger(__name__)

ENV_MIRRORS = "DETFLOW_ASSETS"
DEFAULT_RAW_DIR = Path("data/raw")
# Applies to the connection and to every single read: offline (or a dead server) fails within this many seconds
# instead of hanging, while a slow but live download keeps going.
CONNECT_TIMEOUT_S = 10.0
_CHUNK = 1 << 20

Kind = Literal["file", "dir"]


@dataclass(frozen=True)
class Asset:
    """One external asset, pinned by content.

    ``sha256`` is the file's sha256 for ``kind='file'`` and the tree hash (:func:`pipeline.fileio.sha256_tree`,
    i.e. ``find . -type f | LC_ALL=C sort | xargs sha256sum | sha256sum``) for ``kind='dir'``. ``None`` means the
    full hash is not known to us. ``sha256_prefix`` is a published *prefix* of the file's sha256 (torch.hub's
    convention: torchvision names its weights ``<name>-<first hex digits of the sha256>.pth`` and checks them the
    same way): a copy must match it, which catches a wrong, truncated or corrupt file but not a crafted one, so only
    use it for files read by a loader that cannot run code (``torch.load(weights_only=True)``). An asset with
    neither is used only when the caller passes ``trust=True``.

    A ``dir`` asset downloads as a tarball; ``archive_subdir`` is the folder inside the archive that becomes the
    asset, ``archive_extra`` are further archive paths copied into the asset's top level (e.g. a LICENSE that lives
    beside the data folder upstream), and files whose name matches an ``archive_exclude`` pattern are dropped, so
    the downloaded tree hashes the same as the mirror's copy.
    """

    name: str
    kind: Kind
    url: str
    sha256: str | None
    license: str
    mirror_path: str
    description: str
    archive_subdir: str | None = None
    archive_extra: tuple[str, ...] = field(default=())
    archive_exclude: tuple[str, ...] = field(default=())
    sha256_prefix: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("file", "dir"):
            raise ValueError(f"asset {self.name!r}: kind must be 'file' or 'dir', not {self.kind!r}")
        if self.sha256 is not None and (
            len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256)
        ):
            raise ValueError(f"asset {self.name!r}: sha256 must be 64 lowercase hex digits or None")
        if self.sha256_prefix is not None and (
            self.kind != "file" or not 8 <= len(self.sha256_prefix) < 64
            or any(c not in "0123456789abcdef" for c in self.sha256_prefix)
        ):
            raise ValueError(f"asset {self.name!r}: sha256_prefix must be 8-63 lowercase hex digits of a file asset")
        if PurePosixPath(self.mirror_path).is_absolute() or ".." in PurePosixPath(self.mirror_path).parts:
            raise ValueError(f"asset {self.name!r}: mirror_path must be relative: {self.mirror_path!r}")

    @property
    def pinned(self) -> bool:
        """The full sha256 is known: every copy is verified completely."""
        return self.sha256 is not None

    @property
    def verifiable(self) -> bool:
        """Copies can be checked at all: the full sha256 or a published prefix of it is known."""
        return self.pinned or self.sha256_prefix is not None

    def matches(self, actual: str) -> bool:
        """Does a content hash satisfy the pin (the full sha256, else the prefix)?"""
        if self.sha256 is not None:
            return actual == self.sha256
        return self.sha256_prefix is not None and actual.startswith(self.sha256_prefix)

    def expected(self) -> str:
        """The pin in words, for messages."""
        return self.sha256 if self.sha256 is not None else f"a sha256 starting with {self.sha256_prefix}"

    def raw_path(self, raw_dir: str | os.PathLike[str] = DEFAULT_RAW_DIR) -> Path:
        """Where the asset lives under ``raw_dir``: the folder itself, or the file inside ``raw_dir/<name>/``.

        A file asset gets its own folder so that ``dvc add data/raw/<name>`` works the same for both kinds.
        """
        base = Path(raw_dir) / self.name
        return base if self.kind == "dir" else base / PurePosixPath(self.mirror_path).name

    def mirror_location(self, mirror: str | os.PathLike[str]) -> Path:
        return Path(mirror).joinpath(*PurePosixPath(self.mirror_path).parts)


_BCCD_COMMIT = "d272fb14cdff6e473fafeeeba32aba5f560e9e43"

ASSETS: dict[str, Asset] = {
    "bccd": Asset(
        name="bccd",
        kind="dir",
        url=f"https://github.com/Shenggan/BCCD_Dataset/archive/{_BCCD_COMMIT}.tar.gz",
        sha256="84105ee7e6006319e87ac40c9957808059a1bd1c198288bc519737cab5908763",
        license="MIT",
        mirror_path="datasets/bccd",
        description=(
            "BCCD blood-cell detection set: 364 JPEG smears 640x480, Pascal VOC XML boxes for "
            "RBC/WBC/Platelets, official splits in ImageSets/Main/{train,val,test}.txt"
        ),
        archive_subdir=f"BCCD_Dataset-{_BCCD_COMMIT}/BCCD",
        # Upstream keeps LICENSE at the repository root and has macOS .DS_Store files inside BCCD/; the mirror
        # copy carries the LICENSE and no .DS_Store, and the pinned tree hash is the mirror's.
        archive_extra=(f"BCCD_Dataset-{_BCCD_COMMIT}/LICENSE",),
        archive_exclude=(".DS_Store",),
    ),
    "yolov5n-coco": Asset(
        name="yolov5n-coco",
        kind="file",
        url="https://github.com/ultralytics/yolov5/releases/download/v6.1/yolov5n.pt",
        sha256="4f180cf23ba0717ada0badd6c685026d73d48f184d00fc159c2641284b2ac0a3",
        license="AGPL-3.0",
        mirror_path="weights/yolov5n.pt",
        description=(
            "Ultralytics YOLOv5n v6.1 COCO checkpoint (80 classes, FP16, original YOLOv5 pickle format); "
            "layers 0-23 transfer into Ultralytics yolov5n.yaml, the anchor-based head does not"
        ),
    ),
}


def _torchvision_coco(model: str, file_name: str, params_m: float, box_map: float) -> Asset:
    """torchvision's COCO_V1 weights of a detection model (a row of pipeline/families/torchvision/models.py): the
    URL of ``weights.url``; the file name carries the first hex digits of its sha256 (torch.hub's check), the full
    hash is not published and not pinned here."""
    return Asset(
        name=f"{model}-coco",
        kind="file",
        url=f"https://download.pytorch.org/models/{file_name}",
        sha256=None,
        sha256_prefix=file_name.rsplit("-", 1)[1].split(".")[0],
        license="BSD-3-Clause",
        mirror_path=f"weights/{file_name}",
        description=(f"torchvision {model} COCO_V1 state dict ({params_m} M parameters, COCO box mAP {box_map}); "
                     "read with torch.load(weights_only=True); the 91-class layers do not transfer"),
    )


def _ultralytics_unpinned(model: str) -> Asset:
    """An official Ultralytics COCO checkpoint under its release URL, for users with internet; its sha256 is not
    pinned here, so it is used only with ``--trust``."""
    return Asset(
        name=f"{model}-coco",
        kind="file",
        url=f"https://github.com/ultralytics/assets/releases/download/v8.3.0/{model}.pt",
        sha256=None,
        license="AGPL-3.0",
        mirror_path=f"weights/{model}.pt",
        description=f"Ultralytics {model.replace('yolo', 'YOLO')} COCO checkpoint (official name, for users with "
                    "internet; not pinned)",
    )


ASSETS.update({a.name: a for a in (
    _ultralytics_unpinned("yolo11n"),
    _ultralytics_unpinned("yolo11s"),
    _torchvision_coco("fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth",
                      19.4, 32.8),
    _torchvision_coco("fasterrcnn_mobilenet_v3_large_320_fpn",
                      "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth", 19.4, 22.8),
    _torchvision_coco("fasterrcnn_resnet50_fpn_v2", "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth", 43.7, 46.7),
    _torchvision_coco("retinanet_resnet50_fpn_v2", "retinanet_resnet50_fpn_v2_coco-5905b1c5.pth", 38.2, 41.5),
    _torchvision_coco("ssdlite320_mobilenet_v3_large", "ssdlite320_mobilenet_v3_large_coco-a79551df.pth", 3.4,
                      21.3),
)})


def get_asset(name: str) -> Asset:
    try:
        return ASSETS[name]
    except KeyError:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}") from None


def mirror_dirs(mirrors: Sequence[str | os.PathLike[str]] | None = None) -> list[Path]:
    """The mirror folders to search: ``mirrors`` if given (even empty), else ``$DETFLOW_ASSETS`` split on os.pathsep."""
    if mirrors is not None:
        return [Path(m).expanduser() for m in mirrors]
    env = os.environ.get(ENV_MIRRORS, "")
    return [Path(p).expanduser() for p in env.split(os.pathsep) if p.strip()]


# --- hashing with an in-memory cache ------------------------------------------------------------------------

# (resolved path, fingerprint) -> sha256. In memory only: writing a cache file into the asset folder would change
# its tree hash and dirty the DVC-tracked copy.
_HASH_CACHE: dict[tuple[str, tuple[Any, ...]], str] = {}


def _fingerprint(path: Path, kind: Kind) -> tuple[Any, ...]:
    if kind == "file":
        st = path.stat()
        return (("", st.st_size, st.st_mtime_ns),)
    entries = []
    for p in path.rglob("*"):
        if p.is_file():
            st = p.stat()
            entries.append((p.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns))
    return tuple(sorted(entries))


def content_hash(path: str | os.PathLike[str], kind: Kind) -> str:
    """sha256 of a file, or the tree hash of a folder; re-hashed only when a file's list, size or mtime changed."""
    path = Path(path)
    key = (str(path.resolve()), _fingerprint(path, kind))
    cached = _HASH_CACHE.get(key)
    if cached is None:
        cached = sha256_file(path) if kind == "file" else sha256_tree(path)
        _HASH_CACHE[key] = cached
    return cached


def _remember(path: Path, kind: Kind, digest: str) -> None:
    _HASH_CACHE[(str(path.resolve()), _fingerprint(path, kind))] = digest


# --- checking a candidate location --------------------------------------------------------------------------


@dataclass
class _Check:
    path: Path
    status: Literal["present", "missing", "mismatch"]
    detail: str
    verified: bool = False
    actual_sha256: str | None = None


def _check(asset: Asset, path: Path, *, verify: bool = True) -> _Check:
    """Is a usable copy of ``asset`` at ``path``? Hashes only when ``verify`` and the asset is pinned."""
    if not path.exists():
        return _Check(path, "missing", "missing")
    if asset.kind == "file" and not path.is_file():
        return _Check(path, "mismatch", "not a file")
    if asset.kind == "dir" and not path.is_dir():
        return _Check(path, "mismatch", "not a directory")
    if not verify:
        return _Check(path, "present", "present (not verified)")
    if not asset.verifiable:
        return _Check(path, "present", "present (no pinned sha256, not verifiable)")
    try:
        actual = content_hash(path, asset.kind)
    except OSError as e:
        return _Check(path, "mismatch", f"unreadable: {e}")
    if not asset.matches(actual):
        return _Check(
            path, "mismatch", f"checksum mismatch: expected {asset.expected()}, got {actual}", actual_sha256=actual
        )
    if not asset.pinned:
        return _Check(path, "present", f"sha256 prefix {asset.sha256_prefix} matches (full sha256 not pinned)",
                      actual_sha256=actual)
    return _Check(path, "present", "verified", verified=True, actual_sha256=actual)


# --- downloading ----------------------------------------------------------------------------------------------


def _download(url: str, dest: Path, *, desc: str, progress: bool, timeout: float) -> None:
    """Stream ``url`` to ``dest`` with a tqdm bar; raise on HTTP errors, timeouts and short reads."""
    from tqdm import tqdm  # imported here: only a download needs it

    req = urllib.request.Request(url, headers={"User-Agent": "detflow-assets"})
    with urllib.request.urlopen(req, timeout=timeout) as resp, open(dest, "wb") as out:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        written = 0
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress) as bar:
            while chunk := resp.read(_CHUNK):
                out.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
        out.flush()
        os.fsync(out.fileno())
    if total is not None and written != total:
        raise OSError(f"incomplete download: got {written} of {total} bytes")


def _describe(e: BaseException) -> str:
    """A one-line reason: "HTTP Error 404: Not Found", "ConnectionRefusedError: ...", "TimeoutError: ..."."""
    if isinstance(e, urllib.error.HTTPError):
        return str(e)
    if isinstance(e, urllib.error.URLError):
        r = e.reason
        return f"{type(r).__name__}: {r}" if isinstance(r, BaseException) else str(r)
    return f"{type(e).__name__}: {e}"


def _safe_member_name(name: str) -> str:
    norm = posixpath.normpath(name)
    if norm.startswith("/") or norm == ".." or norm.startswith("../"):
        raise AssetError(f"unsafe path in archive: {name!r}")
    return norm


def _extract(asset: Asset, archive: Path, into: Path) -> Path:
    """Extract only the asset's part of a tarball into ``into``; return the folder that becomes the asset."""
    subdir = posixpath.normpath(asset.archive_subdir) if asset.archive_subdir else ""
    extras = {posixpath.normpath(e) for e in asset.archive_extra}
    with tarfile.open(archive, "r:*") as tar:
        members = []
        for m in tar.getmembers():
            norm = _safe_member_name(m.name)
            inside = not subdir or norm == subdir or norm.startswith(subdir + "/")
            if not (inside or norm in extras):
                continue
            if m.isfile() and any(fnmatch(posixpath.basename(norm), pat) for pat in asset.archive_exclude):
                continue
            members.append(m)
        tar.extractall(into, members=members, filter="data")
    root = into / subdir if subdir else into
    if not root.is_dir():
        raise AssetError(f"archive has no folder {asset.archive_subdir!r}")
    for extra in sorted(extras):
        src = into / extra
        if not src.is_file():
            raise AssetError(f"archive has no file {extra!r}")
        os.replace(src, root / posixpath.basename(extra))
    return root


def _download_into_raw(asset: Asset, raw_dir: Path, *, progress: bool, timeout: float) -> Path:
    """Download, verify, then move into ``raw_dir/<name>`` atomically. On any failure ``raw_dir`` is left as it was."""
    created = [p for p in (raw_dir, *raw_dir.parents) if not p.exists()]  # deepest first
    raw_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=raw_dir, prefix=f".{asset.name}.download."))
    ok = False
    try:
        archive = work / "download"
        _download(asset.url, archive, desc=asset.name, progress=progress, timeout=timeout)
        if asset.kind == "file":
            src = archive
            actual = sha256_file(src)
        else:
            src = _extract(asset, archive, work / "extract")
            actual = sha256_tree(src)
        if asset.verifiable and not asset.matches(actual):
            raise AssetError(f"checksum mismatch: expected {asset.expected()}, got {actual}")
        if not asset.verifiable:
            log.warning(
                "asset %r downloaded WITHOUT verification (trust=True); its sha256 is %s - pin it in the "
                "manifest to verify future copies",
                asset.name,
                actual,
            )
        dest = raw_dir / asset.name
        with atomic_directory(dest) as staging:
            if asset.kind == "file":
                os.replace(src, staging / PurePosixPath(asset.mirror_path).name)
            else:
                for child in src.iterdir():
                    os.replace(child, staging / child.name)
        final = asset.raw_path(raw_dir)
        _remember(final, asset.kind, actual)
        ok = True
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not ok:  # remove the (empty) folders this attempt created, so a failure leaves no trace
            for p in created:
                try:
                    p.rmdir()
                except OSError:
                    break


# --- copying from a mirror ------------------------------------------------------------------------------------


def _copy_plain(src: Path, dst: Path) -> None:
    """Copy bytes only: a read-only mirror must not make the raw copy read-only (DVC and re-fetch need to write)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _copy_into_raw(asset: Asset, src: Path, raw_dir: Path) -> Path:
    with atomic_directory(raw_dir / asset.name) as staging:
        if asset.kind == "file":
            _copy_plain(src, staging / PurePosixPath(asset.mirror_path).name)
            copied = staging / PurePosixPath(asset.mirror_path).name
        else:
            for p in sorted(src.rglob("*")):
                if p.is_file():
                    _copy_plain(p, staging / p.relative_to(src))
            copied = staging
        # Re-verify the copy before it goes live: the source could change, or the disk could fill, mid-copy.
        if asset.verifiable:
            actual = sha256_file(copied) if asset.kind == "file" else sha256_tree(copied)
            if not asset.matches(actual):
                raise AssetError(
                    f"asset {asset.name!r}: copy from {src} failed its checksum "
                    f"(expected {asset.expected()}, got {actual}); nothing was written"
                )
    final = asset.raw_path(raw_dir)
    if asset.pinned:
        _remember(final, asset.kind, asset.sha256)  # type: ignore[arg-type]
    return final


# --- public API ---------------------------------------------------------------------------------------------


def _require_trust(asset: Asset, trust: bool) -> None:
    if not asset.verifiable and not trust:
        raise AssetError(
            f"asset {asset.name!r} has no pinned sha256 in the manifest, so no copy of it can be verified "
            f"(a .pt checkpoint is a pickle and can run code when loaded). Pass trust=True (CLI: --trust) to "
            f"use it unverified from {asset.url}, or use a pinned asset such as 'yolov5n-coco'."
        )


def _unavailable(asset: Asset, raw_dir: Path, tried: list[str]) -> AssetError:
    """The resolver's failure: every place tried and the three remedies; its summary lists the places on one line."""
    head = f"asset {asset.name!r} ({asset.kind}, {asset.license}) is not available."
    raw = asset.raw_path(raw_dir)
    lines = [
        f"{head} Tried:",
        *(f"  - {t}" for t in tried),
        "Fix it one of three ways:",
        f"  1. put it under {raw} (e.g. `dvc pull`, or `detflow assets fetch {asset.name}` with a mirror);",
        f"  2. point {ENV_MIRRORS} (or --mirror) at a mirror folder that contains {asset.mirror_path};",
        f"  3. connect to the internet so it can be downloaded from {asset.url}.",
    ]
    return AssetError("\n".join(lines), summary=f"{head} Tried: {'; '.join(tried)}")


def resolve(
    name: str,
    *,
    raw_dir: str | os.PathLike[str] = DEFAULT_RAW_DIR,
    mirrors: Sequence[str | os.PathLike[str]] | None = None,
    download: bool = True,
    trust: bool = False,
    progress: bool = True,
    timeout: float = CONNECT_TIMEOUT_S,
    materialise: bool = False,
) -> Path:
    """Path to a verified copy of asset ``name``: from ``raw_dir``, else a mirror (used in place), else a download.

    ``mirrors=None`` reads ``$DETFLOW_ASSETS``; an explicit list (even empty) replaces it. Pinned assets are always
    checksum-verified and ``trust`` does not change that; an asset without a pinned sha256 is refused unless
    ``trust=True``. Raises :class:`AssetError` naming what was tried, why each failed, and the three remedies.
    ``materialise=True`` copies a mirror hit under ``raw_dir`` (what :func:`fetch` does).
    """
    asset = get_asset(name)
    _require_trust(asset, trust)
    raw_dir = Path(raw_dir)
    tried: list[str] = []

    raw = _check(asset, asset.raw_path(raw_dir))
    if raw.status == "present":
        if not asset.verifiable:
            log.warning("asset %r used from %s WITHOUT verification (trust=True)", asset.name, raw.path)
        return raw.path
    tried.append(f"{raw.path}: {raw.detail}")
    if raw.status == "mismatch":
        log.warning("asset %r: ignoring %s (%s)", asset.name, raw.path, raw.detail)

    dirs = mirror_dirs(mirrors)
    if not dirs:
        tried.append(f"mirrors: none given (set {ENV_MIRRORS} or pass --mirror)")
    for mirror in dirs:
        c = _check(asset, asset.mirror_location(mirror))
        if c.status == "present":
            if not asset.verifiable:
                log.warning("asset %r used from %s WITHOUT verification (trust=True)", asset.name, c.path)
            if materialise:
                return _copy_into_raw(asset, c.path, raw_dir)
            return c.path
        tried.append(f"{c.path}: {c.detail}")
        if c.status == "mismatch":
            log.warning("asset %r: ignoring %s (%s)", asset.name, c.path, c.detail)

    if download:
        try:
            return _download_into_raw(asset, raw_dir, progress=progress, timeout=timeout)
        except AssetError as e:
            tried.append(f"download {asset.url}: {e}")
        except (OSError, http.client.HTTPException, tarfile.TarError, ValueError) as e:
            tried.append(f"download {asset.url}: download error: {_describe(e)}")
    else:
        tried.append(f"download {asset.url}: skipped (download disabled)")

    raise _unavailable(asset, raw_dir, tried)


def fetch(name: str, raw_dir: str | os.PathLike[str] = DEFAULT_RAW_DIR,
          mirrors: Sequence[str | os.PathLike[str]] | None = None, **options: Any) -> Path:
    """Like :func:`resolve` (same keyword options), but the result always lies under ``raw_dir/<name>`` (copied
    atomically from a mirror if that is where it was found), ready for ``dvc add data/raw/<name>``."""
    return resolve(name, raw_dir=raw_dir, mirrors=mirrors, materialise=True, **options)


def list_assets(
    raw_dir: str | os.PathLike[str] = DEFAULT_RAW_DIR,
    mirrors: Sequence[str | os.PathLike[str]] | None = None,
    *,
    verify: bool = False,
) -> list[dict[str, Any]]:
    """Manifest entries with the status of each local location (``present``/``missing``/``mismatch``).

    Cheap by default: only existence and kind are checked. ``verify=True`` hashes every copy found (cached in memory).
    """
    raw_dir = Path(raw_dir)
    dirs = mirror_dirs(mirrors)
    out: list[dict[str, Any]] = []
    for asset in ASSETS.values():
        checks = [("raw", _check(asset, asset.raw_path(raw_dir), verify=verify))]
        checks += [("mirror", _check(asset, asset.mirror_location(m), verify=verify)) for m in dirs]
        locations = [
            {
                "where": where,
                "path": str(c.path),
                "status": c.status,
                "verified": c.verified,
                "detail": c.detail,
                "actual_sha256": c.actual_sha256,
            }
            for where, c in checks
        ]
        out.append(
            {
                "name": asset.name,
                "kind": asset.kind,
                "license": asset.license,
                "url": asset.url,
                "sha256": asset.sha256,
                "sha256_prefix": asset.sha256_prefix,
                "mirror_path": asset.mirror_path,
                "description": asset.description,
                "available": any(loc["status"] == "present" for loc in locations),
                "locations": locations,
            }
        )
    return out
