"""The README's two set-up commands are exactly what CI runs (.ci/run)."""
from __future__ import annotations

import re
from pathlib import Path

from mtd_fast.experiments.table2 import readme_block

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    install, tests = blocks[0].strip(), blocks[1].strip()
    assert "pip install torch==2.13.0" in install and "mtd-fast train" in install
    assert "pytest tests" in tests and "TRITON_INTERPRET=1" in tests and "MTD_BENCH_SMOKE=1" in tests
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert install in ci_lines
    assert tests in ci_lines


def test_every_file_the_readme_links_exists():
    """Links and images with a path inside the repository (figures, result tables) resolve."""
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if "://" not in t and not t.startswith("mailto:")]
    assert local, "the README links no local file: the pattern above is broken"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links files that do not exist: {missing}"


def test_readme_tables_2_3_are_the_merged_result_files():
    """The converged accuracy tables in the README are the merged result files, verbatim
    (refresh: `python benches/publish_table2.py --from RESULTS`, which copies finished result
    files, merges them and rewrites that block)."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- table2 -->\n(.*?)\n<!-- /table2 -->", readme, flags=re.S)
    assert block, "README has no <!-- table2 --> ... <!-- /table2 --> block"
    md = (ROOT / "benches" / "figures" / "table2.md").read_text()
    assert block.group(1).strip() == readme_block(md)
