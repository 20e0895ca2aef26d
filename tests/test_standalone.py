"""The project stands alone: no code, config or document of it reaches for files beside the repository."""
import re
import subprocess

from tests.conftest import ROOT

OUTSIDE = re.compile(r"""\.\./shared|parent\s*/\s*["']shared["']|parents\[\d\]\s*/\s*["']shared["']""")


def test_no_project_file_reaches_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    project = [f for f in files if not f.startswith("tests/") and f.endswith((".py", ".md", ".yaml", ".cfg", ".toml"))
               or f == "Makefile"]
    hits = [f for f in project if OUTSIDE.search((ROOT / f).read_text(errors="replace"))]
    assert hits == []
