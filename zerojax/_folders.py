"""Output folders that must not overlap the folders a run or an export reads."""

from __future__ import annotations

import os


def refuse_overlap(who: str, out_dir: str | os.PathLike, inputs, error: type[Exception] = ValueError) -> None:
    """Raises `error` when `out_dir` is, is inside or contains one of the folders `inputs` (symlinks
    resolved): an export there would replace or delete what it reads."""
    out = os.path.realpath(out_dir)
    for source in sorted(map(os.fspath, inputs)):
        src = os.path.realpath(source)
        common = os.path.commonpath([out, src])
        if common not in (out, src):
            continue
        relation = "is" if out == src else "is inside" if common == src else "contains"
        resolved = (out, src) != (os.path.abspath(out_dir), os.path.abspath(source))
        real = f" (through symlinks: {out} {relation} {src})" if resolved else ""
        raise error(f"{who}: the output folder {os.fspath(out_dir)!r} {relation} the folder {source!r} that the export "
                    f"reads{real}; writing there could delete or replace it, so nothing was written; choose an "
                    f"output folder outside {source!r} that does not contain it.")
