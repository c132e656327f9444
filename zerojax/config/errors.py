"""The config package's exception and warnings, and the helpers that keep every message short."""

from __future__ import annotations

from zerojax._text import shown

MAX_LISTED = 5  # names a message lists before saying how many more there are
_MAX_PROBLEMS = 10  # problems a ConfigError lists before saying how many more there are
_MAX_MESSAGE = 1700  # characters of problems a ConfigError lists, at most, before it counts the rest


class ConfigError(ValueError):
    """A DeepSpeed config that zerojax cannot run as written; `problems` lists every reason found, the
    message the first few of them."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(_summary(self.problems))


class ConfigWarning(UserWarning):
    """A key that has no effect in zerojax, or that no tool in the DeepSpeed family knows."""


class ConfigDeprecationWarning(FutureWarning):
    """A deprecated DeepSpeed key that zerojax maps to its current name."""


def key_text(name: str) -> str:
    """A key as a message writes it: bare when short and printable, else its shortened repr."""
    return name if len(name) <= 60 and name.isprintable() else shown(name)


def listed(names) -> str:
    """'a, b, c, d, e and 99,995 more': the first `MAX_LISTED` names (shortened) and a count of the rest."""
    names = list(names)
    head = ", ".join(key_text(str(n)) for n in names[:MAX_LISTED])
    return head if len(names) <= MAX_LISTED else f"{head} and {len(names) - MAX_LISTED:,} more"


def _summary(lines: list[str]) -> str:
    """One problem as it is; several as a list of the first few, then how many more there are."""
    if len(lines) == 1:
        return lines[0]
    shown_lines: list[str] = []
    for line in lines[:_MAX_PROBLEMS]:
        if shown_lines and sum(map(len, shown_lines)) + len(line) > _MAX_MESSAGE:
            break
        shown_lines.append(line)
    rest = len(lines) - len(shown_lines)
    more = [f"and {rest:,} more (fix these and run again to see them)"] if rest else []
    return f"{len(lines):,} problems:\n- " + "\n- ".join(shown_lines + more)
