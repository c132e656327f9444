"""Byte sizes written the way people write them: '80GB' (10**9), '80GiB' (2**30), '512MB', or a byte count."""

from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def byte_count(size: int | str) -> int | None:
    """`size` as a positive number of bytes (a positive int, or a number and a unit in any case), or None
    when it is not one; the caller words the error."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        return None
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
