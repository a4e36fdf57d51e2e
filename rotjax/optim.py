"""Optimisers and learning-rate schedules, wrapped so frozen parameters never move."""

import optax

OPTIMIZERS = ('adam', 'sgd')


def learning_rate_schedule(optim_config, steps_per_epoch: int, num_epochs: int):
  if optim_config.name == 'adam':
    # The reports: lr x decay_factor every decay_every_epochs epochs.
    return optax.exponential_decay(
      optim_config.learning_rate,
      optim_config.decay_every_epochs * steps_per_epoch,
      optim_config.decay_factor,
      staircase=True,
    )
  warmup = optim_config.warmup_epochs * steps_per_epoch
  return optax.warmup_cosine_decay_schedule(
    0.0,
    optim_config.learning_rate,
    warmup,
    max(num_epochs * steps_per_epoch, warmup + 1),
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
