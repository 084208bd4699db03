"""The layering rule of README "Layout", checked on every module's imports (parsed, never run).

Each package may import itself and the packages listed for it in MAY_IMPORT, nothing else of
the project: no upward import (the data path reaching into evaluation), no sideways one beyond
what is listed. Lazy imports inside functions count too: they are imports all the same.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROJECT = ("models", "catalogs", "tasks", "flows", "bench", "tests")

# Lowest first; each layer may import the ones listed (and itself).
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "models": (),
    "catalogs": (),
    "tasks.judges": (),
    "tasks.datapath": ("models", "catalogs", "tasks.judges"),
    "tasks.training": ("models", "catalogs", "tasks.judges", "tasks.datapath"),
    "tasks.evaluation": ("models", "catalogs", "tasks.judges", "tasks.datapath", "tasks.training"),
    "flows": ("models", "catalogs", "tasks"),
    "bench": ("models", "catalogs", "tasks"),
    "tests": PROJECT,
}
# Package roots that hold nothing but their subpackages' docstring.
BARE_ROOTS = {"tasks"}


def layer_of(module: str) -> str | None:
    """The layer a dotted module name belongs to: the longest MAY_IMPORT key it starts with."""
    found = [name for name in MAY_IMPORT if module == name or module.startswith(name + ".")]
    return max(found, key=len) if found else None


def allowed(importer_layer: str, target: str) -> bool:
    return any(target == ok or target.startswith(ok + ".")
               for ok in (importer_layer, *MAY_IMPORT[importer_layer]))


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, dotted module) for every import of the project, relative ones resolved."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from tasks import datapath` imports the subpackage tasks.datapath.
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if layer_of(candidate) != layer_of(base) else base))
    return [(line, name) for line, name in found if name.split(".")[0] in PROJECT]


def layering_violations(root: Path) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if relative.parts[0] not in PROJECT or any(p.startswith(".") for p in relative.parts):
            continue
        module = module_name(path, root)
        layer = layer_of(module)
        if layer is None:
            if module not in BARE_ROOTS:
                problems.append(f"{relative}: belongs to no layer (put it in one of {sorted(MAY_IMPORT)})")
            continue
        tree = ast.parse(path.read_text(), filename=str(relative))
        for line, target in imported_modules(tree, module, path.name == "__init__.py"):
            if not allowed(layer, target):
                may = ", ".join(MAY_IMPORT[layer])
                rule = f"may import only {may} of the project" if may else "may import nothing else of the project"
                problems.append(f"{relative}:{line} imports {target}: {layer} {rule}")
    return problems


def test_the_tree_keeps_the_layering_rule():
    problems = layering_violations(REPO)
    assert not problems, "imports against the layering rule (README, Layout):\n" + "\n".join(problems)


def test_violations_are_found_and_named(tmp_path):
    files = {
        "tasks/__init__.py": "",
        "tasks/datapath/__init__.py": "",
        "tasks/datapath/stego.py": "from tasks.datapath.keys import Key\nfrom tasks.evaluation.metrics import ssim\n",
        "tasks/datapath/encode.py": "def f():\n    import flows.runtime\n",
        "tasks/datapath/decode.py": "from ..training import corpus\n",
        "tasks/evaluation/metrics.py": "from tasks import datapath\nfrom tasks.training.corpus import X\n",
        "tasks/training/corpus.py": "from tasks import evaluation\n",
        "tasks/judges.py": "import numpy\nfrom catalogs import CatalogStore\n",
        "catalogs/store.py": "from models.unet import FACE_SIZE\n",
        "tasks/stray.py": "",
        "flows/anonymize.py": "from tasks.datapath.ray_actor import FaceWorker\nfrom bench import throughput\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    problems = layering_violations(tmp_path)
    rule = "tasks.datapath may import only models, catalogs, tasks.judges of the project"
    assert problems == [
        "catalogs/store.py:1 imports models.unet: catalogs may import nothing else of the project",
        "flows/anonymize.py:2 imports bench: flows may import only models, catalogs, tasks of the project",
        f"tasks/datapath/decode.py:1 imports tasks.training: {rule}",
        f"tasks/datapath/encode.py:2 imports flows.runtime: {rule}",
        f"tasks/datapath/stego.py:2 imports tasks.evaluation.metrics: {rule}",
        "tasks/judges.py:2 imports catalogs: tasks.judges may import nothing else of the project",
        f"tasks/stray.py: belongs to no layer (put it in one of {sorted(MAY_IMPORT)})",
        "tasks/training/corpus.py:1 imports tasks.evaluation: tasks.training may import only models, catalogs, "
        "tasks.judges, tasks.datapath of the project",
    ]


def _modules_loaded_by(imports: list[str]) -> set[str]:
    code = "import sys\n" + "".join(f"import {m}\n" for m in imports) + "print(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return {name.split(".")[0] for name in result.stdout.split()}


def test_only_the_actor_and_the_flows_that_use_it_load_ray():
    plain = ["tasks.datapath.anonymize", "tasks.datapath.reconstruct", "tasks.evaluation.labelled_faces",
             "tasks.evaluation.evaluate", "flows.recording", "flows.train_matcher", "flows.train_uunet",
             "bench.throughput", "bench.memory"]
    assert "ray" not in _modules_loaded_by(plain)
    assert "ray" in _modules_loaded_by(["tasks.datapath.ray_actor"])


def test_the_standalone_training_entry_point_needs_torch_alone():
    loaded = _modules_loaded_by(["tasks.training.loops"])
    assert "torch" in loaded
    assert not loaded & {"pandas", "pyarrow", "prefect", "ray", "cv2", "decord", "onnxruntime", "catalogs"}
    help_text = subprocess.run([sys.executable, "-m", "tasks.training", "--help"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout
    assert help_text.startswith("usage: python -m tasks.training")
