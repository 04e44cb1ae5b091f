"""Builds the images docker-compose.yml needs where no image registry is reachable, from Debian's packages and PyPI:

* a Debian base (``debootstrap`` from the mirror this machine's apt uses, imported with ``docker import``) with
  Python, laid out like the official Python image (``python`` and ``pip`` on PATH, pip may install);
* Redis, RabbitMQ (management and Prometheus plugins on) and Prometheus from Debian's packages on that base
  (deploy/images/<name>/Dockerfile);
* the project image (the top-level Dockerfile with ``BASE_IMAGE`` set to that base).

Every image is tagged ``loadlab-local/<name>:<hash of its inputs>`` (never an official image's name); an image whose
tag exists is not built again, so a second run on the same machine costs seconds. Builds fetch packages over the
host's network (``--network host``). Prints one ``LOADLAB_LOCAL_<NAME>_IMAGE=tag`` line per image, the variables
deploy/compose.local-images.yml reads (``--env-file FILE`` writes them there too).

    python3 deploy/images/build.py [--env-file FILE]
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
# What the base holds beyond minbase: the official Python image's Python (Debian 12's is 3.11, as python:3.11-slim).
BASE_PACKAGES = ("python3", "python3-pip", "python3-venv", "ca-certificates")
# Part of the base's tag: change it when build_base() makes a different root file system from the same inputs.
BASE_RECIPE = "1"
SERVICES = ("redis", "rabbitmq", "prometheus")
# The project image's build context: what the Dockerfile copies (and the files that decide what it copies).
APP_INPUTS = ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md",
              "loadlab", "stack", "exporters", "loadtests", "reports", "dashboards")
SKIPPED_PARTS = {"__pycache__", ".pytest_cache"}
# Certificate authorities this machine added to its trust store (e.g. its egress proxy's): the images' builds fetch
# from PyPI over the same network, so the base trusts what the host trusts.
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")


def log(message: str) -> None:
    print(f"[images] {message}", file=sys.stderr, flush=True)


def host_suite() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    raise SystemExit("images: /etc/os-release names no VERSION_CODENAME; this script needs a Debian host.")


def apt_mirror(suite: str) -> str:
    """The URI this machine's apt fetches ``suite`` (main) from: the same mirror serves debootstrap and the builds."""
    sources = Path("/etc/apt")
    files = [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":  # deb822 stanzas
            for stanza in text.split("\n\n"):
                fields = {}
                for line in stanza.splitlines():
                    if line and not line.startswith("#") and ":" in line and not line[0].isspace():
                        key, value = line.split(":", 1)
                        fields[key.strip().lower()] = value.split()
                if suite in fields.get("suites", []) and "main" in fields.get("components", []) and fields.get("uris"):
                    return fields["uris"][0]
        else:  # one-line format: deb [options] URI suite components...
            for line in text.splitlines():
                words = [w for w in line.split("#", 1)[0].split() if not w.startswith("[")]
                if len(words) >= 4 and words[0] == "deb" and words[2] == suite and "main" in words[3:]:
                    return words[1]
    raise SystemExit(f"images: no apt source for {suite} main in /etc/apt; debootstrap needs a Debian mirror.")


def digest(*parts: str | bytes, paths: tuple[Path, ...] = ()) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    for root in paths:
        files = [root] if root.is_file() else sorted(
            p for p in root.rglob("*") if p.is_file() and not SKIPPED_PARTS & set(p.parts) and p.suffix != ".pyc")
        for path in files:
            h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0


def run(command: list[str], **kwargs) -> None:
    log("$ " + " ".join(command))
    subprocess.run(command, check=True, **kwargs)


def build_base() -> str:
    suite = host_suite()
    mirror = apt_mirror(suite)
    host_cas = tuple(sorted(HOST_CA_DIR.glob("*.crt")))
    tag = (f"loadlab-local/debian-python:{suite}-"
           f"{digest(BASE_RECIPE, suite, mirror, *BASE_PACKAGES, *(ca.read_bytes() for ca in host_cas))}")
    if image_exists(tag):
        return tag
    if shutil.which("debootstrap") is None:
        raise SystemExit("images: debootstrap is not installed (apt-get install debootstrap).")
    with tempfile.TemporaryDirectory(prefix="loadlab-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", suite, str(rootfs), mirror],
            stdout=subprocess.DEVNULL)
        # Like the official Python image: `python` and `pip` on PATH, and pip may install into the image's Python
        # (an image is its own environment, so Debian's externally-managed marker has nothing to protect).
        (rootfs / "usr/lib/python3.11/EXTERNALLY-MANAGED").unlink(missing_ok=True)
        for name, target in (("python", "/usr/bin/python3"), ("pip", "/usr/bin/pip3")):
            link = rootfs / "usr/local/bin" / name
            if not link.exists():
                link.symlink_to(target)
        if host_cas:
            for ca in host_cas:
                shutil.copy(ca, rootfs / "usr/local/share/ca-certificates" / ca.name)
            run(["chroot", str(rootfs), "update-ca-certificates"], stdout=subprocess.DEVNULL)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / junk).glob("*"):
                if path.is_file():
                    path.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        run(["docker", "import", "--change", 'CMD ["/bin/bash"]', "--change", "ENV LANG=C.UTF-8", "-", tag],
            stdin=tar.stdout, stdout=subprocess.DEVNULL)
        if tar.wait() != 0:
            raise SystemExit("images: tar of the debootstrap root failed")
    return tag


def build(tag: str, context: Path, base: str, dockerfile: Path | None = None) -> str:
    if not image_exists(tag):
        command = ["docker", "build", "--network", "host", "--build-arg", f"BASE_IMAGE={base}", "-t", tag]
        if dockerfile is not None:
            command += ["-f", str(dockerfile)]
        run(command + [str(context)], stdout=sys.stderr)  # stdout carries only the variables
    return tag


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-file", type=Path, help="also write the LOADLAB_LOCAL_*_IMAGE lines to this file")
    args = parser.parse_args()
    images: dict[str, str] = {}
    timings: list[str] = []

    def timed(name: str, make) -> None:
        started = time.monotonic()
        images[name] = make()
        timings.append(f"{name} {time.monotonic() - started:.1f}s")

    timed("base", build_base)
    base = images["base"]
    for name in SERVICES:
        context = HERE / name
        timed(name, lambda: build(f"loadlab-local/{name}:{digest(base, paths=(context,))}", context, base))
    app_tag = f"loadlab-local/app:{digest(base, paths=tuple(REPO / p for p in APP_INPUTS))}"
    timed("app", lambda: build(app_tag, REPO, base, REPO / "Dockerfile"))
    log("image times (0s-ish = already built): " + ", ".join(timings))
    lines = [f"LOADLAB_LOCAL_{name.upper()}_IMAGE={tag}" for name, tag in images.items()]
    if args.env_file:
        args.env_file.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
