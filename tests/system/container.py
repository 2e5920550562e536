"""Build the Debian packages, a Debian 12 root file system, and boot it under a real systemd.

* :func:`build_packages` runs ``dpkg-buildpackage -b -us -uc`` in a
  temporary copy of the checkout (the checkout itself is never written);
  ``version`` adds a changelog entry there first (a newer build, as ``dch
  --local`` would make).
* :func:`base_image` is a minimal Debian 12 (``mmdebstrap --variant=minbase``)
  with systemd as init, cached as a tarball under :data:`CACHE` and rebuilt
  when its package list (or this recipe) changes. The package under test is
  not in it: :meth:`Root.apt_install` installs it with apt, so Debian
  resolves its dependencies from the distribution.
* :class:`Root` is one extracted copy: commands run in it with
  ``systemd-nspawn`` (not booted, with the host's network, for apt), and
  :meth:`Root.boot` boots it (``--boot --private-network --register=no
  --keep-unit``) with a probe unit (:mod:`tests.system.probe`) that runs one
  scenario, writes ``/ci/results.json`` and powers the container off. The
  evidence is that file and the container's own journal, read from outside
  with ``journalctl -D ROOT/var/log/journal``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent.parent
#: Outside the clone, kept between runs (CI on the same machine reuses it).
CACHE = Path(os.environ.get("VIF_HOTPLUG_CI_CACHE", "/var/cache/vif-hotplug-ci"))
SUITE = "bookworm"
#: What the image has besides minbase: an init, and what the probe uses that the package does
#: not depend on (xenstore-utils writes XenStore as the toolstack would; iproute2 makes veths).
IMAGE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "iproute2", "xenstore-utils")
#: Bumped when the recipe below changes in a way the package list does not show.
IMAGE_RECIPE = 1
#: The build and everything run on the host get this PATH: a python3 of a version manager
#: earlier on PATH (pyenv's, say) has neither Debian's modules nor its build tools.
HOST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
NSPAWN = ("systemd-nspawn", "--quiet", "--register=no", "--keep-unit")


def host_env(**extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TERM", "TMPDIR")}
    return {**keep, "PATH": HOST_PATH, "LC_ALL": "C.UTF-8", **extra}


def sh(*argv: str | os.PathLike[str], timeout: float = 600, env: Mapping[str, str] | None = None,
       cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=dict(env) if env is not None else host_env(), stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} exited {proc.returncode}:\n{proc.stdout[-4000:]}"
                             f"\n{proc.stderr[-4000:]}")
    return proc


# --- packages ---------------------------------------------------------------------------------


def checkout_files(root: Path = CHECKOUT) -> list[str]:
    """The checkout's files as git sees them (tracked, and new ones not ignored)."""
    out = sh("git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard").stdout
    return sorted({f for f in out.split("\0")
                   if f and not f.startswith(".venv") and (root / f).is_file()})


@dataclass(frozen=True)
class Build:
    version: str
    debs: dict[str, Path]
    changes: Path
    log: str


def build_packages(workdir: Path, version: str | None = None) -> Build:
    """``dpkg-buildpackage -b -us -uc`` in ``workdir/src``, a copy of the checkout."""
    src = workdir / "src"
    for name in checkout_files():
        target = src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(CHECKOUT / name, target)
    if version is not None:
        changelog = src / "debian" / "changelog"
        head = changelog.read_text().splitlines()
        trailer = next(line for line in head if line.startswith(" -- "))
        entry = (f"vif-hotplug ({version}) unstable; urgency=medium\n\n"
                 "  * Rebuild for the upgrade test (tests/system).\n\n"
                 f"{trailer}\n\n")
        changelog.write_text(entry + changelog.read_text())
    proc = sh("dpkg-buildpackage", "-b", "-us", "-uc", cwd=src, check=False, timeout=900)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"dpkg-buildpackage failed:\n{log[-6000:]}")
    built = sh("dpkg-parsechangelog", "-S", "Version", cwd=src).stdout.strip()
    debs = {p.name.split("_")[0]: p for p in workdir.glob(f"*_{built}_all.deb")}
    (changes,) = workdir.glob(f"vif-hotplug_{built}_*.changes")
    return Build(built, debs, changes, log)


