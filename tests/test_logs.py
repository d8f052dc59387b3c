"""Server logging: the libraries' loggers are routed into ours when they are first imported,
and setting that up imports neither (the generator never needs transformers; diffusers pulls in
torch._dynamo and sympy, seconds of a start better spent after the port is bound)."""
from __future__ import annotations

import json
import subprocess
import sys

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
    records = [json.loads(line) for line in done.stderr.splitlines()]
    for library in ("transformers", "diffusers"):
        said = [r for r in records if r["msg"] == f"hello from {library}"]
        assert len(said) == 1, records        # ours, once: not the library's own handler too
        assert said[0]["role"] == "generator" and said[0]["logger"] == f"{library}.models.x"
        assert said[0]["level"] == "WARNING"
