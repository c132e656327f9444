"""The config package's exception and warnings."""

from __future__ import annotations


class ConfigError(ValueError):
    """A DeepSpeed config that zerojax cannot run as written; `problems` lists every reason found."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = self.problems
        super().__init__(lines[0] if len(lines) == 1 else f"{len(lines)} problems:\n- " + "\n- ".join(lines))


class ConfigWarning(UserWarning):
    """A key that has no effect in zerojax, or that no tool in the DeepSpeed family knows."""


class ConfigDeprecationWarning(FutureWarning):
    """A deprecated DeepSpeed key that zerojax maps to its current name."""
