"""README.md and docs/ cannot drift from the code: every command they tell a reader to run,
every config, preset and config key they name, every link and every repository file or
module attribute they mention must exist and parse.

Commands come from fenced ```bash / ```sh / ```shell / ```console blocks, indented command
lines and inline `python ...` spans. `python -m rotjax.main|study` command lines go through
the real flag parser (ml_collections' config_flags, as the CLI does); `rotjax.evaluate`
through its own argument parser; scripts' flags are read from their argparse/absl
definitions. A few commands also run for real with --help. Each problem names the file, the
line and what is wrong.
"""

import ast
import difflib
import functools
import glob
import importlib
import inspect
import os
import re
import shlex
import subprocess
import sys
import tomllib

import ml_collections
import pytest

from rotjax import testing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ['README.md'] + sorted(
  os.path.relpath(p, REPO) for p in glob.glob(f'{REPO}/docs/*.md')
)
SHELL_LANGS = ('bash', 'sh', 'shell', 'console')
REPO_ROOTS = (
  'rotjax/',
  'configs/',
  'scripts/',
  'docs/',
  'tests/',
  '.ci/',
  '.github/',
)
REPO_FILES = ('README.md', 'CHANGELOG.md', 'pyproject.toml')
FILE_SUFFIXES = (
  '.json',
  '.jsonl',
  '.md',
  '.py',
  '.csv',
  '.png',
  '.npy',
  '.txt',
  '.toml',
  '.yml',
  '.sh',
  '.cc',
  '.h',
  '.so',
  '.tgz',
)
ABSL_FLAGS = {
  '--help',
  '--helpfull',
  '--helpshort',
  '--logtostderr',
  '--alsologtostderr',
  '--v',
  '--verbosity',
}
COMMAND_PREFIXES = {'srun', 'sudo', 'env', 'time', 'exec'}
# ml_collections loads config files by path through importlib's deprecated load_module.
pytestmark = pytest.mark.filterwarnings(
  'ignore:the load_module:DeprecationWarning'
)


# ---------------------------------------------------------------- reading the Markdown


class Span:
  """A piece of a doc: its text, file and 1-based line."""

  def __init__(self, text, file, line, fenced=False):
    self.text, self.file, self.line, self.fenced = text, file, line, fenced

  def where(self):
    return f'{self.file}:{self.line}'


@functools.cache
def lines_of(doc):
  with open(os.path.join(REPO, doc)) as f:
    return f.read().splitlines()


def fenced_blocks(doc):
  """(language, first line number of the body, body lines) of each ``` block."""
  blocks, lang, start, body = [], None, 0, []
  for number, line in enumerate(lines_of(doc), 1):
    fence = re.match(r'^\s*```+\s*([\w+-]*)', line)
    if fence and lang is None:
      lang, start, body = fence.group(1).lower() or 'plain', number + 1, []
    elif fence:
      blocks.append((lang, start, body))
      lang = None
    elif lang is not None:
      body.append(line)
  return blocks


def prose_lines(doc):
  """(line number, line) outside fenced blocks."""
  inside = False
  for number, line in enumerate(lines_of(doc), 1):
    if re.match(r'^\s*```', line):
      inside = not inside
    elif not inside:
      yield number, line


def inline_code(doc):
  """Every `code span` outside fenced blocks (spans inside table cells included)."""
  for number, line in prose_lines(doc):
    for match in re.finditer(r'(`+)(.+?)\1', line):
      yield Span(match.group(2).strip(), doc, number)


def commands(doc):
  """Shell commands a reader is told to run, each a Span of one command line."""
  found = []
  for lang, start, body in fenced_blocks(doc):
    if lang in SHELL_LANGS:
      pending, first = '', None
      for offset, line in enumerate(body):
        if lang == 'console':
          if not line.startswith('$ ') and not pending:
            continue  # output
          line = line[2:] if line.startswith('$ ') else line
        if first is None:
          first = start + offset
        if line.rstrip().endswith('\\'):
          pending += line.rstrip()[:-1] + ' '
          continue
        text = (pending + line).strip()
        if text and not text.startswith('#'):
          found.append(Span(text, doc, first, fenced=True))
        pending, first = '', None
  for number, line in prose_lines(
    doc
  ):  # indented code: four spaces, then a command
    match = re.match(r'^(?: {4,}|\t)\$? ?((?:python|bash|pip)\s.*)$', line)
    if match and not line.lstrip().startswith(('-', '*')):
      found.append(Span(match.group(1).strip(), doc, number, fenced=True))
  for span in inline_code(doc):
    if re.match(r'^(python3?|bash|pip)\s', span.text):
      found.append(span)
  return found


