"""The repository stands alone: no tracked file reads or cites a file outside it, and every relative
link in its Markdown resolves inside it, so a fresh clone with nothing beside it tests and runs."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Paths that climb out of the checkout, and documents that live beside it rather than in it.
OUTSIDE = re.compile(r"\.\./shared|parents\[\d+\]\.parent\b|\"shared\"\s*/|\b(?:DESIGN|REFERENCE)\.md\b")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in out.decode().split("\0") if name]


def text_of(path: Path) -> str | None:
    try:
        return path.read_text()
    except (UnicodeDecodeError, FileNotFoundError):
        return None


def test_no_tracked_file_reaches_outside_the_repository():
    me = Path(__file__).resolve()
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}"
        for path in tracked() if path != me and (text := text_of(path)) is not None
        for n, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)
    ]
    assert not hits, "files that depend on something outside the repository:\n" + "\n".join(hits)


def test_markdown_links_resolve_inside_the_repository():
    broken = []
    for path in tracked():
        if path.suffix != ".md" or (text := text_of(path)) is None:
            continue
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            resolved = (path.parent / target).resolve()
            if not resolved.exists() or ROOT not in resolved.parents and resolved != ROOT:
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not broken, "Markdown links that do not resolve inside the repository:\n" + "\n".join(broken)
