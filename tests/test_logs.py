"""Server logging: the libraries' loggers are routed into ours when they are first imported,
and setting that up imports neither (diffusers pulls in torch._dynamo, sympy and transformers:
seconds of a start better spent after the port is bound)."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import zipfile

from qwen2vl_flux.serving.logs import _AfterImport

SCRIPT = """
import sys
from qwen2vl_flux.serving.logs import setup_logging
setup_logging("generator", "info", "json")
imported = sorted(m for m in ("diffusers", "transformers", "torch") if m in sys.modules)
open(sys.argv[1], "w").write(repr(imported))
for library in ("transformers", "diffusers"):
    logging = __import__(library + ".utils.logging", fromlist=["logging"])
    assert not logging.is_progress_bar_enabled(), library
    logging.get_logger(library + ".models.x").warning("hello from " + library)
"""


def test_library_loggers_are_routed_on_first_import_without_importing_them(tmp_path):
    imported = tmp_path / "imported"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(imported)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert imported.read_text() == "[]"     # stdout and stderr are JSON logs now
    records = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    for library in ("transformers", "diffusers"):
        said = [r for r in records if r["msg"] == f"hello from {library}"]
        assert len(said) == 1, records        # ours, once: not the library's own handler too
        assert said[0]["role"] == "generator" and said[0]["logger"] == f"{library}.models.x"
        assert said[0]["level"] == "WARNING"


ALREADY_IMPORTED = """
import sys
import transformers.utils.logging as tl
from qwen2vl_flux.serving.logs import _AfterImport, _route_library_loggers
assert tl.is_progress_bar_enabled()
_route_library_loggers()
_route_library_loggers()
assert not tl.is_progress_bar_enabled()
assert sum(isinstance(f, _AfterImport) for f in sys.meta_path) == 1, sys.meta_path
import diffusers.utils.logging as dl
assert not dl.is_progress_bar_enabled()
"""


def test_an_imported_library_is_routed_at_once_and_routing_twice_installs_one_finder():
    done = subprocess.run([sys.executable, "-c", ALREADY_IMPORTED], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_hook_runs_once_for_its_module_only_and_its_failure_does_not_break_the_import(tmp_path, monkeypatch, caplog):
    """A zip import serves every module of the archive from one loader: the hook must not stick to it."""
    archive = tmp_path / "lib.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ziplib/__init__.py", "")
        z.writestr("ziplib/target.py", "VALUE = 1\n")
        z.writestr("ziplib/other.py", "VALUE = 2\n")
        z.writestr("ziplib/broken.py", "VALUE = 3\n")
    monkeypatch.syspath_prepend(str(archive))
    seen = []

    def fail(module):
        raise AttributeError("no disable_default_handler")

    finder = _AfterImport({"ziplib.target": seen.append, "ziplib.broken": fail})
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    try:
        import ziplib.other
        import ziplib.target
        with caplog.at_level(logging.WARNING, logger="qwen2vl_flux"):
            import ziplib.broken
        assert [m.__name__ for m in seen] == ["ziplib.target"]
        assert ziplib.other.VALUE == 2 and ziplib.target.VALUE == 1 and ziplib.broken.VALUE == 3
        assert "could not route ziplib.broken" in caplog.text
        assert finder.hooks == {}
    finally:
        for name in [m for m in sys.modules if m.startswith("ziplib")]:
            del sys.modules[name]


TWICE = """
import os, sys, logging
from qwen2vl_flux.serving.logs import setup_logging
setup_logging("encoder", "info", "json")
setup_logging("encoder", "info", sys.argv[1])
logging.getLogger("qwen2vl_flux.x").warning("after the second set-up")
os.write(2, b"raw line\\n")
"""


def test_setting_up_twice_logs_each_record_once():
    """A second set-up (an embedding app, a test) must not feed its records back through the
    captured descriptors: that looped forever."""
    for second in ("json", "text"):
        done = subprocess.run([sys.executable, "-c", TWICE, second], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        lines = done.stderr.splitlines()
        assert sum("after the second set-up" in line for line in lines) == 1, done.stderr
        assert sum("raw line" in line for line in lines) == 1, done.stderr
        if second == "text":
            assert not any(line.startswith("{") and "after the second" in line for line in lines)
