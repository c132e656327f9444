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


def checksums(folder: str) -> dict[str, list]:
    """`{relative path: [size, sha256]}` of every file under `folder` but those in `UNCHECKED`."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel not in UNCHECKED:
                out[rel] = [os.path.getsize(path), sha256(path)]
    return out


def write_manifest(folder: str) -> None:
    """Writes the manifest of every file now in `folder` as `folder/integrity.json`, atomically."""
    manifest = {"format": INTEGRITY_FORMAT, "algorithm": "sha256", "files": checksums(folder)}
    with open(os.path.join(folder, INTEGRITY + ".tmp"), "w") as f:
        json.dump(manifest, f, indent=0, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(os.path.join(folder, INTEGRITY + ".tmp"), os.path.join(folder, INTEGRITY))


def read_manifest(folder: str) -> dict[str, list] | None:
    """The manifest's `{file: [size, sha256]}` of `folder`, or None when the folder has none; raises
    OSError, ValueError, KeyError or TypeError when it cannot be read."""
    path = os.path.join(folder, INTEGRITY)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return dict(json.load(f)["files"])


def first_damage(folder: str, expected: dict[str, list]) -> tuple[str, str] | None:
    """`(file, what is wrong with it)` for the first file, by name, that is missing, has another size
    or another SHA-256 than `expected` says; None when every file matches."""
    for name, (size, digest) in sorted(expected.items()):
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            return name, "is missing"
        found = os.path.getsize(file)
        if found != size:
            return name, f"has {found} bytes, {size} were written (truncated or overwritten)"
        if sha256(file) != digest:
            return name, "fails its SHA-256 check (its bytes changed after the save)"
    return None
