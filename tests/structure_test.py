"""Structure rules of the `diffusion_jax` package, read from its source with `ast`.

- No function or method is longer than `MAX_FUNCTION_LINES`, counted from its `def` line to the
  last line of its body (decorators excluded, nested functions counted inside their parent too).
- No module reads repository files by a path relative to its own file that leaves the package
  (`os.path.dirname(os.path.dirname(__file__))`, `Path(__file__).parents[1]`, a '..' path
  component): an installed package has no repository around it.
- No module edits `sys.path`: imports resolve through the installed package.
"""

import ast
import pathlib
import re

from absl.testing import absltest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'diffusion_jax'
MAX_FUNCTION_LINES = 60

# A '..' path component: '..', '../x', 'x/..', 'a/../b' (also with backslashes); not '...'.
_PARENT_COMPONENT = re.compile(r'(^|[/\\])\.\.([/\\]|$)')
# Calls and attributes that keep a path's folder: they neither go up nor down.
_TRANSPARENT_CALLS = {'abspath', 'realpath', 'normpath', 'Path', 'PurePath', 'resolve', 'absolute'}


def _modules() -> list[pathlib.Path]:
    return sorted(PACKAGE.rglob('*.py'))


def _name(path: pathlib.Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int, int]]:
    """(name, def line, length in lines) of each function of `source` longer than `limit`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                found.append((node.name, node.lineno, length))
    return sorted(found, key=lambda f: f[1])


def _levels_up(node: ast.AST, aliases: dict[str, int]) -> int | None:
    """How many folders above `__file__` the path expression `node` points, None if not one.

    `__file__` itself is 0 (its own file), each `os.path.dirname(.)` or `.parent` one more,
    `.parents[k]` k + 1 more; `abspath`, `Path(.)`, `.resolve()` and the like keep the level; a
    name assigned from such an expression (`aliases`) carries its level.
    """
    if isinstance(node, ast.Name):
        return 0 if node.id == '__file__' else aliases.get(node.id)
    if isinstance(node, ast.Attribute) and node.attr == 'parent':
        inner = _levels_up(node.value, aliases)
        return None if inner is None else inner + 1
    if (
        isinstance(node, ast.Subscript)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == 'parents'
        and isinstance(node.slice, ast.Constant)
    ):
        inner = _levels_up(node.value.value, aliases)
        return None if inner is None else inner + 1 + int(node.slice.value)
    if isinstance(node, ast.Call):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, 'id', None)
        if isinstance(func, ast.Attribute) and name in ('resolve', 'absolute'):
            return _levels_up(func.value, aliases)
        if node.args and name in ('dirname', *_TRANSPARENT_CALLS):
            inner = _levels_up(node.args[0], aliases)
            return None if inner is None else inner + (name == 'dirname')
    return None


def paths_leaving_the_package(source: str, depth: int) -> list[tuple[int, str]]:
    """(line, why) of each path in `source` that points above the package.

    Args:
      source: a module's source.
      depth: how many folders the module sits below the package folder (0 for
        `diffusion_jax/x.py`): `__file__` may go up `depth + 1` folders, to the package itself.
    """
    tree = ast.parse(source)
    aliases: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name):
                level = _levels_up(node.value, {})
                if level is not None:
                    aliases[target.id] = level
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if _PARENT_COMPONENT.search(node.value):
                found.append((node.lineno, f'a path with a parent component: {node.value!r}'))
        elif isinstance(node, ast.expr):
            level = _levels_up(node, aliases)
            if level is not None and level > depth + 1:
                found.append((node.lineno, f'{ast.unparse(node)} is {level} folders above'))
    return sorted(set(found))


def sys_path_uses(source: str) -> list[int]:
    """Lines of `source` that touch `sys.path` (`sys.path...` or `from sys import path`)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr == 'path':
            if isinstance(node.value, ast.Name) and node.value.id == 'sys':
                lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == 'sys':
            lines.extend(node.lineno for alias in node.names if alias.name == 'path')
    return sorted(lines)