def split_commands(text):
  """A shell line -> argv lists: split at && || ; | &, environment assignments and launcher
  prefixes (srun, sudo, env) dropped."""
  lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  argvs, argv = [], []
  for token in lexer:
    if token in ('&&', '||', ';', '|', '&'):
      argvs.append(argv)
      argv = []
    else:
      argv.append(token)
  argvs.append(argv)
  cleaned = []
  for argv in argvs:
    while argv and (
      re.match(r'^[A-Za-z_]\w*=', argv[0]) or argv[0] in COMMAND_PREFIXES
    ):
      argv = argv[1:]
    if argv[:1] == ['nice'] and argv[1:2] == ['-n']:
      argv = argv[3:]
    if argv:
      cleaned.append(argv)
  return cleaned


# ---------------------------------------------------------------- what the code defines


def load_config(name, preset):
  """configs/NAME.py's get_config(preset) (no preset: get_config())."""
  module = importlib.import_module(f'configs.{name}')
  return (
    module.get_config(preset) if preset is not None else module.get_config()
  )


def config_spec(spec):
  """'configs/x.py:preset' -> (config, problem)."""
  path, _, preset = spec.partition(':')
  match = re.fullmatch(r'configs/(\w+)\.py', path)
  if not match or not os.path.exists(os.path.join(REPO, path)):
    return None, f'config file {path} does not exist'
  try:
    config = load_config(match.group(1), preset if ':' in spec else None)
  except Exception as e:  # the preset's own error names what it allows
    return None, f'{spec} does not load: {type(e).__name__}: {e}'
  if preset:
    # Some config files ignore a preset they do not know: a misspelled one changes nothing.
    module = importlib.import_module(f'configs.{match.group(1)}')
    default = next(
      iter(inspect.signature(module.get_config).parameters.values())
    ).default
    if preset != default and config.to_dict() == module.get_config().to_dict():
      return (
        None,
        f'{spec}: the preset {preset!r} changes nothing (not a preset of {path}?)',
      )
  return config, None


def key_paths(config, prefix=''):
  """Every dotted key of a ConfigDict, inner nodes included."""
  keys = set()
  for key, value in config.items():
    keys.add(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      keys |= key_paths(value, f'{prefix}{key}.')
  return keys


@functools.cache
def every_config_key():
  """The keys of every config and preset in configs/ (for --config.KEY named in prose)."""
  keys = set()
  specs = [
    ('common', None),
    ('pretext', None),
    ('finetune', None),
    ('supervised', None),
    ('imagenette', 'pretext'),
    ('imagenet', 'pretext'),
    ('imagenet', 'study'),
    ('study', None),
    ('study', 'cpu'),
    ('study', 'cpu_full'),
    ('study', 'gpu'),
  ]
  for name, preset in specs:
    keys |= key_paths(load_config(name, preset))
  return keys


def key_problem(key, keys, where_from):
  if key in keys:
    return None
  close = difflib.get_close_matches(key, sorted(keys), n=1)
  hint = f' (did you mean {close[0]}?)' if close else ''
  return f'--config.{key}: no such key in {where_from}{hint}'


def module_file(dotted):
  """rotjax.x.y -> its file (a module, or a package's __main__ for `python -m`)."""
  base = os.path.join(REPO, *dotted.split('.'))
  for path in (base + '.py', os.path.join(base, '__main__.py')):
    if os.path.exists(path):
      return path
  return None


@functools.cache
def defined_flags(path):
  """The --flags a script or module defines: argparse add_argument, absl DEFINE_*, and
  `'--x' in sys.argv` tests; followed into sibling scripts it imports."""
  with open(path) as f:
    tree = ast.parse(f.read())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
      strings = [
        a.value
        for a in node.args
        if isinstance(a, ast.Constant) and isinstance(a.value, str)
      ]
      if node.func.attr == 'add_argument':
        found |= {s for s in strings if s.startswith('-')}
      elif node.func.attr.startswith('DEFINE_') and strings:
        found.add('--' + strings[0])
    elif isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant):
      if isinstance(node.left.value, str) and node.left.value.startswith('--'):
        found.add(node.left.value)
    elif isinstance(
      node, (ast.Tuple, ast.List)
    ):  # tables of flags, as evaluate.OPTIONS
      for element in node.elts:
        if isinstance(element, ast.Constant) and isinstance(element.value, str):
          if re.fullmatch(r'--[a-z][\w-]*', element.value):
            found.add(element.value)
    if isinstance(node, ast.Import):
      for alias in node.names:
        sibling = os.path.join(os.path.dirname(path), alias.name + '.py')
        if os.path.exists(sibling):
          found |= defined_flags(sibling)
  return frozenset(found | {'--help', '-h'})


