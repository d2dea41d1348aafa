#!/usr/bin/env python3
"""Build the detflow images without the network: `make wheelhouse` and `make images` call this script.

* ``wheelhouse [serve] [train]``: on the host, ``pip wheel`` the dependencies of each image, pinned as
  ``pyproject.toml`` pins them, into ``build/wheelhouse/<image>/`` with a lock (``requirements.txt``: every wheel and
  its sha256), and the project itself as a wheel into ``build/wheelhouse/project/``. This is the only step that
  talks to the package registries.
* ``build [serve] [train]``: ``docker build`` when a Docker engine answers, else ``buildah bud`` (daemonless, chroot
  isolation); the wheelhouse is the build context ``wheels``. The base image is the Dockerfile's public default
  when the engine already has it (or ``--base public``), else a local Debian base made by ``debootstrap`` from the
  Debian mirror in this machine's apt sources.

Standard library only: it runs before any virtual environment exists. Errors are one line on stderr, exit 1.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WHEELHOUSE = REPO / "build" / "wheelhouse"
BASE_DIR = REPO / "build" / "base"
IMAGES = ("serve", "train")
TAGS = {"serve": "detflow-serve:latest", "train": "detflow-train:latest"}
# pyproject extras installed in each image (train: exactly what `make setup` installs).
EXTRAS = {"serve": ("serve",), "train": ("train", "serve", "dev")}
# The local Debian base per image, made by debootstrap: the packages the Dockerfile needs from its base.
DEBIAN_SUITE = os.environ.get("DETFLOW_DEBIAN_SUITE", "bookworm")
BASE_PACKAGES = {"serve": ("python3", "python3-venv"),
                 "train": ("python3", "python3-venv", "python3.11", "python3.11-venv", "git", "ca-certificates")}
# Wheels are stamped with this time so an unchanged checkout gives a byte-identical project wheel (and a cache hit).
SOURCE_DATE_EPOCH = "315532800"


class BuildError(Exception):
    """A failure reported as one line."""


def run(cmd: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, text=True, **kwargs)  # type: ignore[call-overload]


# ---------------------------------------------------------------------------------------------- wheelhouse


def pinned_requirements(image: str) -> list[str]:
    """The project's direct requirements for ``image``, as pyproject.toml pins them (plus the build tools the
    train image needs for its editable install, and the Makefile's pip)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS[image]:
        reqs += project["optional-dependencies"][extra]
    if image == "train":
        build = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
        pip = re.search(r'"(pip==[\d.]+)"', (REPO / "Makefile").read_text())
        reqs += list(build) + ([pip.group(1)] if pip else [])
    return sorted(dict.fromkeys(r.split(";")[0].strip() for r in reqs))


def wheel_name_version(wheel: Path) -> tuple[str, str]:
    parts = wheel.name[: -len(".whl")].split("-")
    return re.sub(r"[-_.]+", "-", parts[0]).lower(), parts[1]


def write_lock(folder: Path) -> Path:
    """``requirements.txt`` pinning every wheel in ``folder`` by version and sha256 (pip --require-hashes)."""
    lines = []
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise BuildError(f"no wheels in {folder}")
    for wheel in wheels:
        name, version = wheel_name_version(wheel)
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        lines.append(f"{name}=={version} --hash=sha256:{digest}")
    lines.sort()
    names = [line.split("==")[0] for line in lines]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise BuildError(f"{folder} holds several versions of {', '.join(dupes)}; remove the folder and run again")
    lock = folder / "requirements.txt"
    lock.write_text("# Made by `make wheelhouse` (docker/images.py); every wheel of this folder, by sha256.\n"
                    + "\n".join(lines) + "\n")
    return lock


def python_version(python: str | Path) -> str:
    return subprocess.run([str(python), "-c", "import platform; print(platform.python_version())"],
                          capture_output=True, text=True, check=True).stdout.strip()


def wheel_python() -> str:
    """The interpreter the wheelhouse is resolved with. pip evaluates environment markers against the interpreter
    it runs on (``--python-version`` does not change that), and some do test the patch level (redis needs
    async-timeout below 3.11.3), so the default is Debian's python3.11: the Python of the local debootstrap base
    made from the same suite. WHEEL_PYTHON overrides it (e.g. a 3.11.9 for the public slim base)."""
    python = os.environ.get("WHEEL_PYTHON") or ("/usr/bin/python3.11" if Path("/usr/bin/python3.11").exists()
                                                else sys.executable)
    version = python_version(python)
    if not version.startswith("3.11."):
        raise BuildError(f"the wheelhouse must be made with Python 3.11 (the images' Python); {python} is {version}: "
                         "set WHEEL_PYTHON to a python3.11")
    return python


