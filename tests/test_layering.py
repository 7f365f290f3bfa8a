"""The dependency graph reads top-down: each subpackage, imported alone in a fresh interpreter
(every module of it), loads no commcomp package of its own layer or above. A new import that
reaches up (or a cycle, which must reach up somewhere) fails here, naming the modules. And no
function-level import of commcomp may hide one: the few lazy imports allowed are listed."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "commcomp"

# Lowest first. A package may import those in lower layers, never its own layer or above.
LAYERS = [
    {"utils"},
    {"_C"},  # the native extension
    {"ops"},
    {"codecs"},
    {"collectives"},
    {"perfmodel"},
    {"core"},
    {"privacy", "coding", "decentralized"},
    {"hooks"},
    {"checkpoint", "integrations", "launch_env", "testing"},
    {"launch", "bench"},
    {"cli", "__main__"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}
# Function-level imports of commcomp that are allowed, and why (none may hide a cycle).
LAZY_OK = {
    ("ops/_loader.py", "commcomp._C"): "the native extension, loaded if it was built",
    ("cli", None): "the command line is the top of the graph; it imports lazily so --help is fast",
    ("privacy/audit/attacks.py", "commcomp.privacy.accounting"): "keeps scipy and dp-accounting lazy",
    ("bench/calibrate.py", "commcomp"): "calibration runs every hook: the top of the graph",
}


def top_names():
    names = {p.stem if p.is_file() else p.name for p in PKG.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    return sorted(names)


def modules_of(name):
    path = PKG / name
    if path.is_dir():
        return sorted("commcomp." + ".".join(p.relative_to(PKG).with_suffix("").parts).replace(".__init__", "")
                      for p in path.rglob("*.py"))
    return [f"commcomp.{name}"]


def test_every_package_has_a_layer():
    assert set(top_names()) <= set(LEVEL), f"give {sorted(set(top_names()) - set(LEVEL))} a layer in LAYERS"


SCRIPT = """
import importlib, sys
for m in sys.argv[1:]:
    importlib.import_module(m)
print(" ".join(sorted({k.split(".")[1] for k in sys.modules if k.startswith("commcomp.")})))
"""


@pytest.mark.parametrize("name", [n for n in sorted(LEVEL) if n not in ("_C", "__main__")])
def test_package_imports_only_lower_layers(name):
    if not (PKG / name).exists() and not (PKG / f"{name}.py").exists():
        pytest.skip(f"commcomp.{name} is not in this tree")
    mods = [m for m in modules_of(name) if not m.endswith("__main__")]
    out = subprocess.run([sys.executable, "-c", SCRIPT, *mods], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = set(out.stdout.split()) - {name}
    above = sorted(p for p in loaded if LEVEL.get(p, len(LAYERS)) >= LEVEL[name])
    assert not above, (f"commcomp.{name} (layer {LEVEL[name]}) imports {above}, which are not below it; "
                       f"layers: {LAYERS}")


def test_no_function_level_import_hides_a_dependency():
    found = []
    for path in PKG.rglob("*.py"):
        rel = str(path.relative_to(PKG))
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom):
                    module = node.module or ""
                    if node.level:  # relative: resolve against the module's package
                        base = list(path.relative_to(PKG).parent.parts)
                        base = base[:len(base) - node.level + 1] if node.level > 1 else base
                        module = ".".join(["commcomp", *base] + ([node.module] if node.module else []))
                    target = module if module != "commcomp" else f"commcomp.{node.names[0].name}"
                elif isinstance(node, ast.Import):
                    target = node.names[0].name
                else:
                    continue
                if target.startswith("commcomp") and (rel, target) not in LAZY_OK \
                        and (rel.split("/")[0], None) not in LAZY_OK:
                    found.append(f"{rel}:{node.lineno} imports {target} inside {fn.name}()")
    assert not found, "function-level imports of commcomp (move them to the top, or list them in LAZY_OK " \
                      "with a reason):\n" + "\n".join(found)
