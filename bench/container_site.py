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
from packaging.utils import canonicalize_name

ROOTS = ("torch", "qwen2vl-flux[server]")
CHECKOUT = Path(__file__).resolve().parents[1]


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
        name = canonicalize_name(requirement.name)
        for wanted in requirement.extras | {""}:
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


def _metadata_folder(dist: metadata.Distribution) -> Path:
    return Path(str(dist._path))  # noqa: SLF001 - importlib.metadata names it nowhere else


def _installed(name: str) -> metadata.Distribution | None:
    """The installed distribution, never metadata inside this checkout (this project's egg-info
    lists its sources, not what it installed)."""
    for dist in metadata.distributions(name=name, path=[p for p in sys.path if p]):
        if not _metadata_folder(dist).resolve().is_relative_to(CHECKOUT):
            return dist
    return None


def _top_level(dist: metadata.Distribution) -> set[str]:
    """The entries a distribution puts in its site directory: the first part of each file its
    RECORD lists (scripts, outside the site directory, left out). An egg-info install has no
    RECORD (its `files` would be its sources): its top_level.txt names modules, as folders,
    .py files or extensions."""
    folder = _metadata_folder(dist)
    if folder.suffix == ".dist-info" and dist.files is not None:
        return {file.parts[0] for file in dist.files if file.parts and file.parts[0] not in ("..", "__pycache__")}
    entries = {folder.name}
    for module in (dist.read_text("top_level.txt") or "").split():
        entries |= {p.name for p in folder.parent.glob(f"{module}*")
                    if p.name == module or p.suffix in (".py", ".so") and p.name.split(".")[0] == module}
    if len(entries) == 1:
        raise RuntimeError(f"{dist.metadata['Name']} ({folder}): which files it installed is unknown; "
                           "run the bench with --server-env as-is")
    return entries


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
    for name, dist in found.items():
        sources = [(entry, Path(str(dist.locate_file(entry)))) for entry in sorted(_top_level(dist))]
        sources = [(entry, source) for entry, source in sources if os.path.lexists(source)]
        if not sources:
            raise RuntimeError(f"{name}: none of the files it lists exist; run the bench with --server-env as-is")
        for entry, source in sources:
            _link(site / entry, source)
    line = (f"servers ran in a virtual environment of the distributions the server image installs, the {len(found)} "
            "of them installed here")
    return str(python), line + (f" (absent here, with what they need: {', '.join(missing)})" if missing else "")
