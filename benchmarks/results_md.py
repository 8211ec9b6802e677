"""Write one marked section of ``benchmarks/RESULTS.md`` and leave the others alone."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(section: str, begin: str, end: str, after: str | None = None) -> None:
    """Replace the text between ``begin`` and ``end`` (markers included in ``section``), or insert it
    after the line ``after`` (else at the end) when the markers are not there yet."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + section + tail
    elif after and after in text:
        text = text.replace(after, after + "\n\n" + section, 1)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(text)
