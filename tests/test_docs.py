"""The documentation keeps up with the code.

- Every exception and warning the package can raise has an entry in ``docs/troubleshooting.md`` (found with
  ``ast``: each ``raise X(...)`` and ``warnings.warn`` / ``rank_zero_warn`` call in ``moe_monitor/``).
- Every public class and function has a doctest example.
- The ``python`` code blocks of ``docs/*.md`` run, page by page, in a fresh namespace.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import os
import pkgutil
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

import moe_monitor

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "moe_monitor"
DOCS = ROOT / "docs"
TROUBLESHOOTING = DOCS / "troubleshooting.md"

# ----------------------------------------------------------------------------------------- troubleshooting

# Calls that emit a warning: ``warnings.warn(msg, Category)``, ``warn(...)``, Lightning's ``rank_zero_warn(msg,
# category=...)``. Their category defaults to UserWarning, as in the functions themselves.
_WARN_FUNCTIONS = {"warn", "rank_zero_warn"}
# Words of the message's longest literal part that an entry must quote: enough to be specific, short enough to
# survive line breaks and rewording of the message's tail.
_KEY_WORDS = 8


@dataclass(frozen=True)
class Raised:
    """One ``raise`` or warning call site: what a user sees, and where it comes from."""

    kind: str  # exception or warning class name
    key: str  # the start of the message's longest literal part; "" when the message has no literal text
    where: str  # path:line
    function: str

    def describe(self) -> str:
        quote = repr(self.key) if self.key else "(message without literal text: an entry naming the class)"
        return f"{self.where} (in {self.function}): {self.kind} {quote}"


def _literal_parts(node: ast.AST | None) -> list[str]:
    """The constant text pieces of a message expression (f-string parts, concatenations, ``%`` / ``.format``)."""
    if node is None:
        return []
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    if isinstance(node, ast.BinOp):
        return _literal_parts(node.left) + _literal_parts(node.right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        return _literal_parts(node.func.value)
    return []


def normalise(text: str) -> str:
    """Lower case, no backticks or markdown escapes, single spaces: how keys and page text are compared."""
    text = text.replace("`", "").replace("\\", "")
    return re.sub(r"\s+", " ", text).strip().lower()


def _message_key(message: ast.AST | None) -> str:
    parts = [normalise(p) for p in _literal_parts(message)]
    # Text cut at an f-string field starts or ends with its punctuation: ``"): cannot tell ..."``.
    parts = [re.sub(r"^[^\w'\"-]+", "", p).rstrip(" .,;:") for p in parts]
    parts = [p for p in parts if len(p.split()) >= 2]
    if not parts:
        return ""  # no text to quote: the entry names the class
    words = max(parts, key=len).split()
    return " ".join(words[:_KEY_WORDS])


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


class _Finder(ast.NodeVisitor):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.stack: list[str] = []
        self.found: list[Raised] = []

    def _scope(self, node: ast.AST) -> None:
        self.stack.append(node.name)  # type: ignore[attr-defined]
        self.generic_visit(node)
        self.stack.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scope

    def _add(self, kind: str, message: ast.AST | None, node: ast.AST) -> None:
        function = ".".join(self.stack) or "<module>"
        where = f"{self.path.relative_to(ROOT)}:{node.lineno}"  # type: ignore[attr-defined]
        self.found.append(Raised(kind, _message_key(message), where, function))

    def visit_Raise(self, node: ast.Raise) -> None:
        # A bare ``raise`` or ``raise err`` re-raises something raised (and listed) elsewhere.
        if isinstance(node.exc, ast.Call):
            kind = _name(node.exc.func)
            if kind is not None:
                self._add(kind, node.exc.args[0] if node.exc.args else None, node)
        elif isinstance(node.exc, (ast.Name, ast.Attribute)) and (_name(node.exc) or "")[:1].isupper():
            self._add(_name(node.exc), None, node)  # type: ignore[arg-type]
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        is_warn = (isinstance(func, ast.Name) and func.id in _WARN_FUNCTIONS) or (
            isinstance(func, ast.Attribute)
            and func.attr in _WARN_FUNCTIONS
            and isinstance(func.value, ast.Name)
            and func.value.id in ("warnings", "rank_zero")
        )
        if is_warn:
            category = next((kw.value for kw in node.keywords if kw.arg == "category"), None)
            if category is None and len(node.args) > 1:
                category = node.args[1]
            kind = _name(category) if category is not None else "UserWarning"
            self._add(kind or "UserWarning", node.args[0] if node.args else None, node)
        self.generic_visit(node)


def raised_in_package() -> list[Raised]:
    """Every exception and warning call site of ``moe_monitor/``, in file and line order."""
    found: list[Raised] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        finder = _Finder(path)
        finder.visit(ast.parse(path.read_text(), filename=str(path)))
        found.extend(finder.found)
    return found


def troubleshooting_sections() -> list[str]:
    """The page's ``###`` entries (heading and body), normalised."""
    text = TROUBLESHOOTING.read_text()
    return [normalise(s) for s in re.split(r"^#{2,3} ", text, flags=re.MULTILINE)[1:]]


