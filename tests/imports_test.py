"""rotjax's modules import one another without a circle (module-level and lazy imports alike)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules() -> dict:
  """{'rotjax.cpu.onednn_conv': path, ...} for every module of the package."""
  found = {}
  for folder, _, files in os.walk(os.path.join(ROOT, 'rotjax')):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
        found[module.removesuffix('.__init__')] = path
  return found


def _imports(module: str, path: str, modules) -> set:
  """The rotjax modules `module` imports, anywhere in it (a function's import counts too)."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  package = (
    module if path.endswith('__init__.py') else module.rpartition('.')[0]
  )
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out |= {alias.name for alias in node.names if alias.name in modules}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative: from the package, `level` steps up
        parts = package.split('.')[: len(package.split('.')) - node.level + 1]
        base = '.'.join(parts + ([node.module] if node.module else []))
      for alias in node.names:
        name = f'{base}.{alias.name}'
        out.add(name if name in modules else base)
  return {m for m in out if m in modules and m != module}


def _cycle(graph: dict):
  """One import circle as [a, b, ..., a], or None."""
  state = {}

  def visit(node, stack):
    state[node] = 'open'
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in state:
        found = visit(nxt, stack + [nxt])
        if found:
          return found
    state[node] = 'done'
    return None

  for start in sorted(graph):
    if start not in state:
      found = visit(start, [start])
      if found:
        return found
  return None


def test_no_import_circle_among_rotjax_modules():
  modules = _modules()
  graph = {m: _imports(m, path, modules) for m, path in modules.items()}
  assert (
    'rotjax.cpu.onednn_errors' in graph['rotjax.cpu.onednn_conv']
  )  # the graph is read
  cycle = _cycle(graph)
  assert cycle is None, 'import circle: ' + ' -> '.join(cycle)


def test_a_circle_is_found_and_named():
  assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert _cycle({'a': {'b'}, 'b': set()}) is None
