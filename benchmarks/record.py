"""Write one benchmark script's section of BENCHMARKS.md, leaving the other sections as they are."""

from __future__ import annotations

from pathlib import Path

HEADER = """# Benchmarks

Measured figures of lexi-pl. Each section is written by the script it names, between its
`<!-- NAME:start -->` and `<!-- NAME:end -->` markers, and a later run of that script with `--write`
replaces only its own section. Every section names the command, the machine and the library versions
behind its numbers. Absolute times hold for that machine and its load only, so compare the ratios
measured within one run.
"""


def replace_section(path: Path, name: str, body: str) -> None:
    """Put `body` between the ``<!-- name:start -->`` and ``<!-- name:end -->`` markers of `path`.

    The section is appended when the markers are missing, and the file is created with a short header when it does
    not exist.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else HEADER
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
