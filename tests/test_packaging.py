"""The wheel installs only the `corral` package: no bare `cni`, `proxy`, ... in site-packages."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_holds_only_corral_packages(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    [wheel] = list(tmp_path.glob("corral-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {
        "corral",
        wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info",
    }, top
    for folder in (
        "api",
        "cni",
        "overlay",
        "proxy",
        "ebpf",
        "clusterdns",
        "runtime",
        "control",
        "cluster",
        "cli",
    ):
        assert f"corral/{folder}/__init__.py" in names
    assert "corral/clusterdns/fastpath.c" in names  # built on first use
    entry = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith("entry_points.txt")))
        .decode()
    )
    assert "corral = corral.cli.main:main" in entry


PRODUCTION = (
    "api",
    "cni",
    "overlay",
    "proxy",
    "ebpf",
    "clusterdns",
    "runtime",
    "control",
    "node",
    "daemon",
    "cli",
)


def _imports(path: Path) -> list[str]:
    import ast

    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def test_production_code_never_imports_the_local_dev_cluster() -> None:
    """corral.cluster is `corral up`'s scaffolding; only the CLI verbs that drive it may load it."""
    allowed = {"cli/cmd_cluster.py", "cli/common.py"}  # `corral up/down`, the local cluster's URLs
    bad = []
    for folder in PRODUCTION:
        for f in sorted((ROOT / folder).glob("*.py")):
            rel = str(f.relative_to(ROOT))
            if rel in allowed:
                continue
            bad += [
                f"{rel}: {m}"
                for m in _imports(f)
                if m == "corral.cluster" or m.startswith("corral.cluster.")  # not clusterdns
            ]
    assert not bad, "production modules import the dev cluster package:\n" + "\n".join(bad)


def test_tests_and_benches_import_only_modules_the_package_ships() -> None:
    import importlib.util

    missing = []
    for folder in ("tests", "integration", "bench"):
        for f in sorted((ROOT / folder).glob("*.py")):
            for m in _imports(f):
                if not m.startswith("corral."):
                    continue
                parent = m.rsplit(".", 1)[0]
                if importlib.util.find_spec(m.split(".")[0]) is None:
                    missing.append(f"{f.relative_to(ROOT)}: {m}")
                    continue
                try:
                    found = importlib.util.find_spec(m) is not None
                except ModuleNotFoundError:
                    found = False
                if not found:  # `from corral.x import name`: name may be an attribute
                    mod = (
                        importlib.import_module(parent)
                        if importlib.util.find_spec(parent)
                        else None
                    )
                    if mod is None or not hasattr(mod, m.rsplit(".", 1)[1]):
                        missing.append(f"{f.relative_to(ROOT)}: {m}")
    assert not missing, "imports of modules corral no longer ships:\n" + "\n".join(missing)
