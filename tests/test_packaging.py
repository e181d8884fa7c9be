"""Packaging and layering: the wheel installs only the `corral` package (no bare `cni`,
`proxy`, ... in site-packages), and every import points down the layer table below.
"""

from __future__ import annotations

import ast
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
        "common",
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
        "netdebug",
        "nodeagent",
        "apiserver",
    ):
        assert f"corral/{folder}/__init__.py" in names
    assert "corral/clusterdns/fastpath.c" in names  # built on first use
    entry = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith("entry_points.txt")))
        .decode()
    )
    assert "corral = corral.cli.main:main" in entry


# The layers (docs/internals.md, "Layers"): an import may only point down.
LAYERS: dict[str, int] = {
    "common": 1,  # the shared bottom: imports no other corral package
    "node": 2,  # the kernel toolkit
    "ebpf": 2,  # BPF programs and map wrappers (on top of node/)
    "api": 3,  # objects, store, informer, network config, selectors
    "daemon": 4,  # the daemon skeleton
    "cni": 5,  # the components: none imports another's
    "overlay": 5,
    "runtime": 5,
    "proxy": 5,
    "clusterdns": 5,
    "control": 5,
    "apiserver": 5,
    "netpolicy": 5,  # NetworkPolicy: the engine and the node agent's enforcement
    "nodeagent": 6,  # `corral node`: overlay, CNI server and pods composed into one daemon
    "netdebug": 6,  # `corral net`: reads every component
    "cluster": 7,  # `corral up`'s local cluster
    "cli": 8,
    "corral": 9,  # `python -m corral`: the CLI's entry
}
# Imports between folders of one layer that the order allows.
SAME_LAYER = {("ebpf", "node")}
# Module-level exceptions: (importing folder, imported module) -> why.
EXCEPTIONS = {
    # DESIGN: cni/ holds the CNI *client* side (libcni's conflist loading, plugin
    # exec, result cache) for the runtime, as containerd uses libcni.
    ("runtime", "corral.cni.client"): "the CNI client the runtime calls, as containerd uses libcni",
    ("runtime", "corral.cni.cache"): "the client's libcni result cache",
}
PRODUCTION = tuple(f for f in LAYERS if (ROOT / f / "__init__.py").exists())
_IMPORTERS = {("importlib", "import_module"), ("builtins", "__import__")}


def _folder_of(module: str) -> str | None:
    """The folder a `corral...` module lives in; "corral" for the bare package."""
    parts = module.split(".")
    if parts[0] != "corral":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "corral"


def _rule_broken(src: str, dst: str, module: str) -> str | None:
    """Why `src` may not import `module` (in folder `dst`); None when it may."""
    if dst in (src, None) or module == "corral":  # the bare package holds only __version__
        return None
    if (src, module) in EXCEPTIONS or (src, dst) in SAME_LAYER:
        return None
    if LAYERS[dst] < LAYERS[src]:
        return None
    if LAYERS[dst] > LAYERS[src]:
        return f"{src}/ (layer {LAYERS[src]}) imports {dst}/ above it (layer {LAYERS[dst]})"
    if LAYERS[src] == 5:
        return f"components never import each other's internals ({src}/ -> {dst}/)"
    return f"{src}/ and {dst}/ share layer {LAYERS[src]}: only {sorted(SAME_LAYER)} may"


