"""The option tables in docs/ are generated from the dataclasses' help texts (scripts/docs_tables.py): they must be
current, and a table generated from a changed help text must differ (the check can fail)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import docs_tables  # noqa: E402


def test_every_option_table_in_docs_is_what_the_code_says():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "docs_tables.py"), "--check"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_stale_table_is_rewritten_from_the_help_texts():
    page = "<!-- fields: gere_hf.config.GeReConfig skip=loss -->\n| old |\n<!-- /fields -->\n"
    new = docs_tables.render(page)
    assert "| old |" not in new and "`ce_reduction` | `'sample_mean'` | How each CE averages" in new
    assert "| `loss` |" not in new and new.endswith("<!-- /fields -->\n")