@functools.cache
def top_level_names(path):
  """Names a module defines at its top level (functions, classes, assignments, imports, __all__)."""
  with open(path) as f:
    tree = ast.parse(f.read())
  names = set()
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      names.add(node.name)
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      for target in targets:
        for leaf in ast.walk(target):
          if isinstance(leaf, ast.Name):
            names.add(leaf.id)
      if any(isinstance(t, ast.Name) and t.id == '__all__' for t in targets):
        names |= {
          e.value for e in node.value.elts if isinstance(e, ast.Constant)
        }
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      names |= {(a.asname or a.name).split('.')[0] for a in node.names}
  return frozenset(names)


@functools.cache
def modules_by_basename():
  """'hardware' -> ['rotjax/cpu/hardware.py'], for every module under rotjax/."""
  table = {}
  for path in glob.glob(f'{REPO}/rotjax/**/*.py', recursive=True):
    name = os.path.basename(path)[:-3]
    if name != '__init__':
      table.setdefault(name, []).append(path)
  return table


@functools.cache
def pyproject():
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    return tomllib.load(f)


# ---------------------------------------------------------------- checking one command


def check_config_command(argv, target):
  """python -m rotjax.main|study: --config loads, every --config.KEY exists, and the whole
  line parses as the CLI parses it."""
  from absl import flags
  from ml_collections import config_flags

  spec = None
  for i, arg in enumerate(argv):
    if arg == '--config' and i + 1 < len(argv):
      spec = argv[i + 1]
    elif arg.startswith('--config='):
      spec = arg.split('=', 1)[1]
  if spec is None:
    return [f'{target} needs --config']
  config, problem = config_spec(spec)
  if problem:
    return [problem]
  keys = key_paths(config)
  problems = []
  for arg in argv:
    match = re.match(r'^--config\.([\w.]+)(=|$)', arg)
    if match:
      problem = key_problem(match.group(1), keys, spec)
      if problem:
        problems.append(problem)
    elif (
      arg.startswith('--')
      and not arg.startswith('--config')
      and arg.split('=')[0] not in ABSL_FLAGS
    ):
      problems.append(f'{arg.split("=")[0]}: {target} has no such flag')
  if problems:
    return problems
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(
    'config',
    None,
    flag_values=values,
    lock_config=True,
    sys_argv=['prog'] + argv,
  )
  try:
    values(['prog'] + argv)
    values.config  # loads the file and applies the overrides
  except Exception as e:
    return [f'does not parse as {target} parses it: {type(e).__name__}: {e}']
  return []


def check_evaluate_command(argv):
  from rotjax import evaluate

  if not argv:
    return []
  if not hasattr(
    evaluate, 'parse_args'
  ):  # another command-line library: its flags, statically
    return check_flags(argv, module_file('rotjax.evaluate'), 'rotjax.evaluate')
  try:
    evaluate.parse_args(argv)
  except SystemExit:
    return [
      f'python -m rotjax.evaluate refuses {" ".join(argv)!r} (run it with --help)'
    ]
  return []


def check_flags(argv, path, target):
  known = defined_flags(path)
  problems = []
  for arg in argv:
    if arg.startswith('-') and not re.match(r'^-\d', arg):
      flag = arg.split('=')[0]
      if flag not in known:
        close = difflib.get_close_matches(flag, sorted(known), n=1)
        problems.append(
          f'{flag}: {target} defines no such flag'
          + (f' (did you mean {close[0]}?)' if close else '')
        )
    if re.match(r'^configs/\w+\.py', arg):
      problems += [p for p in [config_spec(arg)[1]] if p]
  return problems


