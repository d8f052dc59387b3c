"""A virtual environment holding only what the servers' image installs: torch and this
package's `server` extra, with their dependencies, each linked to its installed copy.

The GPU machine's image carries far more (peft, scikit-learn, scipy, ...). transformers and
diffusers import such packages when they are present, and scan every installed distribution
at import, so a server started there pays seconds our containers never pay. The bench runs
the servers in this environment to time their start-ups as the images would.
"""
from __future__ import annotations

import importlib.metadata as metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOTS = ("torch", "qwen2vl-flux[server]")


def closure(roots=ROOTS) -> tuple[dict[str, metadata.Distribution], list[str]]:
    """The installed distributions `roots` need (markers evaluated here), and the names of
    required ones that are not installed."""
    found: dict[str, metadata.Distribution] = {}
    missing: list[str] = []
    todo = [(Requirement(root), "") for root in roots]
    seen: set[tuple[str, str]] = set()
    while todo:
        requirement, extra = todo.pop()
        if requirement.marker and not requirement.marker.evaluate(dict(default_environment(), extra=extra)):
            continue
        name = requirement.name.lower().replace("_", "-")
        for wanted in (requirement.extras or {""}) | {""}:
            if (name, wanted) in seen:
                continue
            seen.add((name, wanted))
            dist = found.get(name) or _installed(name)
            if dist is None:
                missing.append(name)
                break
            found[name] = dist
            todo += [(Requirement(text), wanted) for text in dist.requires or ()]
    return found, sorted(set(missing))


def _installed(name: str) -> metadata.Distribution | None:
    """The installed distribution, never the metadata a source checkout holds in the current
    folder (this project's egg-info lists its sources, not what it installed)."""
    here = Path.cwd().resolve()
    path = [p for p in sys.path if p and Path(p).resolve() != here]
    return next(iter(metadata.distributions(name=name, path=path)), None)


def _top_level(dist: metadata.Distribution) -> set[str]:
    """The entries a distribution puts in its site directory: the first part of each file it
    installed (scripts, outside the site directory, left out)."""
    if dist.files is not None:
        return {file.parts[0] for file in dist.files if file.parts and file.parts[0] not in ("..", "__pycache__")}
    names = (dist.read_text("top_level.txt") or "").split()
    if not names:
        raise RuntimeError(f"{dist.metadata['Name']}: no RECORD and no top_level.txt, so its files are unknown")
    return set(names) | {Path(str(dist._path)).name}  # noqa: SLF001 - its metadata folder has no other name


def _link(destination: Path, source: Path) -> None:
    """Link `source` at `destination`; two distributions sharing a folder (a namespace package
    such as nvidia/) get a real folder with links to both sides' entries."""
    if not os.path.lexists(destination):
        destination.symlink_to(source)
        return
    if destination.resolve() == source.resolve() or not (source.is_dir() and destination.is_dir()):
        return
    if destination.is_symlink():
        earlier = destination.resolve()
        destination.unlink()
        destination.mkdir()
        for entry in earlier.iterdir():
            (destination / entry.name).symlink_to(entry)
    for entry in source.iterdir():
        _link(destination / entry.name, entry)


def build(folder: str | Path = "/tmp/bench-container-env") -> tuple[str, str]:
    """Make the environment afresh; returns its Python and a line saying what it holds."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH="")
                               ).stdout.strip())
    found, missing = closure()
    for dist in found.values():
        for entry in sorted(_top_level(dist)):
            source = Path(str(dist.locate_file(entry)))
            if os.path.lexists(source):
                _link(site / entry, source)
    line = f"servers ran in a virtual environment of the {len(found)} distributions the server image installs"
    return str(python), line + (f" (not installed here, so absent: {', '.join(missing)})" if missing else "")
