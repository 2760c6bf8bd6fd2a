"""The architecture holds: one import root, dependencies that point one way, no import cycle, and a plugin that
leaves a user's own pytest session alone.

- ``lint-imports`` checks the contracts in ``pyproject.toml`` (layers core < harness < areas < catalog < plugin
  and cli; area science imports core only; reports import no torch and nothing of ``lmaudit.checks``).
- No import cycle anywhere (grimp's import graph, type-checking-only imports excluded: they never run).
- A user repository with its own ``reports`` and ``checks`` packages keeps them importable in its tests while
  lmaudit is installed, both as this editable install and as a built wheel in a fresh environment; the plugin
  imports no torch and registers no hypothesis profile in such a session.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold() -> None:
    result = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the lmaudit modules it imports (at any place in the module, type-checking blocks excluded)."""
    import grimp

    graph = grimp.build_graph("lmaudit.checks", "lmaudit.reports", exclude_type_checking_imports=True)
    return {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}


def test_no_import_cycle_anywhere() -> None:
    edges = import_graph()
    # A package's __init__ importing its own submodule is not a cycle of the architecture; everything else is.
    assert _cycles(edges) == []


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# ------------------------------------------------------------------------------------------ shadowing

USER_REPO = {
    "reports/__init__.py": "MY_THING = 42\n",
    "checks/__init__.py": "OTHER = 7\n",
    "tests/test_user.py": textwrap.dedent("""
        import sys

        from checks import OTHER
        from reports import MY_THING


        def test_users_own_packages_are_importable():
            assert MY_THING == 42 and OTHER == 7


        def test_lmaudit_is_loaded_but_imports_no_torch():
            assert "lmaudit.checks.plugin" in sys.modules
            assert "torch" not in sys.modules


        def test_hypothesis_profiles_are_recorded():
            import os

            from hypothesis import settings

            profiles = {name: repr(settings.get_profile(name)) for name in sorted(settings._profiles)}
            with open(os.environ["PROFILES_OUT"], "w") as handle:
                handle.write(repr(profiles))
    """),
}


def _write_user_repo(directory: Path) -> Path:
    for name, text in USER_REPO.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return directory


def _run_user_tests(python: str, repo: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the user's tests with lmaudit's plugin, and once without it: the hypothesis profiles (hypothesis has
    built-in ones) must be the same both ways, i.e. lmaudit registers none."""
    runs = {}
    for label, extra in (("with", []), ("without", ["-p", "no:lmaudit", "-k", "profiles"])):
        out = repo / f"profiles-{label}.txt"
        runs[label] = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, "tests"],
                                     cwd=repo, capture_output=True, text=True, timeout=300,
                                     env={**os.environ, **(env or {}), "PROFILES_OUT": str(out)})
        assert runs[label].returncode == 0, runs[label].stdout + runs[label].stderr
    assert (repo / "profiles-with.txt").read_text() == (repo / "profiles-without.txt").read_text()
    return runs["with"]


def test_users_reports_and_checks_packages_are_not_shadowed_editable(tmp_path: Path) -> None:
    repo = _write_user_repo(tmp_path / "user-repo")
    result = _run_user_tests(sys.executable, repo)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, timeout=600)
    return next(out.glob("lmaudit-*.whl"))


def test_wheel_installs_one_import_root(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"lmaudit"}
    assert "lmaudit/reports/templates/report.html.j2" in names
    assert not any(name.startswith(("lmaudit/tests", "lmaudit/audits")) for name in names)


def test_users_reports_and_checks_packages_are_not_shadowed_wheel(tmp_path: Path, wheel: Path) -> None:
    """A fresh environment holding the built wheel; lmaudit's dependencies come from this venv's site-packages
    through a .pth line (whose own .pth files, the editable install among them, are not processed)."""
    env_dir = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = str(env_dir / "bin" / "python")
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    (site / "zz_lmaudit_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = subprocess.run([python, "-c", "import lmaudit.checks, lmaudit.reports; print(lmaudit.checks.__file__)"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(site)), where.stdout  # the wheel's copy, not the editable one
    repo = _write_user_repo(tmp_path / "user-repo")
    result = _run_user_tests(python, repo, env={"PYTHONNOUSERSITE": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout
