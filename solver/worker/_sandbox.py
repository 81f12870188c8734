"""The sandbox of ``exec`` steps: the ``bwrap`` command line, the system root, limits.

Every ``exec`` step runs under bubblewrap (``bwrap``) unless the worker was made
with ``sandbox="none"``. :func:`bwrap_argv` is a pure function from a
:class:`SandboxSpec` to the command line; the rest of this module are the few
host look-ups it needs (where ``bwrap`` is, what the system-root paths are on this
host, a pids cgroup for the process limit), kept apart so the command line can be
unit-tested without running anything.

What a sandboxed step sees (``docs/worker.md``, "Sandbox", says the same for users):

* a read-only, otherwise empty root file system (``/``) holding only:
  the system-root paths (:data:`DEFAULT_ROOTFS` or the op's ``rootfs``), bound
  read-only at the same paths (a host symlink such as ``/bin -> usr/bin`` is
  recreated as that symlink); a fresh ``/proc`` of its own PID namespace; a
  minimal ``/dev`` (``null``, ``zero``, ``full``, ``random``, ``urandom``, ``tty``,
  ``shm``, ``pts``, ``ptmx`` and the ``fd``/``std*`` links); a private, empty,
  writable ``/tmp``; the exec root ``R`` at :data:`SANDBOX_ROOT` (writable mounts
  writable, read-only mounts bound read-only on top, so even root cannot write
  them); the secrets it names, read-only, in :data:`SECRETS_DIR`;
* new mount, PID, IPC, UTS (hostname :data:`HOSTNAME`), cgroup, user and network
  namespaces (with ``network="host"`` the host's network namespace is kept);
* only the environment the op declares on top of :data:`BASE_ENV`, plus
  ``SOLVER_ROOT`` (the caller's environment is cleared);
* no capabilities except, when the worker runs as root, the file-owner ones a
  build expects of root (:data:`ROOT_CAPS`): it cannot mount, remount, or use raw
  sockets; it dies with the worker (``--die-with-parent``) and has no terminal
  (``--new-session``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

__all__ = [
    "BASE_ENV",
    "DEFAULT_ROOTFS",
    "HOSTNAME",
    "INSTALL_HINT",
    "ROOT_CAPS",
    "SANDBOX_ROOT",
    "SECRETS_DIR",
    "Network",
    "PidsCgroup",
    "RootfsEntry",
    "SandboxMode",
    "SandboxSpec",
    "bwrap_argv",
    "find_bwrap",
    "limit_prefix",
    "resolve_rootfs",
]

SandboxMode = Literal["bwrap", "none"]
"""``"bwrap"`` (the default): every exec step runs in a bubblewrap sandbox;
``"none"``: on the host, as a plain process (an explicit choice, shown in progress)."""

Network = Literal["none", "host"]
"""An exec op's network: ``"none"`` (the default: a new network namespace with only
a loopback device that is down) or ``"host"`` (the host's network)."""

SANDBOX_ROOT: Final = "/build"
"""Where the exec root ``R`` (the mounts) is inside the sandbox. A fixed path, so
that what a step writes (paths in debug info, say) does not depend on the host's
per-exec directory."""

SECRETS_DIR: Final = "/run/secrets"
"""Where the secrets an op names are, one read-only file per id."""

HOSTNAME: Final = "sandbox"
"""The hostname a sandboxed step sees (its own UTS namespace)."""

DEFAULT_ROOTFS: Final[tuple[str, ...]] = (
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc/alternatives",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/passwd",
    "/etc/group",
)
"""The system root when an op gives no ``rootfs``: the host paths the tools of a
Debian-like system (a shell, coreutils, ``cc``, ``make``) need, bound read-only.
Paths missing on the host are skipped. ``/etc/alternatives`` holds the
``cc -> gcc`` links, ``ld.so.*`` the dynamic loader's configuration, and
``passwd``/``group`` let tools name uid 0."""

BASE_ENV: Final[Mapping[str, str]] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/tmp",
    "LANG": "C.UTF-8",
}
"""The environment every step starts from (sandboxed or not); the op's ``env``
may replace these. ``HOME`` is the private ``/tmp`` in the sandbox (a per-exec
empty directory without one), so nothing in the caller's home is read."""

