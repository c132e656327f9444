"""Values as messages show them: shortened, so one bad input never floods an error."""

from __future__ import annotations

import math
import reprlib


class _Short(reprlib.Repr):
    """`reprlib` that shows an integer of any size by its number of digits."""

    def repr_int(self, x: int, level: int) -> str:
        if abs(x) < 10**20:
            return repr(x)
        return f"<an integer of ~{int(abs(x).bit_length() * math.log10(2)) + 1:,} digits>"


_SHORT = _Short()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlevel = 2
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = _SHORT.maxfrozenset = 4


def shown(value) -> str:
    """`repr(value)`, at most about 60 characters a string and 4 items a container."""
    return _SHORT.repr(value)
