"""The house's rule (ARCHITECTURE.md): imports point down, cli -> targets -> tuning -> jobs ->
the programs -> the libraries -> config, contract, util; no package imports a higher one and
no two top-level parts import each other."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "imgclf"
LAYERS = {
    "cli": 7,
    "targets": 6,
    "tuning": 5,
    "jobs": 4,
    **dict.fromkeys(
        [
            "train",
            "serving",
            "report",
            "debugging",
            "container",
            "_program",
            "transform",
            "evaluate",
        ],
        3,
    ),
    **dict.fromkeys(
        [
            "engine",
            "data",
            "models",
            "artifacts",
            "features",
            "prepare",
            "sample",
            "metrics",
            "scores",
            "incremental",
            "graph",
            "export",
        ],
        2,
    ),
    **dict.fromkeys(
        ["config", "contract", "util", "errors", "processes", "archives", "job_outputs"], 1
    ),
}


def _imports() -> list[tuple[str, str]]:
    """(importing part, imported part) for every import of imgclf, function-level ones too."""
    found = []
    for path in SRC.rglob("*.py"):
        part = path.relative_to(SRC).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("imgclf."):
                found.append((part, node.module.split(".")[1]))
            elif isinstance(node, ast.ImportFrom) and node.module == "imgclf":
                found += [(part, alias.name) for alias in node.names]
            elif isinstance(node, ast.Import):
                found += [
                    (part, a.name.split(".")[1]) for a in node.names if a.name.startswith("imgclf.")
                ]
    return found


def test_every_part_has_a_layer():
    parts = {p.name.removesuffix(".py") for p in SRC.iterdir() if p.name != "__init__.py"}
    parts = {p for p in parts if not p.startswith("__") and not p.endswith(".egg-info")}
    assert parts <= set(LAYERS), f"give these a layer: {sorted(parts - set(LAYERS))}"


def test_no_import_points_up_or_in_a_circle():
    edges = {(a, b) for a, b in _imports() if a != b and not b.startswith("__")}  # __version__
    up = sorted(f"{a} -> {b}" for a, b in edges if LAYERS[b] > LAYERS[a])
    assert up == [], "imports that point up"
    circles = sorted(f"{a} <-> {b}" for a, b in edges if (b, a) in edges and a < b)
    assert circles == [], "parts that import each other"
