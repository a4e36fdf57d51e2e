"""CI's own files: the GitHub workflow passes actionlint, and .ci/ installs as root or via sudo.

The workflow cannot run here, so it is linted (actionlint comes with the test extra); the
install scripts run against stand-in commands (id, sudo, apt-get, dpkg-query) that log
their calls, so no package is installed.
"""

import os
import shutil
import subprocess
import sysconfig

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOW = os.path.join(ROOT, '.github', 'workflows', 'ci.yml')
BASH = shutil.which('bash')


@pytest.fixture(scope='module')
def actionlint():
  # pip puts the binary beside this interpreter, which need not be on PATH.
  found = shutil.which(
    'actionlint',
    path=os.pathsep.join(
      [sysconfig.get_path('scripts'), os.environ.get('PATH', '')]
    ),
  )
  if found:
    return found
  if os.environ.get(
    'CI'
  ):  # CI installed the test extra: a missing linter is a broken install.
    pytest.fail('actionlint not found; pip install -e ".[test]" installs it')
  pytest.skip('actionlint not installed (pip install -e ".[test]")')


def _lint(actionlint, path) -> subprocess.CompletedProcess:
  return subprocess.run(
    [actionlint, '-no-color', path], capture_output=True, text=True, cwd=ROOT
  )


def test_workflow_passes_actionlint(actionlint):
  result = _lint(actionlint, WORKFLOW)
  assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_rejects_a_broken_workflow(actionlint, tmp_path):
  # The same workflow with a misspelled matrix property: proves the lint above can fail.
  text = open(WORKFLOW).read()
  assert '${{ matrix.env_vars }}' in text
  broken = tmp_path / 'ci.yml'
  broken.write_text(
    text.replace('${{ matrix.env_vars }}', '${{ matrix.env_var }}')
  )
  result = _lint(actionlint, str(broken))
  assert (
    result.returncode == 1
    and 'property "env_var" is not defined' in result.stdout
  ), result.stdout


def test_workflow_runs_ci_script_on_each_cpu_path():
  job = yaml.safe_load(open(WORKFLOW))['jobs']['test']
  assert sorted(
    e['env_vars'] for e in job['strategy']['matrix']['include']
  ) == [
    '',
    'ONEDNN_MAX_CPU_ISA=AVX2',
    'ROTJAX_ONEDNN=0',
    'ROTJAX_PARALLEL=pmap',
  ]
  assert [s['run'] for s in job['steps'] if 'run' in s] == [
    'env ${{ matrix.env_vars }} bash .ci/run'
  ]
  setup = next(
    s
    for s in job['steps']
    if s.get('uses', '').startswith('actions/setup-python@')
  )
  assert setup['with']['cache'] == 'pip'


def _stub(bin_dir, name, body):
  path = bin_dir / name
  path.write_text(f'#!{BASH}\n{body}\n')
  path.chmod(0o755)


def _fake_system(tmp_path, *, uid, sudo=True, apt=True, installed=()):
  """A bin folder of stand-ins; the only one on PATH, so no real command can run."""
  bin_dir, log = tmp_path / 'bin', tmp_path / 'calls.log'
  bin_dir.mkdir()
  for tool in ('grep', 'env'):
    os.symlink(shutil.which(tool), bin_dir / tool)
  # Under the sudo stand-in (AS_ROOT set) the user is root.
  _stub(
    bin_dir,
    'id',
    f'[ "$1" = -u ] && if [ -n "$AS_ROOT" ]; then echo 0; else echo {uid}; fi',
  )
  _stub(
    bin_dir,
    'dpkg-query',
    'case " %s " in *" ${@: -1} "*) echo "install ok installed";; esac'
    % ' '.join(installed),
  )
  if apt:
    _stub(
      bin_dir,
      'apt-get',
      f'echo "apt-get $* as $(id -u) DEBIAN_FRONTEND=$DEBIAN_FRONTEND" >> {log}',
    )
  if sudo:  # Runs the command as root, as passwordless sudo does.
    _stub(
      bin_dir,
      'sudo',
      f'echo "sudo $*" >> {log}; [ "$1" = -n ] && shift; AS_ROOT=1 exec "$@"',
    )
  return {'PATH': str(bin_dir)}, log


