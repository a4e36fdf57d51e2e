"""A run's folder: an old run's config.json read back with every setting in it."""

from configs import common
from rotjax import rundir


def test_an_old_config_gets_what_its_run_ran_with_and_todays_defaults(tmp_path):
  old = common.get_config().to_dict()
  old['model']['width'] = 16
  old['rotation']['num_rotations'] = 4
  for parent, key in (
    (old, 'freeze_bn'),
    (old['model'], 'norm'),
    (old['rotation'], 'geometry'),
    (old, 'checkpoint_every_steps'),
    (old['data'], 'loader'),
  ):
    del parent[key]
  rundir.write(tmp_path, rundir.CONFIG, old)
  config = rundir.read_config(tmp_path)
  # Settings added since: the value that release ran with, else today's default.
  assert (config.freeze_bn, config.model.norm, config.rotation.geometry) == (
    'running',
    'auto',
    'square',
  )
  assert (config.checkpoint_every_steps, config.data.loader) == (0, 'auto')
  assert config.model.width == 16  # what the file says stays
  old['rotation']['num_rotations'] = (
    8  # N = 6 and 8 only ever turned on the disc
  )
  rundir.write(tmp_path, rundir.CONFIG, old)
  assert rundir.read_config(tmp_path).rotation.geometry == 'disc'
  assert rundir.read_config(tmp_path / 'elsewhere') is None