def test_finder_reads_messages_categories_and_reraises() -> None:
    source = textwrap.dedent(
        """
        import warnings
        def f(x):
            if x:
                raise ValueError(f"x={x!r} is not valid; choose a positive integer or None.")
            try:
                pass
            except KeyError as err:
                raise
            warnings.warn("moe_monitor: the token mask " "has too few entries", RuntimeWarning)
            rank_zero_warn(f"MoEMonitor could not {x} ({x}); training goes on.", category=RuntimeWarning)
            raise NotImplementedError
        """
    )
    path = PACKAGE / "_probe_for_test.py"
    finder = _Finder(path)
    finder.visit(ast.parse(source))
    got = [(r.kind, r.key, r.function) for r in finder.found]
    assert got == [
        ("ValueError", "is not valid; choose a positive integer or", "f"),
        ("RuntimeWarning", "moe_monitor: the token mask has too few entries", "f"),
        ("RuntimeWarning", "moemonitor could not", "f"),
        ("NotImplementedError", "", "f"),
    ]


def test_every_exception_and_warning_is_in_troubleshooting() -> None:
    raised = raised_in_package()
    assert len(raised) > 50  # the finder sees the package's call sites
    sections = troubleshooting_sections()
    missing = [r for r in raised if not any(r.key in section and r.kind.lower() in section for section in sections)]
    report = "\n".join(f"  {r.describe()}" for r in missing)
    assert not missing, (
        f"{len(missing)} exception/warning call site(s) have no entry in {TROUBLESHOOTING.relative_to(ROOT)}.\n"
        "Add each to a '###' entry whose heading or text names the class and quotes the key (compared lower case, "
        "without backticks, whitespace collapsed), with its cause and what to do:\n" + report
    )


# ----------------------------------------------------------------------------------------- doctests

# Public names without a doctest example in main when this test was written. The list may only shrink: a name here
# that gains an example fails the test until it is removed from the list.
LACKING_DOCTEST: set[str] = {
    "moe_monitor.cli.run_train",
    "moe_monitor.counters.ExpertCountMismatch",
    "moe_monitor.scenarios.RunResult",
    "moe_monitor.scenarios.run",
    "moe_monitor.sinks.wandb.WandbSink",
}


def _public_modules() -> list[str]:
    names = ["moe_monitor"]
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="moe_monitor."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


def public_objects() -> dict[str, object]:
    """``moe_monitor.__all__`` and the public classes and functions of every public module (``__all__`` when the
    module defines it, else the names defined in it that do not start with ``_``)."""
    objects: dict[str, object] = {}
    for module_name in _public_modules():
        module = importlib.import_module(module_name)
        names = getattr(module, "__all__", None)
        if names is None:
            names = [
                n
                for n, obj in vars(module).items()
                if not n.startswith("_")
                and (inspect.isclass(obj) or inspect.isfunction(obj))
                and getattr(obj, "__module__", None) == module_name
            ]
        for name in names:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                objects.setdefault(f"{obj.__module__}.{obj.__qualname__}", obj)
    return objects


def _has_doctest(obj: object) -> bool:
    return bool(doctest.DocTestParser().get_examples(inspect.getdoc(obj) or ""))


@pytest.mark.slow  # imports every public module (Lightning, transformers): about 15 s on a 2-core machine
def test_every_public_class_and_function_has_a_doctest() -> None:
    objects = public_objects()
    assert "moe_monitor.monitor.RouterMonitor" in objects and "moe_monitor.stats.load_entropy" in objects
    lacking = sorted(name for name, obj in objects.items() if not _has_doctest(obj))
    new = [n for n in lacking if n not in LACKING_DOCTEST]
    fixed = sorted(LACKING_DOCTEST - set(lacking))
    where = {n: f"{inspect.getsourcefile(objects[n])}:{inspect.getsourcelines(objects[n])[1]}" for n in new}
    assert not new, "public names without a doctest example (add an 'Example:' section with >>> lines):\n" + "\n".join(
        f"  {n}  ({os.path.relpath(where[n], ROOT)})" for n in new
    )
    assert not fixed, "these names have a doctest now; remove them from LACKING_DOCTEST:\n  " + "\n  ".join(fixed)


# ----------------------------------------------------------------------------------------- guide snippets

_FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
SKIP_MARK = "# docs: skip"


def snippets(page: Path) -> list[tuple[int, str]]:
    """The page's ``python`` code blocks as ``(line, code)``; blocks containing ``# docs: skip`` are left out."""
    text = page.read_text()
    blocks = []
    for match in _FENCE.finditer(text):
        code = match.group(1)
        if SKIP_MARK not in code:
            blocks.append((text.count("\n", 0, match.start()) + 2, code))
    return blocks


PAGES = sorted(DOCS.rglob("*.md"))


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if snippets(p)], ids=lambda p: str(p.relative_to(DOCS)))
def test_guide_snippets_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    blocks = snippets(page)
    assert blocks, f"{page.relative_to(ROOT)} is listed for its snippets but has none to run"
    for line, code in blocks:
        try:
            exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"the python block at {page.relative_to(ROOT)}:{line} failed: {err!r}") from err


def test_snippet_extraction_keeps_order_and_skips_marked_blocks(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    blocks = ["```python\na = 1\n```", "```bash\nls\n```", "```python\n# docs: skip\nb\n```", "```python\nc = a\n```"]
    page.write_text("text\n" + "\n".join(blocks) + "\n")
    assert snippets(page) == [(3, "a = 1\n"), (13, "c = a\n")]


def test_changelog_has_a_section_for_the_current_version() -> None:
    changelog = (DOCS / "changelog.md").read_text()
    assert re.search(rf"^## {re.escape(moe_monitor.__version__)}\b", changelog, flags=re.MULTILINE)