def check_pytest(argv):
  markers = {
    re.split(r'[(:]', m)[0].strip()
    for m in pyproject()['tool']['pytest']['ini_options']['markers']
  }
  problems = []
  for i, arg in enumerate(argv):
    if arg == '-m' and i + 1 < len(argv):
      for word in re.findall(r'\w+', argv[i + 1]):
        if word not in ('and', 'or', 'not') and word not in markers:
          problems.append(
            f'pytest marker {word!r} is not declared in pyproject.toml'
          )
    elif (
      not arg.startswith('-') and (i == 0 or argv[i - 1] != '-m') and '/' in arg
    ):
      if not os.path.exists(os.path.join(REPO, arg.split('::')[0])):
        problems.append(f'{arg}: no such test path')
  return problems


def check_pip(argv):
  extras = set(pyproject()['project'].get('optional-dependencies', {}))
  problems = []
  for arg in argv:
    match = re.fullmatch(r'\.\[([\w,-]+)\]', arg)
    if match:
      problems += [
        f'pip extra {e!r} is not in pyproject.toml'
        for e in match.group(1).split(',')
        if e not in extras
      ]
  return problems


def check_shell_script(argv):
  path = os.path.join(REPO, argv[0])
  if not os.path.exists(path):
    return [f'{argv[0]} does not exist']
  with open(path) as f:
    labels = set(re.findall(r'^\s*([\w|-]+)\)', f.read(), re.M))
  labels = {part for label in labels for part in label.split('|')}
  return [
    f'{argv[0]} has no part {arg!r} (its case labels: {sorted(labels)})'
    for arg in argv[1:]
    if not arg.startswith('-') and arg not in labels
  ]


def check_argv(argv):
  """Problems of one command (argv after prefixes), [] when it checks out or is not ours."""
  program = argv[0]
  if program in ('python', 'python3'):
    if argv[1:2] == ['-m'] and len(argv) > 2:
      target, rest = argv[2], argv[3:]
      if target == 'pytest':
        return check_pytest(rest)
      if target == 'pip':
        return check_pip(rest)
      if not target.startswith('rotjax'):
        return []
      path = module_file(target)
      if path is None:
        return [f'python -m {target}: no such module']
      if target in ('rotjax.main', 'rotjax.study'):
        return check_config_command(rest, target)
      if target == 'rotjax.evaluate':
        return check_evaluate_command(rest)
      return check_flags(rest, path, target)
    if len(argv) > 1 and argv[1].endswith('.py'):
      path = os.path.join(REPO, argv[1])
      if not os.path.exists(path):
        return [f'{argv[1]} does not exist']
      return check_flags(argv[2:], path, argv[1])
    return []
  if program == 'pip':
    return check_pip(argv[1:])
  if program == 'bash' and len(argv) > 1 and argv[1].startswith('scripts/'):
    return check_shell_script(argv[1:])
  return []


# ---------------------------------------------------------------- the tests


def report(problems):
  assert not problems, 'docs out of step with the code:\n' + '\n'.join(problems)


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
  monkeypatch.chdir(
    REPO
  )  # config files are found by path, as from a shell in the checkout
  monkeypatch.syspath_prepend(REPO)


def test_the_docs_exist_and_say_what_they_are_for():
  problems = []
  for doc in DOCS[1:]:
    text = [line for line in lines_of(doc) if line.strip()]
    if (
      not text
      or not text[0].startswith('# ')
      or len(text) < 2
      or text[1].startswith('#')
    ):
      problems.append(
        f'{doc}:1: should open with a title and a sentence on what it is for'
      )
  readme = len(lines_of('README.md'))
  if readme > 220:
    problems.append(
      f'README.md: {readme} lines; keep it a page (~200) and move detail to docs/'
    )
  report(problems)


def test_every_command_names_real_modules_scripts_configs_and_flags():
  problems = []
  for doc in DOCS:
    for span in commands(doc):
      try:
        argvs = split_commands(span.text)
      except ValueError as e:
        problems.append(
          f'{span.where()}: `{span.text}`: does not parse as a shell line: {e}'
        )
        continue
      for argv in argvs:
        bare = len(argv) == (3 if argv[1:2] == ['-m'] else 2)
        if not span.fenced and argv[0] in ('python', 'python3') and bare:
          # A module or script named in prose, without arguments: it must exist.
          if (
            argv[1:2] == ['-m']
            and argv[2].startswith('rotjax')
            and not module_file(argv[2])
          ):
            problems.append(
              f'{span.where()}: `{span.text}`: python -m {argv[2]}: no such module'
            )
          elif argv[1].endswith('.py') and not os.path.exists(
            os.path.join(REPO, argv[1])
          ):
            problems.append(
              f'{span.where()}: `{span.text}`: {argv[1]} does not exist'
            )
          continue
        problems += [
          f'{span.where()}: `{span.text}`: {p}' for p in check_argv(argv)
        ]
  report(problems)