def pip_tool() -> Path:
    """A small venv with the Makefile's pip, so the wheelhouse does not depend on whichever pip the host has."""
    python = wheel_python()
    venv = REPO / "build" / "pip-tool"
    py = venv / "bin" / "python"
    pip = re.search(r'"(pip==[\d.]+)"', (REPO / "Makefile").read_text())
    if py.exists() and python_version(py) != python_version(python):
        shutil.rmtree(venv)
    if not py.exists():
        build = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
        run([python, "-m", "venv", venv])
        # with the project's build backend installed here, the project wheel is rebuilt offline (make images)
        run([py, "-m", "pip", "install", "--quiet", "--upgrade", pip.group(1) if pip else "pip", *build])
    return py


def project_sources() -> list[Path]:
    """What the project wheel is built from (setuptools packages pipeline* and flows*, plus the metadata files)."""
    files = [REPO / "pyproject.toml", REPO / "README.md"]
    for pkg in ("pipeline", "flows"):
        files += sorted(f for f in (REPO / pkg).rglob("*.py") if "__pycache__" not in f.parts)
    return files


def sources_digest() -> str:
    h = hashlib.sha256()
    for f in project_sources():
        h.update(f.relative_to(REPO).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def project_wheel(py: Path) -> Path:
    """The project as a wheel, built offline from a copy of its sources (no build output lands in the checkout);
    reproducible, so an unchanged checkout gives the same wheel and the image build a cache hit."""
    out = WHEELHOUSE / "project"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    digest = sources_digest()
    with tempfile.TemporaryDirectory(prefix="detflow-wheel-") as tmp:
        src = Path(tmp) / "detflow"
        for f in project_sources():
            (src / f.relative_to(REPO)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, src / f.relative_to(REPO))
        env = {**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH}
        cmd = [py, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index", "--no-build-isolation", "--wheel-dir",
               out, src]
        print("+", " ".join(map(str, cmd)), flush=True)
        done = subprocess.run(list(map(str, cmd)), env=env, capture_output=True, text=True)  # setuptools is chatty
        if done.returncode:
            raise BuildError(f"the project wheel did not build: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    write_lock(out)
    (out / "SOURCES.sha256").write_text(digest + "\n")
    (wheel,) = out.glob("detflow-*.whl")
    return wheel


def refresh_project_wheel() -> None:
    """Before a build: rebuild the project wheel when the sources changed (offline), so an image never carries
    stale code; without the wheelhouse's pip venv (a wheelhouse carried to another machine) a stale wheel stops."""
    stamp = WHEELHOUSE / "project" / "SOURCES.sha256"
    if stamp.is_file() and stamp.read_text().strip() == sources_digest():
        return
    tool = REPO / "build" / "pip-tool" / "bin" / "python"
    if not tool.exists():
        raise BuildError("the project wheel in build/wheelhouse/project is older than the sources: run "
                         "`make wheelhouse`")
    project_wheel(tool)


def wheelhouse(images: Sequence[str]) -> None:
    start = time.monotonic()
    py = pip_tool()
    for image in images:
        folder = WHEELHOUSE / image
        wanted = (f"# resolved with Python {python_version(py)} (markers are evaluated for it)\n"
                  + "\n".join(pinned_requirements(image)) + "\n")
        reqs, lock = folder / "requirements.in", folder / "requirements.txt"
        if lock.is_file() and reqs.is_file() and reqs.read_text() == wanted:
            print(f"{image}: the wheelhouse already holds these pins ({reqs})")
            continue
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        reqs.write_text(wanted)
        run([py, "-m", "pip", "wheel", "--quiet", "--wheel-dir", folder, "-r", reqs])
        lock = write_lock(folder)
        size = sum(f.stat().st_size for f in folder.glob("*.whl"))
        print(f"{image}: {len(lock.read_text().splitlines()) - 1} wheels, {size / 2**20:.0f} MiB in {folder}")
    wheel = project_wheel(py)
    print(f"project: {wheel.name}; wheelhouse made in {time.monotonic() - start:.0f} s")


# ---------------------------------------------------------------------------------------------- engines


def engine() -> tuple[str | None, str]:
    """("docker" | "buildah" | None, why): a Docker engine that answers wins; buildah needs no daemon."""
    forced = os.environ.get("DETFLOW_IMAGE_ENGINE", "")
    reasons = []
    for name in (forced,) if forced else ("docker", "buildah"):
        if name not in ("docker", "buildah"):
            return None, f"DETFLOW_IMAGE_ENGINE={name!r}: expected docker or buildah"
        exe = shutil.which(name)
        if exe is None:
            reasons.append(f"{name} is not installed")
            continue
        probe = [exe, "info"] if name == "docker" else [exe, *storage_args(), "info"]
        try:
            done = subprocess.run(probe, capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            reasons.append(f"`{name} info` did not answer in 30 s")
            continue
        if done.returncode == 0:
            return name, f"{name} answers"
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        reasons.append(f"`{name} info` failed: {last}")
    return None, "; ".join(reasons)


def storage_args() -> list[str]:
    """buildah's storage driver: STORAGE_DRIVER when set, else overlay where the kernel has it and the storage is
    not itself on overlayfs (inside a container), else vfs (a full copy per layer: slower, bigger)."""
    driver = os.environ.get("STORAGE_DRIVER")
    if not driver:
        root = Path("/var/lib/containers/storage")
        while not root.exists():
            root = root.parent
        fs_types = {line.split()[1]: line.split()[2] for line in Path("/proc/mounts").read_text().splitlines()}
        mount = max((m for m in fs_types if str(root).startswith(m)), key=len, default="/")
        overlay_ok = "overlay" in Path("/proc/filesystems").read_text() and fs_types.get(mount) != "overlay"
        driver = "overlay" if overlay_ok else "vfs"
    return ["--storage-driver", driver]


def qualified(tool: str, ref: str) -> str:
    """buildah does not guess registries for short names offline: local tags live under localhost/, public names
    under docker.io (what Docker assumes)."""
    if tool == "docker" or "/" in ref.split(":")[0] and "." in ref.split("/")[0] or ref.startswith("localhost/"):
        return ref
    if ref.startswith("detflow-"):
        return f"localhost/{ref}"
    return f"docker.io/{ref}" if "/" in ref.split(":")[0] else f"docker.io/library/{ref}"


def image_ref(tool: str, image: str) -> str:
    """The reference of a built image (serve, train) for ``tool``."""
    return qualified(tool, TAGS[image])


def image_exists(tool: str, ref: str) -> bool:
    ref = qualified(tool, ref)
    cmd = [tool, "image", "inspect", ref] if tool == "docker" else [tool, *storage_args(), "inspect", "--type",
                                                                    "image", ref]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def dockerfile_base(image: str) -> str:
    text = (REPO / "docker" / f"{image}.Dockerfile").read_text()
    found = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M)
    if not found:
        raise BuildError(f"docker/{image}.Dockerfile has no `ARG BASE_IMAGE=...` default")
    return found.group(1)


# ---------------------------------------------------------------------------------------------- debootstrap base


def apt_mirror(suite: str = DEBIAN_SUITE, root: Path = Path("/etc/apt")) -> str:
    """The first Debian mirror in this machine's apt sources that serves ``suite`` (main): one-line and deb822."""
    files = [root / "sources.list", *sorted((root / "sources.list.d").glob("*.list")),
             *sorted((root / "sources.list.d").glob("*.sources"))]
    for f in files:
        if not f.is_file():
            continue
        text = f.read_text()
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.strip().startswith("#") or ":" not in line:
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if ("deb" in fields.get("types", "").split() and suite in fields.get("suites", "").split()
                        and "main" in fields.get("components", "").split() and fields.get("enabled", "yes") != "no"):
                    return fields["uris"].split()[0]
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^\]]*\]", "", line.split("#")[0]).split()
                if len(words) >= 4 and words[0] == "deb" and words[2] == suite and "main" in words[3:]:
                    return words[1]
    raise BuildError(f"no apt source for Debian {suite} main in {root}/sources.list*; pass --base IMAGE "
                     "(a local image with python3.11) or set DETFLOW_DEBIAN_MIRROR")


