"""The product wheel holds the product only: the development tooling (devtools/, the
``kubegfs-dev`` distribution) and the tests never ship in it, nor in the images built from it;
and the dev distribution declares every third-party package it imports.

The wheel is built offline (``--no-build-isolation --no-index``, setuptools and wheel come from
the dev extra) from a clean export of the work tree, like hack/images/build.sh builds it.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    tmp = tmp_path_factory.mktemp("wheel")
    src, out = tmp / "src", tmp / "out"
    # Everything a checkout has (tracked and new, non-ignored files), devtools/ and tests/ included.
    files = subprocess.run(["git", "ls-files", "-z", "-c", "-o", "--exclude-standard", "--deduplicate"],
                           cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    present = [f.decode() for f in files if f and (REPO / f.decode()).is_file()]
    assert any(f.startswith("devtools/kubegfs_dev/") for f in present)
    for f in present:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, src / f)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "-w", str(out), str(src)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"pip wheel failed:\n{r.stderr}\n{r.stdout}"
    (whl,) = out.glob("kubegfs-*.whl")
    return zipfile.ZipFile(whl)


def test_wheel_has_only_the_product_packages(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    tops = {n.split("/", 1)[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"kubegfs", "kubegfs_operator"}, sorted(tops)
    assert "kubegfs/master/server.py" in names and "kubegfs_operator/main.py" in names
    for gone in ("kubegfs/k8s/", "kubegfs/testing/", "kubegfs/bench", "kubegfs/chaos"):
        assert not [n for n in names if n.startswith(gone)], gone


def test_wheel_imports_no_dev_only_dependency(wheel: zipfile.ZipFile) -> None:
    """pytest, yaml and the devtools are not runtime dependencies: the product must not import them."""
    offenders = []
    for n in wheel.namelist():
        if not n.endswith(".py"):
            continue
        for line in wheel.read(n).decode().splitlines():
            words = line.strip().split()
            if len(words) >= 2 and words[0] in ("import", "from") and \
                    words[1].split(".")[0] in ("kubegfs_dev", "pytest", "yaml"):
                offenders.append(f"{n}: {line.strip()}")
    assert not offenders, offenders


def test_devtools_declares_every_package_it_imports() -> None:
    imported: dict[str, str] = {}
    for f in sorted((REPO / "devtools" / "kubegfs_dev").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                     else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("kubegfs", "kubegfs_dev", "kubegfs_operator"):
                    imported.setdefault(top, str(f.relative_to(REPO)))
    assert {"yaml", "pytest", "kubernetes"} <= set(imported)

    def canon(req: str) -> str:
        return re.sub(r"[-_.]+", "-", re.split(r"[\s\[;<>=!~]", req, maxsplit=1)[0]).lower()

    declared = {canon(r) for r in md.requires("kubegfs-dev") or []}
    dists = md.packages_distributions()
    missing = {top: where for top, where in imported.items()
               if not {canon(d) for d in dists.get(top, [top])} & declared}
    assert not missing, f"imported by kubegfs_dev but not in devtools/pyproject.toml: {missing}"
