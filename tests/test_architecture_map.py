"""
The README's architecture map against the tree: every module under
proxycache/ is on the map, every name on it exists, and the names the path of
one request goes through are real.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "proxycache"
SECTION = "## How it fits together"


def _section() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index(SECTION)
    end = readme.find("\n## ", start + len(SECTION))
    return readme[start:] if end == -1 else readme[start:end]


def _mapped() -> set[str]:
    """The map's entries as paths under proxycache/: C{slots/}, C{slots/_scheduler.py}, C{stats.py}."""
    section = _section()
    block = section[section.index("```\nproxycache/\n") + len("```\nproxycache/\n"):]
    block = block[:block.index("```")]
    entries, package = set(), ""
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        name = line.split()[0]
        if indent == 2 and name.endswith("/"):
            package = name
            entries.add(name)
        elif indent == 2:
            entries.add(name + ".py")
        else:
            assert indent == 4 and package, f"map line out of place: {line!r}"
            entries.add(package + name + ".py")
    return entries


def _tree() -> set[str]:
    modules = {
        str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py" and "__pycache__" not in path.parts
    }
    packages = {
        f"{path.relative_to(PACKAGE)}/" for path in PACKAGE.iterdir()
        if path.is_dir() and path.name != "__pycache__"
    }
    return modules | packages


def test_every_module_is_on_the_map_and_every_entry_exists():
    mapped, tree = _mapped(), _tree()
    assert not tree - mapped, f"modules missing from README's map: {sorted(tree - mapped)}"
    assert not mapped - tree, f"README's map names what does not exist: {sorted(mapped - tree)}"


def _resolve(dotted: str) -> Any:
    parts = dotted.split(".")
    found: Any = importlib.import_module(f"proxycache.{parts[0]}")
    path = f"proxycache.{parts[0]}"
    for part in parts[1:]:
        path += f".{part}"
        if hasattr(found, part):
            found = getattr(found, part)
        else:
            found = importlib.import_module(path)  # a private module of a package
    return found


def test_the_names_on_the_path_of_one_request_exist():
    tops = {entry.rstrip("/").removesuffix(".py") for entry in _mapped() if "/" not in entry.rstrip("/")}
    named = re.findall(r"`([A-Za-z_][\w.]*)`", _section())
    ours = [name for name in named if name.split(".")[0] in tops]
    assert len(ours) >= 10, ours  # the path names what it goes through
    missing = []
    for name in ours:
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f"README's request path names what does not exist: {missing}"