def remove_tree(path: Path) -> None:
    """Delete a debootstrap work folder, never through a mount an interrupted debootstrap left (its /proc, /dev)."""
    if not path.exists():
        return
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    inside = [m for m in mounts if m.startswith(str(path.resolve()) + "/")]
    if inside:
        raise BuildError(f"{inside[0]} is still mounted (an interrupted debootstrap?): `umount -R {inside[0]}` "
                         f"and run again")
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def local_base(tool: str, image: str) -> str:
    """A Python 3.11 Debian base image made by debootstrap from the apt mirror (once; reused while it exists)."""
    ref = f"localhost/detflow-base-{image}:{DEBIAN_SUITE}"
    if image_exists(tool, ref):
        return ref
    if shutil.which("debootstrap") is None:
        raise BuildError("the public base image is not available locally and debootstrap is not installed "
                         "(apt-get install debootstrap), or pass --base IMAGE")
    if os.geteuid() != 0:
        raise BuildError("debootstrap needs root to make the local base image; run as root or pass --base IMAGE")
    mirror = os.environ.get("DETFLOW_DEBIAN_MIRROR") or apt_mirror()
    work = BASE_DIR / image
    remove_tree(work)
    rootfs = work / "rootfs"
    rootfs.mkdir(parents=True)
    start = time.monotonic()
    run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES[image])}", DEBIAN_SUITE, rootfs,
         mirror], stdout=subprocess.DEVNULL)
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for f in (rootfs / cache).glob("*"):
            if f.is_file():
                f.unlink()
    run(["tar", "--numeric-owner", "-C", rootfs, "-cf", work / "rootfs.tar", "."])
    remove_tree(rootfs)
    shutil.copy(REPO / "docker" / "base.Dockerfile", work / "Dockerfile")
    build_cmd(tool, ref, work / "Dockerfile", work, {}, None)
    (work / "rootfs.tar").unlink()
    print(f"local base {ref} made from {mirror} in {time.monotonic() - start:.0f} s")
    return ref