def _string_prefix(node: ast.expr) -> str | None:
    """The literal text (or f-string's literal start) of a module name given as a string."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values:
        first = node.values[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return first.value
    return None


def _corral_imports(path: Path, folder: str) -> list[tuple[int, str]]:
    """(line, module) of every corral module `path` imports, at any depth (functions too).

    `importlib.import_module(...)`/`__import__(...)` count as imports: of their
    argument when it is a literal (or an f-string's literal start), and otherwise
    of every `corral.x` string literal in the file (a name table looked up at run time).
    """
    tree = ast.parse(path.read_text(), str(path))
    out: list[tuple[int, str]] = []
    dynamic = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the file's own package upwards
                base = ["corral", folder][: max(0, 2 - node.level + 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            if mod == "corral":  # `from corral import api`: the subpackages named
                out += [
                    (node.lineno, f"corral.{a.name}" if a.name in LAYERS else "corral")
                    for a in node.names
                ]
            else:
                out.append((node.lineno, mod))
        elif isinstance(node, ast.Call):
            fn = node.func
            name = (
                ("importlib", fn.attr)
                if isinstance(fn, ast.Attribute)
                and isinstance(fn.value, ast.Name)
                and fn.value.id == "importlib"
                else ("builtins", fn.id)
                if isinstance(fn, ast.Name)
                else None
            )
            if name in _IMPORTERS or (name and name[1] == "import_module"):
                text = _string_prefix(node.args[0]) if node.args else None
                if text and text.startswith("corral"):
                    out.append((node.lineno, text.rstrip(".")))
                else:
                    dynamic = True
    if dynamic:
        out += [
            (n.lineno, n.value)
            for n in ast.walk(tree)
            if isinstance(n, ast.Constant)
            and isinstance(n.value, str)
            and n.value.startswith("corral.")
            and all(p.isidentifier() for p in n.value.split("."))
        ]
    return [(line, m) for line, m in out if m == "corral" or m.startswith("corral.")]


def layer_violations() -> list[str]:
    bad = []
    for folder in PRODUCTION:
        for f in sorted((ROOT / folder).rglob("*.py")):
            for line, module in _corral_imports(f, folder):
                why = _rule_broken(folder, _folder_of(module), module)
                if why:
                    bad.append(f"{f.relative_to(ROOT)}:{line}: imports {module}: {why}")
    return bad


def test_every_import_points_down_the_layers() -> None:
    """A new upward (or sideways, between components) import fails here with its file:line."""
    bad = layer_violations()
    assert not bad, "imports against the layer order (docs/internals.md, Layers):\n" + "\n".join(
        bad
    )


def test_every_package_has_a_layer() -> None:
    """A folder the wheel ships is placed in the table, so the order covers all code."""
    import tomllib

    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert set(dirs.values()) <= set(LAYERS), set(dirs.values()) - set(LAYERS)
    for (src, module), _why in EXCEPTIONS.items():
        assert (ROOT / (module.split(".")[1] + "/" + module.split(".")[2] + ".py")).exists(), (
            src,
            module,
        )


def test_the_layer_check_sees_what_it_must(tmp_path: Path) -> None:
    """Imports hidden in functions, `from corral import x` and run-time imports all count."""
    f = tmp_path / "m.py"
    f.write_text(
        "import importlib\n"
        "from corral import netdebug\n"
        "def f():\n"
        "    from corral.proxy.core import ServiceView\n"
        "    return importlib.import_module(MODS[0])\n"
        'MODS = ["corral.cli.main"]\n'
        'importlib.import_module(f"corral.control.{x}")\n'
    )
    found = {m for _, m in _corral_imports(f, "overlay")}
    assert found >= {"corral.netdebug", "corral.proxy.core", "corral.cli.main", "corral.control"}
    whys = {m: _rule_broken("overlay", _folder_of(m), m) for m in found}
    assert all(whys.values()), whys
    assert _rule_broken("runtime", "cni", "corral.cni.client") is None
    assert _rule_broken("runtime", "cni", "corral.cni.server") is not None
    assert _rule_broken("ebpf", "node", "corral.node.netns") is None
    assert _rule_broken("node", "ebpf", "corral.ebpf.loader") is not None


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def test_production_code_never_imports_the_local_dev_cluster() -> None:
    """corral.cluster is `corral up`'s scaffolding; only the CLI verbs that drive it may load it."""
    # `corral up/down`, the local cluster's URLs, `corral net` reaching its nodes
    allowed = {"cli/cmd_cluster.py", "cli/common.py", "cli/cmd_net.py"}
    bad = []
    for folder in (f for f in PRODUCTION if f != "cluster"):
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