def _install(env, *packages):
  return subprocess.run(
    [BASH, os.path.join(ROOT, '.ci', 'install-system-packages'), *packages],
    capture_output=True,
    text=True,
    env=env,
  )


def _calls(log):
  return log.read_text().splitlines() if log.exists() else []


def test_install_as_root_calls_apt_directly(tmp_path):
  env, log = _fake_system(tmp_path, uid=0, sudo=False, installed=('curl',))
  result = _install(env, 'libdnnl-dev', 'curl')
  assert result.returncode == 0, result.stderr
  assert _calls(log) == [
    'apt-get update -qq as 0 DEBIAN_FRONTEND=',
    'apt-get install -y -qq libdnnl-dev as 0 DEBIAN_FRONTEND=noninteractive',
  ]


def test_install_as_user_goes_through_sudo(tmp_path):
  env, log = _fake_system(tmp_path, uid=1001)
  result = _install(env, 'libdnnl-dev')
  assert result.returncode == 0, result.stderr
  assert _calls(log) == [
    'sudo -n apt-get update -qq',
    'apt-get update -qq as 0 DEBIAN_FRONTEND=',
    'sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libdnnl-dev',
    'apt-get install -y -qq libdnnl-dev as 0 DEBIAN_FRONTEND=noninteractive',
  ]


def test_install_as_user_without_sudo_fails_and_says_why(tmp_path):
  env, log = _fake_system(tmp_path, uid=1001, sudo=False)
  result = _install(env, 'libdnnl-dev')
  assert result.returncode == 1 and 'not root and no sudo' in result.stderr
  assert _calls(log) == []


def test_install_does_nothing_when_installed_or_without_apt(tmp_path):
  (tmp_path / 'installed').mkdir()
  env, log = _fake_system(
    tmp_path / 'installed', uid=1001, installed=('libdnnl-dev',)
  )
  assert _install(env, 'libdnnl-dev').returncode == 0 and _calls(log) == []
  (tmp_path / 'no_apt').mkdir()
  env, log = _fake_system(tmp_path / 'no_apt', uid=0, apt=False)
  result = _install(env, 'libdnnl-dev')
  assert result.returncode == 0 and 'no apt-get here' in result.stderr


def _ci_run(tmp_path, **env):
  """.ci/run in a copy whose installer and python only report what they were given."""
  ci = tmp_path / 'repo' / '.ci'
  ci.mkdir(parents=True)
  shutil.copy(os.path.join(ROOT, '.ci', 'run'), ci / 'run')
  log, bin_dir = tmp_path / 'calls.log', tmp_path / 'bin'
  bin_dir.mkdir()
  _stub(ci, 'install-system-packages', f'echo "install $*" >> {log}')
  _stub(
    bin_dir,
    'python',
    f'echo "python $* REQUIRE=$ROTJAX_REQUIRE_ONEDNN CI=$CI" >> {log}',
  )
  path = f'{bin_dir}{os.pathsep}{os.path.dirname(shutil.which("dirname"))}'
  result = subprocess.run(
    [BASH, str(ci / 'run')],
    capture_output=True,
    text=True,
    env={'PATH': path, **env},
  )
  assert result.returncode == 0, result.stderr
  return _calls(log)


def test_ci_run_installs_onednn_and_requires_its_tests(tmp_path):
  calls = _ci_run(tmp_path)
  assert calls[0] == 'install libdnnl-dev'
  # The style checks run before the tests.
  assert calls[-3:] == [
    'python -m ruff format --check --quiet . REQUIRE=1 CI=true',
    'python -m ruff check --quiet . REQUIRE=1 CI=true',
    'python -m pytest REQUIRE=1 CI=true',
  ]


def test_ci_run_without_onednn_neither_installs_nor_requires_it(tmp_path):
  calls = _ci_run(tmp_path, ROTJAX_ONEDNN='0', CI='1')
  assert not any(c.startswith('install') for c in calls)
  assert calls[-1] == 'python -m pytest REQUIRE=0 CI=1'


def test_ci_run_keeps_a_given_require_setting(tmp_path):
  assert (
    _ci_run(tmp_path, ROTJAX_REQUIRE_ONEDNN='0')[-1]
    == 'python -m pytest REQUIRE=0 CI=true'
  )