# ---------------------------------------------------------------------------------------------- build


def build_cmd(tool: str, tag: str, dockerfile: Path, context: Path, args: dict[str, str], wheels: Path | None
              ) -> None:
    extra = [a for k, v in args.items() for a in ("--build-arg", f"{k}={v}")]
    if wheels is not None:
        extra += ["--build-context", f"wheels={wheels}"]
    if tool == "docker":
        run(["docker", "build", "--network", "none", "-f", dockerfile, "-t", tag, *extra, context],
            env={**os.environ, "DOCKER_BUILDKIT": "1"})
    else:
        # chroot isolation shares the host's network, so buildah itself runs in a new, empty network namespace
        # (as root): nothing in the build can reach the network. docker format keeps the HEALTHCHECK.
        offline = ["unshare", "--net"] if os.geteuid() == 0 and shutil.which("unshare") else []
        run([*offline, "buildah", *storage_args(), "bud", "--layers", "--isolation", "chroot", "--format", "docker",
             "-f", dockerfile, "-t", tag, *extra, context])


def build(images: Sequence[str], base: str) -> dict[str, float]:
    tool, why = engine()
    if tool is None:
        raise BuildError(f"no image builder: {why} (install Docker, or buildah: apt-get install buildah)")
    timings: dict[str, float] = {}
    for image in images:  # a missing wheelhouse is named first: refreshing the project wheel cannot make one
        lock = WHEELHOUSE / image / "requirements.txt"
        if not lock.is_file() or not (WHEELHOUSE / "project" / "requirements.txt").is_file():
            raise BuildError(f"no wheelhouse for {image}: run `make wheelhouse IMAGES=\"{' '.join(images)}\"`")
    refresh_project_wheel()
    for image in images:
        default = dockerfile_base(image)
        if base == "public" or (base == "auto" and image_exists(tool, default)):
            args = {"BASE_IMAGE": qualified(tool, default)}
        elif base in ("auto", "debootstrap"):
            args = {"BASE_IMAGE": local_base(tool, image)}
        else:
            args = {"BASE_IMAGE": base}
        start = time.monotonic()
        build_cmd(tool, image_ref(tool, image), REPO / "docker" / f"{image}.Dockerfile", REPO, args, WHEELHOUSE)
        timings[image] = time.monotonic() - start
        print(f"{image_ref(tool, image)} built by {tool} on {args['BASE_IMAGE']} in {timings[image]:.0f} s")
    return timings


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="docker/images.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wheelhouse", help="pip wheel each image's pinned dependencies and the project")
    w.add_argument("images", nargs="*", choices=IMAGES, default=["serve"])
    b = sub.add_parser("build", help="build the images from the wheelhouse, offline")
    b.add_argument("images", nargs="*", choices=IMAGES, default=["serve"])
    b.add_argument("--base", default=os.environ.get("BASE_IMAGE") or "auto",
                   help="auto (the public base when present locally, else debootstrap), public, debootstrap, or an "
                        "image reference")
    sub.add_parser("engine", help="print the image builder that would be used")
    a = p.parse_args(argv)
    try:
        if a.command == "wheelhouse":
            wheelhouse(a.images)
        elif a.command == "build":
            build(a.images, a.base)
        else:
            tool, why = engine()
            print(tool or "none", "-", why)
            return 0 if tool else 1
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"error: `{' '.join(map(str, e.cmd))}` exited with {e.returncode}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