ROOT_CAPS: Final[tuple[str, ...]] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
)
"""Capabilities a step keeps when the worker runs as root (every other one is
dropped): what root needs to own and change files in its writable mounts as it
would without a sandbox (write into a ``0555`` directory it made, ``chown``).
They act only inside the sandbox's user namespace; read-only binds stay
read-only (that is the mount, not a permission), and without ``CAP_SYS_ADMIN``
nothing can be remounted."""

INSTALL_HINT: Final = (
    "install bubblewrap (Debian/Ubuntu: 'apt-get install bubblewrap'; Fedora: "
    "'dnf install bubblewrap'; Arch: 'pacman -S bubblewrap'), or run steps "
    "without a sandbox explicitly with Worker(sandbox=\"none\")"
)
"""What the error for a missing ``bwrap`` tells the user to do."""


@dataclass(frozen=True, slots=True)
class RootfsEntry:
    """One system-root path as it is on this host: bound read-only, or, when the
    host path is a symlink, recreated as the same symlink (``/bin -> usr/bin``)."""

    path: str
    symlink: str | None = None


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """Everything :func:`bwrap_argv` needs for one step.

    ``root`` is the host path of the exec root ``R``; ``readonly`` the relative
    destinations (component tuples) of its read-only mounts, bound read-only on
    top of it in the order given (parents first); ``cwd`` is relative to ``R``;
    ``env`` the complete environment of the step (``SOLVER_ROOT`` included);
    ``secrets`` maps a secret id to the host file that holds it. ``bound`` maps
    the destination of a read-only mount to the host directory bound there (a
    committed snapshot, bound as it is instead of copied); a read-only mount not
    in it binds what ``R`` holds at its destination."""

    args: tuple[str, ...]
    root: str
    cwd: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    rootfs: tuple[RootfsEntry, ...] = ()
    readonly: tuple[tuple[str, ...], ...] = ()
    network: Network = "none"
    secrets: Mapping[str, str] = field(default_factory=dict)
    as_root: bool = False
    bound: Mapping[tuple[str, ...], str] = field(default_factory=dict)


def bwrap_argv(bwrap: str, spec: SandboxSpec) -> list[str]:
    """The ``bwrap`` command line that runs ``spec.args`` in the sandbox described
    in the module docstring. Pure: no file system access."""
    argv = [bwrap, "--unshare-all"]
    if spec.network == "host":
        argv.append("--share-net")
    argv += ["--hostname", HOSTNAME, "--die-with-parent", "--new-session"]
    argv += ["--cap-drop", "ALL"]
    if spec.as_root:
        for cap in ROOT_CAPS:
            argv += ["--cap-add", cap]
    # /tmp first, so that a system-root path below it (a tool in a temporary
    # directory) is bound on top of the private tmpfs rather than hidden by it.
    argv += ["--tmpfs", "/tmp"]
    for entry in spec.rootfs:
        if entry.symlink is not None:
            argv += ["--symlink", entry.symlink, entry.path]
        else:
            argv += ["--ro-bind", entry.path, entry.path]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    argv += ["--bind", spec.root, SANDBOX_ROOT]
    for parts in spec.readonly:
        source = spec.bound.get(parts) or "/".join((spec.root, *parts))
        argv += ["--ro-bind", source, "/".join((SANDBOX_ROOT, *parts))]
    for name in sorted(spec.secrets):
        argv += ["--ro-bind", spec.secrets[name], f"{SECRETS_DIR}/{name}"]
    # Everything is in place: the empty root tmpfs bwrap built becomes read-only,
    # so a step cannot write anywhere but its writable mounts and /tmp.
    argv += ["--remount-ro", "/"]
    argv += ["--chdir", "/".join((SANDBOX_ROOT, *spec.cwd))]
    argv.append("--clearenv")
    for name in sorted(spec.env):
        argv += ["--setenv", name, spec.env[name]]
    argv.append("--")
    argv += spec.args
    return argv