def deb_contents(deb: Path) -> list[str]:
    """Paths in a .deb (``./usr/bin/x`` as ``/usr/bin/x``)."""
    listing = sh("dpkg-deb", "--contents", deb).stdout
    return sorted(line.split(None, 5)[5].split(" -> ")[0][1:].rstrip("/") or "/" for line in listing.splitlines())


def deb_field(deb: Path, name: str) -> str:
    return sh("dpkg-deb", "-f", deb, name).stdout.strip()


@dataclass(frozen=True)
class DoublePackage:
    """A stand-in for a package the test cannot install (Qubes' are not in Debian)."""

    name: str
    files: Mapping[str, tuple[str, int]]
    conffiles: Sequence[str] = ()
    depends: str = ""
    postinst: str = ""
    description: str = "test double"


def build_double(pkg: DoublePackage, workdir: Path) -> Path:
    stage = workdir / f"stage-{pkg.name}"
    for path, (text, mode) in pkg.files.items():
        target = stage / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)
    control = stage / "DEBIAN"
    control.mkdir(parents=True)
    fields = {"Package": pkg.name, "Version": "4.2.99-1", "Architecture": "all",
              "Maintainer": "vif-hotplug tests <tests@invalid>", "Description": pkg.description}
    if pkg.depends:
        fields["Depends"] = pkg.depends
    (control / "control").write_text("".join(f"{k}: {v}\n" for k, v in fields.items()))
    if pkg.conffiles:
        (control / "conffiles").write_text("".join(f"{c}\n" for c in pkg.conffiles))
    if pkg.postinst:
        (control / "postinst").write_text(pkg.postinst)
        (control / "postinst").chmod(0o755)
    out = workdir / f"{pkg.name}_4.2.99-1_all.deb"
    sh("dpkg-deb", "--root-owner-group", "-b", stage, out)
    return out


# --- the image ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def base_image() -> Path:
    """The cached minimal Debian 12 tarball (built here when missing or its recipe changed)."""
    key = hashlib.sha256(json.dumps([SUITE, "minbase", sorted(IMAGE_PACKAGES), IMAGE_RECIPE]).encode())
    tar = CACHE / f"{SUITE}-{key.hexdigest()[:16]}.tar"
    with _locked(CACHE / "image.lock"):
        if tar.exists():
            return tar
        for old in CACHE.glob(f"{SUITE}-*.tar"):
            old.unlink()
        partial = tar.with_name(tar.name + ".partial")
        # No mirror named: mmdebstrap uses the distribution's default one.
        sh("mmdebstrap", "--quiet", "--format=tar", "--variant=minbase", f"--include={','.join(IMAGE_PACKAGES)}",
           SUITE, partial, timeout=1800)
        partial.rename(tar)
        return tar


# --- a root file system ----------------------------------------------------------------------------


PROBE_UNIT = """\
[Unit]
Description=CI probe: one scenario of tests/system, then poweroff
After=multi-user.target

[Service]
# simple, not oneshot: the boot is over (is-system-running can answer) while it runs.
Type=simple
ExecStart=/usr/bin/python3 /ci/probe.py {scenario}
StandardOutput=journal
"""

#: The embedded XenStore of vif-hotplug-lab standing in for xenstored, which needs a hypervisor.
XENSTORED_UNIT = """\
[Unit]
Description=CI: embedded XenStore (vif-hotplug xenstored) standing in for xenstored
DefaultDependencies=no
After=local-fs.target
Before=vif-hotplug-init.service vif-hotplug-agent.service

[Service]
RuntimeDirectory=xenstored
RuntimeDirectoryPreserve=yes
ExecStart=/usr/bin/vif-hotplug xenstored --socket /run/xenstored/socket
ExecStartPost=/bin/sh -c 'for i in $(seq 200); do [ -S /run/xenstored/socket ] && exit 0; sleep 0.05; done; exit 1'

[Install]
WantedBy=multi-user.target
"""


@dataclass
class Boot:
    scenario: str
    results: dict[str, Any]
    journal: list[dict[str, Any]]
    console: str
    seconds: float

    def lines(self, **match: str) -> list[str]:
        """MESSAGE of the journal entries whose fields equal ``match`` (``SYSLOG_IDENTIFIER=...``)."""
        return [str(e.get("MESSAGE", "")) for e in self.journal
                if all(str(e.get(k)) == v for k, v in match.items())]