def test_every_config_key_named_in_prose_exists():
  keys = every_config_key()
  problems = []
  for doc in DOCS:
    for span in inline_code(doc):
      if re.match(r'^(python3?|bash|pip)\s', span.text):
        continue  # a command: checked against its own config above
      for key in re.findall(r'--config\.([\w.]+)', span.text):
        problem = key_problem(key, keys, 'any config in configs/')
        if problem:
          problems.append(f'{span.where()}: `{span.text}`: {problem}')
  report(problems)


def heading_anchors(doc):
  anchors = set()
  for _, line in prose_lines(doc):
    match = re.match(r'^#+\s+(.*?)\s*#*\s*$', line)
    if match:
      title = re.sub(
        r'[`*_]|\[([^\]]*)\]\([^)]*\)', r'\1', match.group(1)
      ).lower()
      anchors.add(re.sub(r'\s', '-', re.sub(r'[^\w\- ]', '', title)))
  return anchors


def test_every_relative_link_and_anchor_resolves():
  problems = []
  for doc in DOCS + ['CHANGELOG.md']:
    for number, line in prose_lines(doc):
      for match in re.finditer(r'\[[^\]]*\]\(([^)\s]+)\)', line):
        target = match.group(1)
        if re.match(r'^[a-z]+:', target):
          continue  # http:, https:, mailto:
        path, _, anchor = target.partition('#')
        file = (
          os.path.normpath(os.path.join(os.path.dirname(doc), path))
          if path
          else doc
        )
        if not os.path.exists(os.path.join(REPO, file)):
          problems.append(
            f'{doc}:{number}: link to {target}: {file} does not exist'
          )
        elif (
          anchor
          and file.endswith('.md')
          and anchor not in heading_anchors(file)
        ):
          problems.append(
            f'{doc}:{number}: link to {target}: {file} has no heading #{anchor}'
          )
  report(problems)


def test_every_repository_path_named_exists():
  problems = []
  for doc in DOCS:
    for span in inline_code(doc):
      text = span.text
      if (
        ' ' in text
        or not (text.startswith(REPO_ROOTS) or text in REPO_FILES)
        or '<' in text
      ):
        continue
      path, _, preset = text.partition(':')
      full = os.path.join(REPO, path)
      if not (glob.glob(full) if '*' in path else os.path.exists(full)):
        problems.append(f'{span.where()}: `{text}`: {path} does not exist')
      elif (
        preset
        and path.startswith('configs/')
        and not re.search(r'[A-Z]', preset)
      ):
        problem = config_spec(text)[1]
        if problem:
          problems.append(f'{span.where()}: `{text}`: {problem}')
  report(problems)


def test_every_module_attribute_named_exists():
  """`hardware.describe`, `rotjax.cpu.onednn_conv.OneDNNConvError`: the module defines it."""
  keys = every_config_key()
  problems = []
  for doc in DOCS:
    for span in inline_code(doc):
      text = re.sub(r'\(.*\)$', '', span.text)
      if (
        not re.fullmatch(r'[A-Za-z_]\w*(\.[A-Za-z_]\w*)+', text) or text in keys
      ):
        continue
      if text.endswith(FILE_SUFFIXES) or text.split('.', 1)[1] in keys:
        continue
      parts = text.split('.')
      if parts[0] == 'rotjax':
        for cut in range(len(parts) - 1, 0, -1):  # the longest module prefix
          path = module_file('.'.join(parts[:cut])) or (
            os.path.join(REPO, *parts[:cut], '__init__.py')
            if os.path.isdir(os.path.join(REPO, *parts[:cut]))
            else None
          )
          if path and path.endswith('.py') and os.path.exists(path):
            candidates, name = [path], parts[cut]
            break
        else:
          problems.append(
            f'{span.where()}: `{span.text}`: no module {".".join(parts[:-1])}'
          )
          continue
      elif parts[0] in modules_by_basename():
        candidates, name = modules_by_basename()[parts[0]], parts[1]
      else:
        continue  # another library's name (optax.multi_transform), or not a name
      if os.path.isdir(
        os.path.join(os.path.dirname(candidates[0]), name)
      ) or any(
        os.path.exists(os.path.join(os.path.dirname(c), name + '.py'))
        and c.endswith('__init__.py')
        for c in candidates
      ):
        continue  # a subpackage or submodule
      if not any(name in top_level_names(c) for c in candidates):
        where = ', '.join(os.path.relpath(c, REPO) for c in candidates)
        problems.append(
          f'{span.where()}: `{span.text}`: {where} defines no {name}'
        )
  report(problems)