def limit_prefix(prlimit: str, *, memory: int | None, processes: int | None) -> list[str]:
    """``prlimit --as=N --nproc=N --`` for the rlimits given (empty for none).
    Rlimits are inherited by ``bwrap`` and so by the step. ``RLIMIT_NPROC`` is not
    enforced for root: a root worker bounds processes with :class:`PidsCgroup`
    instead and passes ``processes=None`` here."""
    args: list[str] = []
    if memory is not None:
        args.append(f"--as={memory}")
    if processes is not None:
        args.append(f"--nproc={processes}")
    return [prlimit, *args, "--"] if args else []


# -- host look-ups ------------------------------------------------------------------------


def find_bwrap() -> str | None:
    """The path of ``bwrap`` on the worker's ``PATH`` (or in ``/usr/bin``), or
    ``None``."""
    return shutil.which("bwrap") or shutil.which("bwrap", path="/usr/bin:/bin")


def resolve_rootfs(paths: Sequence[str]) -> tuple[RootfsEntry, ...]:
    """The system-root paths as they are on this host: missing ones left out,
    symlinks kept as symlinks (their target read, never followed). In a worker
    thread: it touches the file system."""
    entries: list[RootfsEntry] = []
    for path in paths:
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode):
            entries.append(RootfsEntry(path, os.readlink(path)))
        else:
            entries.append(RootfsEntry(path))
    return tuple(entries)


_CGROUP_BASES: Final = ("/sys/fs/cgroup/pids", "/sys/fs/cgroup")


class PidsCgroup:
    """A pids cgroup (v1 or v2) with ``pids.max`` set, for one step: how a root
    worker bounds the number of processes (the kernel does not apply
    ``RLIMIT_NPROC`` to root). The step joins it through :meth:`join_prefix`
    before ``bwrap`` starts, so every process of the step is counted.

    :meth:`create` returns ``None`` where no writable pids controller exists."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self.limit = limit

    @classmethod
    def create(cls, name: str, limit: int) -> PidsCgroup | None:
        """A new cgroup ``name`` under the first writable pids hierarchy, or
        ``None``. In a worker thread."""
        for base in map(Path, _CGROUP_BASES):
            if not (base / "cgroup.procs").exists():
                continue
            controllers = base / "cgroup.controllers"
            if controllers.exists():  # v2: pids must be enabled for children
                try:
                    if "pids" not in controllers.read_text().split():
                        continue
                    control = base / "cgroup.subtree_control"
                    if "pids" not in control.read_text().split():
                        control.write_text("+pids")
                except OSError:
                    continue
            path = base / name
            try:
                path.mkdir()
            except OSError:
                continue
            try:
                (path / "pids.max").write_text(str(limit))
            except OSError:
                with contextlib.suppress(OSError):
                    path.rmdir()
                continue
            return cls(path, limit)
        return None

    def join_prefix(self, shell: str = "/bin/sh") -> list[str]:
        """A command prefix that moves itself into the cgroup, then ``exec``\\ s the
        rest of the command line."""
        return [shell, "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs")]

    def hit_limit(self) -> bool:
        """Whether a fork failed because of ``pids.max`` (``pids.events``)."""
        try:
            for line in (self.path / "pids.events").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "max":
                    return int(value) > 0
        except (OSError, ValueError):
            pass
        return False

    def remove(self) -> None:
        """Kill whatever is left in the cgroup and remove it. In a worker thread."""
        for _ in range(100):
            try:
                pids = (self.path / "cgroup.procs").read_text().split()
            except OSError:
                pids = []
            for pid in pids:
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.01)  # busy: its processes are still exiting