@dataclass
class Root:
    path: Path
    archives: Path = field(default_factory=lambda: CACHE / "archives")

    @classmethod
    def from_image(cls, tar: Path, parent: Path) -> Root:
        path = parent / "root"
        path.mkdir()
        sh("tar", "-C", path, "--numeric-owner", "-xf", tar, timeout=600)
        # A persistent journal (read from outside), and a fixed machine ID so every boot
        # writes into the same journal directory.
        (path / "var/log/journal").mkdir(parents=True, exist_ok=True)
        (path / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
        (path / "ci").mkdir()
        return cls(path)

    def write(self, rel: str, text: str, mode: int = 0o644) -> None:
        target = self.path / rel.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def enable(self, unit: str, target: str = "multi-user.target") -> None:
        wants = self.path / "etc/systemd/system" / f"{target}.wants"
        wants.mkdir(parents=True, exist_ok=True)
        link = wants / unit
        if not link.is_symlink():
            link.symlink_to(f"/etc/systemd/system/{unit}" if (self.path / "etc/systemd/system" / unit).exists()
                            else f"/lib/systemd/system/{unit}")

    def run(self, *argv: str, binds: Sequence[tuple[Path, str]] = (), timeout: float = 900,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """``argv`` in the root, not booted, with the host's network (apt)."""
        self.archives.joinpath("partial").mkdir(parents=True, exist_ok=True)
        # --console=pipe: no terminal, so a question (a conffile prompt, say) fails at once
        # instead of waiting for an answer that never comes.
        args = [*NSPAWN, "--console=pipe", "-D", str(self.path),
                "--bind", f"{self.archives}:/var/cache/apt/archives", "--setenv=DEBIAN_FRONTEND=noninteractive"]
        args += [f"--bind-ro={src}:{dst}" for src, dst in binds]
        return sh(*args, "--", *argv, timeout=timeout, check=check)

    def apt_install(self, debs: Sequence[Path], update: bool = True) -> str:
        """``apt-get install`` of local .deb files: apt resolves their dependencies from Debian."""
        staging = Path(tempfile.mkdtemp(prefix="debs-", dir=self.path.parent))
        for deb in debs:
            shutil.copy2(deb, staging / deb.name)
        script = "apt-get update -qq && " if update else ""
        script += "apt-get install -y -q " + " ".join(f"/debs/{d.name}" for d in debs)
        proc = self.run("sh", "-c", script, binds=[(staging, "/debs")])
        return proc.stdout + proc.stderr

    def boot(self, scenario: str, binds: Sequence[tuple[Path, str]] = (), timeout: float = 420) -> Boot:
        """Boot with the probe unit running ``scenario``; its results and this boot's journal."""
        shutil.copy2(HERE / "probe.py", self.path / "ci/probe.py")
        results = self.path / "ci/results.json"
        results.unlink(missing_ok=True)
        self.write("/etc/systemd/system/ci-probe.service", PROBE_UNIT.format(scenario=scenario))
        self.enable("ci-probe.service")
        args = [*NSPAWN, "--boot", "--private-network", "--link-journal=no", "--console=read-only",
                "-D", str(self.path)]
        args += [f"--bind-ro={src}:{dst}" for src, dst in binds]
        start = time.monotonic()
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=host_env())
        try:
            console, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # nspawn asks the container to power off
            try:
                console, _ = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                console, _ = proc.communicate()
            console += f"\n[test: the boot did not end within {timeout} s]"
        seconds = time.monotonic() - start
        (self.path / "etc/systemd/system/multi-user.target.wants/ci-probe.service").unlink()
        data = json.loads(results.read_text()) if results.exists() else {}
        journal = self.journal(str(data.get("boot_id", "")).replace("-", ""))
        return Boot(scenario, data, journal, console, seconds)

    def journal(self, boot_id: str) -> list[dict[str, Any]]:
        if not boot_id:
            return []
        out = sh("journalctl", "-D", self.path / "var/log/journal", "-o", "json", "--no-pager",
                 f"_BOOT_ID={boot_id}", check=False).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def missing_host_tools() -> list[str]:
    return [t for t in ("mmdebstrap", "systemd-nspawn", "dpkg-buildpackage", "dh", "lintian", "journalctl")
            if shutil.which(t, path=HOST_PATH) is None]
