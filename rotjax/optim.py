"""Optimisers and learning-rate schedules, wrapped so frozen parameters never move."""

import optax

OPTIMIZERS = ('adam', 'sgd')
# '' = the optimizer's own: step for adam (the reports), cosine for sgd.
SCHEDULES = ('', 'step', 'cosine', 'onecycle')
# onecycle: the share of the run spent rising to the peak, and the start and end
# learning rates as fractions of it (optax's defaults: 0.3, 1/25, 1/(25 * 1e4)).
ONECYCLE_RISE = 0.3


def schedule_name(optim_config) -> str:
  """optim.schedule, with '' resolved to the optimizer's own; `optim_config` a ConfigDict
  or a run's config.json dict (runs from before the key have none: their optimizer's own)."""
  name = optim_config.get('schedule', '')
  if name:
    return name
  return 'step' if optim_config.get('name', 'adam') == 'adam' else 'cosine'


def learning_rate_schedule(optim_config, steps_per_epoch: int, num_epochs: int):
  name = schedule_name(optim_config)
  total = max(num_epochs * steps_per_epoch, 1)
  if name == 'step':
    # The reports: lr x decay_factor every decay_every_epochs epochs.
    return optax.exponential_decay(
      optim_config.learning_rate,
      optim_config.decay_every_epochs * steps_per_epoch,
      optim_config.decay_factor,
      staircase=True,
    )
  if name == 'onecycle':
    # Up from lr/25 to lr over the first 30% of the run, then a cosine down to ~0 at its
    # last step: a short run ends annealed, where the step schedule of a run shorter than
    # decay_every_epochs never decays at all.
    return optax.cosine_onecycle_schedule(
      total, optim_config.learning_rate, pct_start=ONECYCLE_RISE
    )
  if name != 'cosine':
    raise ValueError(
      f'optim.schedule={name!r} is unknown; allowed: {SCHEDULES}'
    )
  warmup = optim_config.warmup_epochs * steps_per_epoch
  return optax.warmup_cosine_decay_schedule(
    0.0, optim_config.learning_rate, warmup, max(total, warmup + 1)
  )


def create_optimizer(optim_config, mask, steps_per_epoch: int, num_epochs: int):
  """optax transform: the chosen optimiser on 'trainable' leaves, zero on 'frozen' ones."""
  if optim_config.name not in OPTIMIZERS:
    raise ValueError(
      f'optim.name={optim_config.name!r} is unknown; allowed: {OPTIMIZERS}'
    )
  schedule = learning_rate_schedule(optim_config, steps_per_epoch, num_epochs)
  if optim_config.name == 'adam':
    tx = optax.adam(schedule)
  else:
    tx = optax.chain(
      optax.add_decayed_weights(optim_config.weight_decay),
      optax.sgd(schedule, momentum=optim_config.momentum, nesterov=True),
    )
  # Decay sits inside the 'trainable' branch, so frozen weights cannot shrink either.
  return optax.multi_transform(
    {'trainable': tx, 'frozen': optax.set_to_zero()}, mask
  ), schedule
