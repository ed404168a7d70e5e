# Copyright 2025 The gere_hf Authors. Licensed under the Apache License, Version 2.0.
"""The option tables of docs/, generated from the dataclasses' ``field(metadata={"help": ...})``, as TRL's autodoc does.

A table stands between two markers in a page::

    <!-- fields: gere_hf.config.GeReConfig -->
    | field | default | meaning |
    ...
    <!-- /fields -->

    python scripts/docs_tables.py           # rewrite every table in docs/ from the code
    python scripts/docs_tables.py --check   # exit 1, naming the pages, if a table is not what the code says

tests/test_docs_tables.py runs the check, so a help text changed in the code and not in the docs fails the tests.
An optional ``skip=a,b`` after the class name leaves fields out (those a page documents in its own words).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = re.compile(r"(<!-- fields: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- /fields -->)", re.S)


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return f"`{type(value).__name__}()`"
    else:
        return "required"
    return f"`{value!r}`"


def fields_table(spec: str) -> str:
    """The markdown table of the dataclass ``spec`` names (``module.Class [skip=a,b]``)."""
    path, _, options = spec.strip().partition(" ")
    skip = set()
    if options.startswith("skip="):
        skip = set(options[len("skip="):].split(","))
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meaning = " ".join(str(f.metadata.get("help", "")).split()).replace("|", "\\|")
        rows.append(f"| `{f.name}` | {_default(f)} | {meaning} |")
    return "\n".join(rows) + "\n"


def render(text: str) -> str:
    return MARKER.sub(lambda m: m.group(1) + fields_table(m.group("spec")) + m.group(4), text)


def pages() -> list[str]:
    docs = os.path.join(ROOT, "docs")
    return sorted(os.path.join(docs, f) for f in os.listdir(docs) if f.endswith(".md"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="report stale tables instead of rewriting them")
    args = p.parse_args(argv)
    stale = []
    for page in pages():
        with open(page, encoding="utf-8") as f:
            text = f.read()
        new = render(text)
        if new != text:
            stale.append(os.path.relpath(page, ROOT))
            if not args.check:
                with open(page, "w", encoding="utf-8") as f:
                    f.write(new)
    if args.check and stale:
        print(f"Option tables out of date in {', '.join(stale)}: run `python scripts/docs_tables.py`.")
        return 1
    if not args.check:
        print(f"rewrote {', '.join(stale)}" if stale else "every table is current")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
