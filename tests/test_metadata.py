"""The bundle's metadata and packaging agree with its code and its environment.

configs/metadata.json's ``required_packages_version`` must name every third-party package that scripts/ imports
(derived here from the source with ``ast``), at the installed version; requirements.txt, pyproject.toml and the
metadata state the same pins; the MONAI Label environment's list holds public versions only.
"""

import ast
import importlib.metadata as md
import json
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
META = json.loads((ROOT / "configs" / "metadata.json").read_text())
# imported only inside MONAI Label's own environment: named in supported_apps instead
APP_MODULES = {"monailabel"}
# in requirements.txt for an optional feature (monai.bundle run --tracking mlflow), imported by MONAI, not by us
OPTIONAL = {"mlflow"}
# the metadata's own top-level keys for these
TOP_LEVEL = {"torch": "pytorch_version", "monai": "monai_version", "numpy": "numpy_version"}


def pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a requirements file, names canonicalised (comments and ``-r`` lines skipped)."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            found[canonicalize_name(requirement.name)] = spec.version
    return found


def third_party_imports() -> dict[str, set[str]]:
    """Top-level module names that scripts/ imports (absolute imports, outside the stdlib and the bundle) -> files."""
    modules: dict[str, set[str]] = {}
    for path in (ROOT / "scripts").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("scripts", "__future__"):
                    modules.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return modules


def test_required_packages_cover_every_third_party_import_at_the_installed_version():
    required = {canonicalize_name(k): v for k, v in META["required_packages_version"].items()}
    distributions = md.packages_distributions()
    modules = third_party_imports()
    assert {"torch", "monai", "numpy", "scipy", "PIL", "pydicom"} <= set(modules)  # the walk sees the code
    missing = []
    for module, files in sorted(modules.items()):
        if module in APP_MODULES:
            continue
        names = {canonicalize_name(d) for d in distributions.get(module, [])} | {canonicalize_name(module)}
        if names & set(TOP_LEVEL):
            continue
        if not names & set(required):
            missing.append(f"{module} (imported in {sorted(files)[0]}; distributions {sorted(names)})")
    assert not missing, "required_packages_version lacks: " + "; ".join(missing)
    for name, version in required.items():
        assert md.version(name) == version, f"{name}: metadata {version}, installed {md.version(name)}"
    assert META["monai_version"] == md.version("monai") and META["numpy_version"] == md.version("numpy")
    assert META["pytorch_version"] == md.version("torch").partition("+")[0]


def test_metadata_requirements_and_pyproject_state_the_same_pins():
    requirements = pins(ROOT / "requirements.txt")
    required = {canonicalize_name(k): v for k, v in META["required_packages_version"].items()}
    assert {k: v for k, v in requirements.items() if k not in TOP_LEVEL and k not in OPTIONAL} == required
    for package, key in TOP_LEVEL.items():
        assert requirements[package] == META[key]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == META["version"] and META["version"] in META["changelog"]
    assert [str(Requirement(r)) for r in project["dependencies"]] == [f"{k}=={v}" for k, v in requirements.items()]
    dev = pins(ROOT / "requirements-dev.txt")
    assert {
        canonicalize_name(Requirement(r).name): Requirement(r).specifier
        for r in project["optional-dependencies"]["dev"]
    } == {k: SpecifierSet(f"=={v}") for k, v in dev.items()}


def test_requires_python_admits_no_version_a_pinned_package_refuses():
    """``requires-python`` starts no lower than the highest minimum Python of the installed pinned packages."""
    floor = Version(
        re.fullmatch(
            r">=\s*([\d.]+)", tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
        ).group(1)
    )
    assert Version(f"{sys.version_info.major}.{sys.version_info.minor}") >= floor
    for name in pins(ROOT / "requirements.txt"):
        needs = md.metadata(name).get("Requires-Python")
        assert not needs or floor in SpecifierSet(needs), f"{name} needs Python {needs}, requires-python allows {floor}"


def test_supported_apps_name_monai_label_at_the_version_of_its_environment():
    assert META["supported_apps"] == {"monailabel": "0.8.5"}
    assert pins(ROOT / "requirements-monailabel.txt")["monailabel"] == META["supported_apps"]["monailabel"]


def test_no_requirements_file_pins_a_local_version():
    """Public indexes serve no ``+cpu``/``+cu128`` builds: every pin must be a public version."""
    for path in sorted(ROOT.glob("requirements*.txt")):
        local = [f"{name}=={version}" for name, version in pins(path).items() if Version(version).local]
        assert not local, f"{path.name} pins local versions: {local}"


def test_model_card_has_data_licences_limitations_and_citation():
    card = (ROOT / "docs" / "README.md").read_text()
    headings = re.findall(r"^## (.+)$", card, flags=re.M)
    assert {"Limitations", "Citation"} <= set(headings)
    for data_set in ("HC18", "ACOUSLIC-AI", "FUGC", "PSFHS"):
        assert re.search(rf"^\| {re.escape(data_set)} \|", card, flags=re.M), f"no licence row for {data_set}"
    assert "arXiv:2509.06495" in card and "CC BY 4.0" in card and "CC BY-NC-SA 4.0" in card
