"""The layers of ``scripts``: a module imports only from its own package or a lower layer, every module sits in a
layer, and the MONAI Label copy of the bundle carries only the layers that inference and training use."""

import ast
from pathlib import Path

from scripts.deployment.monailabel_app import EXPORTED_PACKAGES, export

ROOT = Path(__file__).resolve().parents[1]

#: package of ``scripts`` -> its layer, lowest first; packages of one layer may not import each other
LAYERS = {
    "utils": 0,
    "networks": 1,
    "evaluation": 1,
    "data": 2,
    "method": 3,
    "deployment": 4,
    "clinical": 5,
    "experiments": 6,
    "tools": 6,
}
FALLBACK_ERRORS = {"ImportError", "ModuleNotFoundError"}


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    caught = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(c, ast.Name) and c.id in FALLBACK_ERRORS for c in caught)


def _walk(node: ast.AST, fallback: bool = False):
    """Every node under ``node``, with whether it sits in an ``except ImportError`` handler."""
    for child in ast.iter_child_nodes(node):
        inside = fallback or (isinstance(child, ast.ExceptHandler) and _catches_import_error(child))
        yield child, inside
        yield from _walk(child, inside)


def scripts_imports(source: str, package: str) -> list[tuple[int, str, bool]]:
    """(line, module, in an ``except ImportError`` handler) for each import of ``scripts`` in ``source``, a module of
    ``package`` (dotted), at module level or in a function. ``from scripts.x import y`` and ``from scripts import x``
    give ``scripts.x.y`` and ``scripts.x`` (``y`` may be a module or a name: only ``x`` matters); relative imports are
    resolved against ``package``."""
    found = []
    for node, fallback in _walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, fallback) for a in node.names if a.name.split(".")[0] == "scripts"]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            if module.split(".")[0] == "scripts":
                found += [(node.lineno, f"{module}.{a.name}", fallback) for a in node.names]
    return found


def layer_violations(root: Path) -> list[str]:
    """``file:line -> module`` for each import under ``root/scripts`` that points to a package of the same or a higher
    layer than the importer's own, or to a module in no layer. An import in an ``except ImportError`` handler may name
    a module in no layer: the flat layout of a revision from before the layers (the benchmark's ``--against``)."""
    problems = []
    for path in sorted((root / "scripts").rglob("*.py")):
        relative = path.relative_to(root)
        importer = relative.parts[1]
        if importer not in LAYERS:  # a module directly in scripts/: test_every_module_sits_in_a_layer
            continue
        for line, module, fallback in scripts_imports(path.read_text(), ".".join(relative.parts[:-1])):
            parts = module.split(".")
            if len(parts) < 2 or parts[1] == importer:  # `import scripts` (its __init__ holds nothing), own package
                continue
            target = parts[1]
            if target in LAYERS and LAYERS[target] < LAYERS[importer]:
                continue
            if target not in LAYERS and fallback:
                continue
            problems.append(f"{relative}:{line} -> {module}" + ("" if target in LAYERS else " (in no layer)"))
    return problems


def test_every_import_points_to_its_own_package_or_a_lower_layer():
    problems = layer_violations(ROOT)
    assert not problems, "imports against the layers (see each scripts/<package>/__init__.py):\n" + "\n".join(problems)


def test_every_module_sits_in_a_layer():
    scripts = ROOT / "scripts"
    loose = sorted(p.name for p in scripts.glob("*.py") if p.name != "__init__.py")
    assert not loose, f"modules directly in scripts/ (move each into the package of its layer): {loose}"
    packages = sorted(p.name for p in scripts.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert packages == sorted(LAYERS)
    assert all((scripts / p / "__init__.py").is_file() for p in packages)


def test_the_checker_finds_upward_sibling_and_unlayered_imports(tmp_path):
    files = {
        "scripts/method/a.py": (
            "from scripts.utils.files import write_atomic\n"
            "from . import b\n"
            "def f():\n"
            "    from scripts.deployment.inference import list_images\n"
            "    import scripts.clinical.pacs\n"
            "try:\n"
            "    from scripts.method.trainer import X\n"
            "except ImportError:\n"
            "    from scripts.trainer import X\n"
            "from scripts import settings\n"
        ),
        "scripts/networks/c.py": "from scripts.evaluation import metrics\nfrom ..data import transforms\n",
        "scripts/tools/d.py": "from scripts.experiments.compare import run\nfrom scripts.clinical import pacs\n",
    }
    for name, source in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(source)
    assert layer_violations(tmp_path) == [
        "scripts/method/a.py:4 -> scripts.deployment.inference.list_images",
        "scripts/method/a.py:5 -> scripts.clinical.pacs",
        "scripts/method/a.py:10 -> scripts.settings (in no layer)",
        "scripts/networks/c.py:1 -> scripts.evaluation.metrics",
        "scripts/networks/c.py:2 -> scripts.data.transforms",
        "scripts/tools/d.py:1 -> scripts.experiments.compare.run",
    ]


def test_the_monailabel_copy_holds_the_layers_up_to_deployment(tmp_path):
    out = tmp_path / "fetal_us"
    model = tmp_path / "model.pt"
    model.write_bytes(b"a stand-in model file")  # export only copies it
    export(str(out), model=str(model))
    copied = out / "scripts"
    assert sorted(EXPORTED_PACKAGES) == sorted(p for p, layer in LAYERS.items() if layer <= LAYERS["deployment"])
    assert sorted(p.name for p in copied.iterdir()) == sorted(["__init__.py", *EXPORTED_PACKAGES])
    left_out = {"pacs.py", "dicom_objects.py", "benchmark.py", "compare.py", "monailabel_venv.py"}
    assert not [p for p in out.rglob("*") if p.name in left_out or p.name == "__pycache__"]
    assert not any((copied / p).exists() for p in ("clinical", "experiments", "tools"))
    for kept in ("method/trainer.py", "deployment/inference.py", "networks/unext.py"):
        assert (copied / kept).is_file()
