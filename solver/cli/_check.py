"""``solver build --check``: rebuild every op from scratch and report what differs.

The work is :func:`solver.bridge.check_determinism`; this module prints its
report. One line per op output that differs, failed to rebuild or could not be
compared, then a summary line::

    stamp: differs at t.txt (content): from byte 11: b'69834410\\n' in the cached
    output, b'99680202\\n' in the rebuild
    check: 1 of 4 op outputs differs, 3 are the same

(each on one line). The exit status is 0 when no output differs and no rebuild
failed, 1 otherwise: an output that could not be compared (an application's own
kind, a result that is not a snapshot) is listed but does not fail the check, as
nothing says it is not deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TextIO

from ..bridge import CheckReport, Solver, check_determinism
from ..definition import Definition
from ..worker import SecretSource
from ._progress import one_line

__all__ = ["format_report", "run_check"]


def format_report(report: CheckReport) -> list[str]:
    """The lines ``solver build --check`` prints for ``report`` (each ending in a
    newline): one per output that differs, failed or was not compared, in build
    order, then the summary."""
    lines: list[str] = []
    for c in report.outputs:
        if c.status == "differs":
            assert c.difference is not None
            diff = c.difference
            lines.append(f"{c.label}: differs at {diff.path} ({diff.reason}): {diff.detail}")
        elif c.status == "failed":
            lines.append(f"{c.label}: the rebuild failed: {c.reason}")
        elif c.status == "not compared":
            lines.append(f"{c.label}: not compared: {c.reason}")
    total = len(report.outputs)
    differs, failed = report.count("differs"), report.count("failed")
    same, skipped = report.count("same"), report.count("not compared")
    if report.ok and not skipped:
        summary = (
            f"all {total} op outputs are the same" if total != 1 else "the op output is the same"
        )
    else:
        parts = []
        if differs:
            parts.append(
                f"{differs} of {total} op outputs {'differs' if differs == 1 else 'differ'}"
            )
        if failed:
            parts.append(f"{failed} failed to rebuild")
        parts.append(f"{same} {'is' if same == 1 else 'are'} the same")
        if skipped:
            parts.append(f"{skipped} not compared")
        summary = ", ".join(parts)
    lines.append(f"check: {summary}")
    return [one_line(line) + "\n" for line in lines]


async def run_check(
    solver: Solver,
    defn: Definition,
    out: TextIO,
    *,
    secrets: Mapping[str, SecretSource] | None = None,
) -> int:
    """Check that ``defn`` builds deterministically in ``solver`` (whose worker is
    the one the build used) and print the report to ``out``; return the exit
    status: 0 when no op output differs and no rebuild failed, else 1. The
    rebuild's exec steps see ``secrets``. A failure of the build itself raises
    :class:`~solver.SolveError`, as ``solver build`` does."""
    out.write("check: rebuilding every op in a scratch store\n")
    out.flush()
    report = await check_determinism(solver, defn, secrets=secrets)
    out.writelines(format_report(report))
    out.flush()
    return 0 if report.ok else 1