def test_python_examples_compile_and_use_the_api_as_it_is():
  """```python blocks compile; `rotjax.X` exists; what a loaded model is asked for, it has."""
  from rotjax import api

  with open(api.__file__) as f:
    tree = ast.parse(f.read())
  model_class = next(
    n
    for n in tree.body
    if isinstance(n, ast.ClassDef) and n.name == 'RotjaxModel'
  )
  members = {n.name for n in model_class.body if isinstance(n, ast.FunctionDef)}
  members |= {
    t.attr
    for n in ast.walk(model_class)
    if isinstance(n, ast.Assign)
    for t in n.targets
    if isinstance(t, ast.Attribute)
  }
  problems = []
  for doc in DOCS:
    for lang, start, body in fenced_blocks(doc):
      if lang != 'python':
        continue
      try:
        block = ast.parse('\n'.join(body))
      except SyntaxError as e:
        problems.append(
          f'{doc}:{start + e.lineno - 1}: the Python example does not compile: {e.msg}'
        )
        continue
      models = {
        t.id
        for n in ast.walk(block)
        if isinstance(n, ast.Assign)
        and isinstance(n.value, ast.Call)
        and ast.unparse(n.value.func) == 'rotjax.load'
        for t in n.targets
        if isinstance(t, ast.Name)
      }
      for node in ast.walk(block):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
          line = start + node.lineno - 1
          if node.value.id == 'rotjax' and node.attr not in top_level_names(
            os.path.join(REPO, 'rotjax', '__init__.py')
          ):
            problems.append(f'{doc}:{line}: rotjax.{node.attr} does not exist')
          elif node.value.id in models and node.attr not in members:
            problems.append(
              f'{doc}:{line}: {node.value.id}.{node.attr}: rotjax.load() gives no {node.attr}'
            )
  report(problems)


def test_code_points_only_at_docs_that_exist():
  problems = []
  for path in sorted(
    glob.glob(f'{REPO}/rotjax/**/*.py', recursive=True)
    + glob.glob(f'{REPO}/configs/*.py')
    + glob.glob(f'{REPO}/scripts/*')
  ):
    with open(path) as f:
      for number, line in enumerate(f, 1):
        for name in re.findall(r'\bdocs/[\w-]+\.md', line):
          if not os.path.exists(os.path.join(REPO, name)):
            problems.append(
              f'{os.path.relpath(path, REPO)}:{number}: {name} does not exist'
            )
  report(problems)


@pytest.mark.slow
def test_the_commands_start_for_real():
  """Each rotjax module and script the docs run answers --help (all started at once)."""
  targets = set()
  for doc in DOCS:
    for span in commands(doc):
      for argv in split_commands(span.text):
        if (
          argv[0] in ('python', 'python3')
          and argv[1:2] == ['-m']
          and argv[2:3]
          and argv[2].startswith('rotjax.')
        ):
          targets.add(('-m', argv[2]))
        elif (
          argv[0] in ('python', 'python3')
          and len(argv) > 1
          and argv[1].startswith('scripts/')
        ):
          targets.add((argv[1],))
  assert ('-m', 'rotjax.main') in targets and ('-m', 'rotjax.study') in targets
  env = testing.child_env(JAX_PLATFORMS='cpu')
  running = {
    t: subprocess.Popen(
      [sys.executable, *t, '--help'],
      cwd=REPO,
      env=env,
      text=True,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    for t in sorted(targets)
  }
  problems = []
  for target, process in running.items():
    out, _ = process.communicate(timeout=120)
    # absl's app.run exits 1 after printing its --help; argparse exits 0.
    helped = process.returncode == 0 or (
      process.returncode == 1 and 'Try --helpfull' in out
    )
    if not helped or not out.strip():
      problems.append(
        f'python {" ".join(target)} --help: exit {process.returncode}: {out[-500:]}'
      )
  report(problems)
