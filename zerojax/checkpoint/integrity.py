"""Integrity manifests: the size and SHA-256 of every file of a checkpoint step, and the check of them.

Orbax/tensorstore checksum their index (OCDBT b-tree nodes carry CRC-32C) and JSON files fail to parse
when damaged, but array data has no checksum of its own, so a flipped byte in a tensor would restore
silently; the manifest closes that gap.
"""

from __future__ import annotations

import hashlib
import json
import os

INTEGRITY = "integrity.json"
INTEGRITY_FORMAT = "zerojax-integrity/1"
# Not in the manifest: the manifest itself, and the two files orbax writes at the commit, after the
# manifest: the step's metadata (handler names, metrics, commit time) and its commit marker.
UNCHECKED = (INTEGRITY, INTEGRITY + ".tmp", "_CHECKPOINT_METADATA", "commit_success.txt")


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def step_files(folder: str) -> list[str]:
    """Every file under `folder` (relative paths, sorted) but those in `UNCHECKED`."""
    names = (os.path.relpath(os.path.join(root, n), folder) for root, _, files in os.walk(folder) for n in files)
    return sorted(n for n in names if n not in UNCHECKED)


def checksums(folder: str) -> dict[str, list]:
    """`{relative path: [size, sha256]}` of every file under `folder` but those in `UNCHECKED`."""
    return {name: [os.path.getsize(p := os.path.join(folder, name)), sha256(p)] for name in step_files(folder)}


def write_manifest(folder: str) -> None:
    """Writes the manifest of every file now in `folder` as `folder/integrity.json`, atomically."""
    manifest = {"format": INTEGRITY_FORMAT, "algorithm": "sha256", "files": checksums(folder)}
    with open(os.path.join(folder, INTEGRITY + ".tmp"), "w") as f:
        json.dump(manifest, f, indent=0, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(os.path.join(folder, INTEGRITY + ".tmp"), os.path.join(folder, INTEGRITY))


def read_manifest(folder: str) -> dict[str, tuple[int, str]]:
    """The manifest of `folder` as `{file: (size, sha256)}`; raises ValueError saying what is wrong when
    it is missing, unreadable or not a well-formed manifest (a step without one cannot be trusted)."""
    try:
        with open(os.path.join(folder, INTEGRITY), "rb") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ValueError("is missing") from None
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"is unreadable ({' '.join(str(e).split())[:120]})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(files, dict) or manifest.get("format") != INTEGRITY_FORMAT
            or manifest.get("algorithm") != "sha256"):
        raise ValueError(f"is not a {INTEGRITY_FORMAT} manifest of SHA-256 checksums")
    for name, entry in files.items():
        if not _well_formed(name, entry):
            raise ValueError(f"has a malformed entry {str(name)[:80]!r}: {str(entry)[:80]} (expected [size, sha256])")
    return {name: (size, digest) for name, (size, digest) in files.items()}


def _well_formed(name: str, entry) -> bool:
    """Whether a manifest entry is a relative path inside the step and `[size >= 0, 64 hex digits]`."""
    inside = name == os.path.normpath(name) and not os.path.isabs(name) and not name.startswith("..")
    if not inside or not isinstance(entry, list) or len(entry) != 2:
        return False
    size, digest = entry
    return (type(size) is int and size >= 0 and isinstance(digest, str) and len(digest) == 64
            and all(c in "0123456789abcdef" for c in digest))


def file_damage(folder: str, name: str, size: int, digest: str) -> str | None:
    """What is wrong with file `name` of `folder` given its manifest entry (missing, another size,
    another SHA-256), or None when it matches."""
    file = os.path.join(folder, name)
    if not os.path.isfile(file):
        return "is missing"
    found = os.path.getsize(file)
    if found != size:
        return f"has {found} bytes, {size} were written (truncated or overwritten)"
    if sha256(file) != digest:
        return "fails its SHA-256 check (its bytes changed after the save)"
    return None


def first_damage(folder: str, expected: dict[str, tuple[int, str]]) -> tuple[str, str] | None:
    """`(file, what is wrong with it)` for the first file, by name, that the manifest `expected` does not
    list, or that is missing, has another size or another SHA-256 than it says; None when every file of
    the step is listed and matches."""
    unlisted = [n for n in step_files(folder) if n not in expected]
    if unlisted:
        return unlisted[0], f"is not in its {INTEGRITY} (the manifest does not cover every file of the step)"
    for name, (size, digest) in sorted(expected.items()):
        if what := file_damage(folder, name, size, digest):
            return name, what
    return None
