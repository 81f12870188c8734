"""Platform names and the binary-compatibility table of the buildfile frontend.

A platform is ``os/arch`` or ``os/arch/variant`` (``linux/amd64``,
``linux/arm/v7``). The frontend knows the platforms in :data:`FAMILIES`; a few
common spellings are accepted for them (:data:`ALIASES`) and normalised.

Binary compatibility. Each family lists platforms from the most portable to the
least: a program built for an earlier member runs on every later one (an i386
program runs on any x86-64 machine; an x86-64-v2 machine runs baseline x86-64
programs; an ARMv7 core runs ARMv6 code). When a build asks for several members
of one family, they share one build, made for the most portable member asked
for, and the frontend returns that one result under each of their keys.
Platforms of different families never share.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from ._errors import BuildfileError

__all__ = ["ALIASES", "FAMILIES", "Platform", "PlatformBuild", "group_platforms", "parse_platforms"]

#: Compatibility families, each from the most portable member to the least.
FAMILIES: Final[dict[str, tuple[str, ...]]] = {
    "x86": (
        "linux/386",
        "linux/amd64",
        "linux/amd64/v2",
        "linux/amd64/v3",
        "linux/amd64/v4",
    ),
    "arm": ("linux/arm/v5", "linux/arm/v6", "linux/arm/v7"),
    "arm64": ("linux/arm64",),
    "ppc64le": ("linux/ppc64le",),
    "riscv64": ("linux/riscv64",),
    "s390x": ("linux/s390x",),
}

#: Other spellings accepted for known platforms.
ALIASES: Final[dict[str, str]] = {
    "linux/i386": "linux/386",
    "linux/x86_64": "linux/amd64",
    "linux/amd64/v1": "linux/amd64",
    "linux/aarch64": "linux/arm64",
    "linux/arm64/v8": "linux/arm64",
    "linux/arm": "linux/arm/v7",
}

_RANK: Final[dict[str, tuple[str, int]]] = {
    name: (family, rank) for family, members in FAMILIES.items()
    for rank, name in enumerate(members)
}


@dataclass(frozen=True, slots=True)
class Platform:
    """A known platform: ``os``, ``arch`` and ``variant`` (``""`` when none)."""

    os: str
    arch: str
    variant: str = ""

    @property
    def name(self) -> str:
        """``os/arch`` or ``os/arch/variant``."""
        return "/".join(p for p in (self.os, self.arch, self.variant) if p)

    @property
    def family(self) -> str:
        """The compatibility family (a key of :data:`FAMILIES`)."""
        return _RANK[self.name][0]

    @property
    def rank(self) -> int:
        """Position in the family: lower is more portable."""
        return _RANK[self.name][1]

    def env(self) -> dict[str, str]:
        """``TARGETPLATFORM``, ``TARGETOS``, ``TARGETARCH``, ``TARGETVARIANT``."""
        return {
            "TARGETPLATFORM": self.name,
            "TARGETOS": self.os,
            "TARGETARCH": self.arch,
            "TARGETVARIANT": self.variant,
        }

    @classmethod
    def parse(cls, text: str) -> Platform:
        """The known platform ``text`` names (normalised through :data:`ALIASES`).
        Raises :class:`BuildfileError` naming the known platforms (and the
        closest one, for a likely typo)."""
        name = text.strip().lower()
        name = ALIASES.get(name, name)
        if name not in _RANK:
            known = sorted(_RANK)
            close = difflib.get_close_matches(name, [*known, *ALIASES], n=1, cutoff=0.85)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise BuildfileError(
                f"unknown platform {text!r}{hint}; known platforms: {', '.join(known)}"
            )
        os_, arch, *rest = name.split("/")
        return cls(os_, arch, rest[0] if rest else "")


def parse_platforms(items: Iterable[str], where: str) -> list[Platform]:
    """Known platforms from ``items`` (names, in order); ``where`` says where they
    came from, for errors. Empty items are skipped; a platform named twice (in any
    spelling) and an empty list are errors."""
    platforms: list[Platform] = []
    for item in items:
        if not item.strip():
            continue
        try:
            platform = Platform.parse(item)
        except BuildfileError as exc:
            raise BuildfileError(f"{where}: {exc}") from None
        if platform in platforms:
            raise BuildfileError(f"{where}: platform {platform.name!r} is given twice")
        platforms.append(platform)
    if not platforms:
        raise BuildfileError(f"{where}: no platforms given")
    return platforms


@dataclass(frozen=True, slots=True)
class PlatformBuild:
    """One build: made for ``target``, serving every platform in ``serves``
    (``target`` among them), in the order they were asked for."""

    target: Platform
    serves: tuple[Platform, ...]


def group_platforms(platforms: Sequence[Platform]) -> list[PlatformBuild]:
    """One :class:`PlatformBuild` per family among ``platforms``, in the order the
    families first appear; each is made for the family's most portable platform
    asked for."""
    families: dict[str, list[Platform]] = {}
    for platform in platforms:
        families.setdefault(platform.family, []).append(platform)
    return [
        PlatformBuild(min(members, key=lambda p: p.rank), tuple(members))
        for members in families.values()
    ]
