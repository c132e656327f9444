"""Tree paths as plain names and indices, shared by the sharding rules, the Hugging Face maps and checkpoints."""

from __future__ import annotations


def path_key(path) -> tuple:
    """A tree path as plain names and indices, so optax and parameter paths can be compared."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
        else:
            out.append(str(k))
    return tuple(out)