class CheckersTest(absltest.TestCase):
    """The checkers find what they are meant to find (on small sources written here)."""

    def test_long_functions_counts_from_def_to_the_last_body_line(self):
        body = ''.join(f'    x{i} = {i}\n' for i in range(59))
        source = f'@decorator\ndef fits():\n{body}\n\ndef too_long():\n{body}    return 1\n'
        # Lines 1-61: fits (def on line 2, 60 lines); two blank lines; too_long from line 64 (61).
        self.assertEqual(long_functions(source), [('too_long', 64, 61)])

    def test_long_functions_finds_methods_and_nested_functions(self):
        body = ''.join(f'            y{i} = {i}\n' for i in range(60))
        source = f'class A:\n    def method(self):\n        def inner():\n{body}'
        self.assertEqual([name for name, _, _ in long_functions(source)], ['method', 'inner'])

    def test_paths_leaving_the_package_are_found(self):
        leaving = [
            'import os\nROOT = os.path.dirname(os.path.dirname(__file__))\n',
            'import os\nROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))\n',
            'import pathlib\nROOT = pathlib.Path(__file__).resolve().parents[1]\n',
            'import pathlib\nROOT = pathlib.Path(__file__).parent.parent\n',
            'import os\nHERE = os.path.dirname(__file__)\nROOT = os.path.dirname(HERE)\n',
            "import os\nCONFIGS = os.path.join(os.path.dirname(__file__), '..', 'configs')\n",
            "open('../configs/cifar10.py')\n",
        ]
        for source in leaving:
            with self.subTest(source=source):
                self.assertNotEmpty(paths_leaving_the_package(source, depth=0))

    def test_paths_inside_the_package_are_allowed(self):
        inside = [
            "import os\nDATA = os.path.join(os.path.dirname(__file__), 'data.npz')\n",
            'import pathlib\nHERE = pathlib.Path(__file__).parent\n',
            "message = 'loading...'\n",
        ]
        for source in inside:
            with self.subTest(source=source):
                self.assertEmpty(paths_leaving_the_package(source, depth=0))
        # One folder down, the package is two folders above the file.
        nested = 'import pathlib\nPACKAGE = pathlib.Path(__file__).parents[1]\n'
        self.assertEmpty(paths_leaving_the_package(nested, depth=1))
        self.assertNotEmpty(paths_leaving_the_package(nested, depth=0))

    def test_sys_path_uses_are_found(self):
        source = 'import sys\nsys.path.insert(0, "x")\nfrom sys import path\nimport os.path\n'
        self.assertEqual(sys_path_uses(source), [2, 3])


class PackageStructureTest(absltest.TestCase):
    def test_the_package_has_modules(self):
        self.assertIn(PACKAGE / 'main.py', _modules())

    def test_no_function_is_longer_than_the_limit(self):
        offenders = [
            f'{_name(path)}:{line} {name} ({length} lines)'
            for path in _modules()
            for name, line, length in long_functions(path.read_text())
        ]
        self.assertEmpty(
            offenders, f'functions over {MAX_FUNCTION_LINES} lines:\n' + '\n'.join(offenders)
        )

    def test_no_module_reads_files_outside_the_package_by_relative_path(self):
        offenders = [
            f'{_name(path)}:{line} {why}'
            for path in _modules()
            for line, why in paths_leaving_the_package(
                path.read_text(), depth=len(path.relative_to(PACKAGE).parts) - 1
            )
        ]
        self.assertEmpty(offenders, '\n'.join(offenders))

    def test_no_module_edits_sys_path(self):
        offenders = [
            f'{_name(path)}:{line}'
            for path in _modules()
            for line in sys_path_uses(path.read_text())
        ]
        self.assertEmpty(offenders, 'sys.path is touched at ' + ', '.join(offenders))


if __name__ == '__main__':
    absltest.main()
