# Copyright 2025 The gere_hf Authors. Licensed under the Apache License, Version 2.0.
"""benchmarks/gpu_wheels.py: which wheels travel to the bare GPU machine, and why.

The resolver runs on wheels it is handed by a download function; here that function writes small wheel files (a
dist-info METADATA with the given Requires-Dist) instead of asking PyPI, so the rule itself is what is tested. The
real download (`gpu_wheels.py fetch`) and the install there are shown by the CPU trial in docs/lab/benchmarks.md.
"""

from __future__ import annotations

import importlib.util
import os
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("gpu_wheels", os.path.join(ROOT, "benchmarks", "gpu_wheels.py"))
gpu_wheels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_wheels)

# name -> {version: [Requires-Dist, ...]}: what the stand-in index offers.
INDEX = {
    "transformers": {"5.24.0": ["huggingface-hub<3.0,>=1.31.0", "regex>=2025.10.22", "tokenizers<0.24,>=0.23.1"]},
    "trl": {"1.16.0": ["datasets>=4.7.0", "accelerate>=1.10.1", "pyarrow>=21.0.0"]},
    "datasets": {"5.2.0": ["fsspec<=2026.9.0,>=2023.1.0", "dill<0.4.2,>=0.3.0", "pyarrow>=24.0.0",
                           'tomli>=1.1.0; python_version < "3.11"', "soundfile; extra == 'audio'"]},
    "dill": {"0.4.1": []},
    "fsspec": {"2026.9.0": [], "2026.10.0": []},
    "gensim": {"4.4.0": ["scipy>=1.7.0"]},
}


def _download(tmp_path):
    from packaging.requirements import Requirement

    def download(requirement: str) -> str:
        req = Requirement(requirement)
        versions = [v for v in INDEX[req.name] if req.specifier.contains(v)]
        version = sorted(versions)[-1]
        path = tmp_path / f"{req.name}-{version}-py3-none-any.whl"
        meta = "".join(f"Requires-Dist: {r}\n" for r in INDEX[req.name][version])
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(f"{req.name}-{version}.dist-info/METADATA", f"Name: {req.name}\nVersion: {version}\n{meta}")
        return str(path)

    return download


def test_the_plan_carries_what_the_machine_lacks_or_cannot_use(tmp_path):
    machine = {"transformers": "5.17.0", "huggingface-hub": "1.33.0", "tokenizers": "0.23.2", "accelerate": "1.15.0",
               "regex": None, "pyarrow": None, "fsspec": None}
    roots = ["transformers>=5.19,<6", "trl>=1.0,<2", "accelerate>=1.0"]
    plan = {e["name"]: e for e in gpu_wheels.resolve(machine, _download(tmp_path), roots=roots,
                                                      pins={"fsspec": "2026.9.0"}, data=("gensim",))}
    carried = {n: e["version"] for n, e in plan.items() if "wheel" in e}
    # transformers: too old there; trl, datasets, dill: absent; fsspec: its version unread and datasets bounds it
    # above (carried at the pin); gensim: a data package, carried without its scipy.
    assert carried == {"transformers": "5.24.0", "trl": "1.16.0", "datasets": "5.2.0", "dill": "0.4.1",
                       "fsspec": "2026.9.0", "gensim": "4.4.0"}
    assert plan["transformers"]["machine"] == "5.17.0" and plan["trl"]["machine"] == "absent"
    assert any("datasets 5.2.0" in w for w in plan["fsspec"]["why"])
    # Versions unread there, with lower bounds only: assumed, and named for the check there.
    assumed = {n for n, e in plan.items() if "wheel" not in e}
    assert assumed == {"regex", "pyarrow"}
    assert plan["pyarrow"]["requirement"] in (">=21.0.0,>=24.0.0", ">=24.0.0,>=21.0.0")
    # Markers are the machine's: no tomli (Python 3.12), no extras.
    assert "tomli" not in plan and "soundfile" not in plan and "scipy" not in plan


def test_a_machine_version_that_meets_everything_is_not_carried(tmp_path):
    machine = {"transformers": "5.24.0", "huggingface-hub": "1.33.0", "tokenizers": "0.23.2", "regex": "2026.9.3"}
    plan = gpu_wheels.resolve(machine, _download(tmp_path), roots=["transformers>=5.19,<6"], pins={},
                              data=())
    assert [e["name"] for e in plan if "wheel" in e] == []


def test_the_machine_list_reads_versions_and_bare_names(tmp_path):
    path = tmp_path / "machine.txt"
    path.write_text("# comment\nTorch==2.11.0\npeft\nhuggingface_hub==1.33.0  # note\n\n")
    assert gpu_wheels.read_machine(str(path)) == {"torch": "2.11.0", "peft": None, "huggingface-hub": "1.33.0"}


@pytest.mark.parametrize("spec, assumed", [(">=24", True), ("<=2026.9.0", False), ("==1.0", False), ("~=1.2", False)])
def test_an_unread_version_meets_lower_bounds_only(spec, assumed):
    from packaging.specifiers import SpecifierSet

    assert gpu_wheels._satisfies(None, SpecifierSet(spec)) is assumed
