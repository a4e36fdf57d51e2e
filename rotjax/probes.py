"""What frozen features of a trained run are worth: a linear probe, a k-NN vote, per-class
predictions (rotations for a pretext run) and a t-SNE embedding. Pure tools on arrays and
RotjaxModels; `python -m rotjax.evaluate` is their command line."""

import numpy as np

PROBE_WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)


def reestimate_bn(model, images, batch_size: int = 128) -> dict:
  """Every BatchNorm of `model` given the running statistics of `images` (its .variables
  replaced; bn_stats), prepared as the features are (eval preprocessing, no augmentation):
  the probe then normalises the task's images with their own statistics, not the pretext's.
  `images`: an array, or chunks of `batch_size` in order (batch_plans.images_of, for a
  split streamed from its files). Full batches of `batch_size` only (one batch of all when
  there are fewer); returns the record."""
  import functools
  import jax
  from rotjax import bn_stats
  from rotjax import data_parallel
  from rotjax import preprocess

  if isinstance(images, np.ndarray):
    images = (
      images[i : i + batch_size] for i in range(0, len(images), batch_size)
    )
  config = model.config

  def prepare(batch, _):
    return preprocess.preprocess(
      batch['image'],
      jax.random.key(0),
      train=False,
      style=config.data.preprocess,
      image_size=config.data.image_size,
    )

  one_device = data_parallel.DataParallel('auto', jax.local_devices()[:1])
  p_moments = one_device.compile(
    functools.partial(
      bn_stats.moments_step, module=model.module, prepare_fn=prepare
    ),
    batch_args=(1,),
  )
  sizes = []

  def batches():
    for i, chunk in enumerate(images):
      # Full batches; a shorter first chunk is the only one (fewer images than a batch).
      if len(chunk) == batch_size or i == 0:
        sizes.append(len(chunk))
        yield {'image': np.asarray(model.prepare_images(chunk))}

  stats, record = bn_stats.reestimate(
    p_moments, model.variables, batches(), lambda _: True, one_device
  )
  model.variables = {**model.variables, 'batch_stats': stats}
  return {**record, 'images': sum(sizes), 'augmentation': 'eval'}


def split_features(
  model, dataset, layer: str, splits=('train', 'val', 'test')
) -> dict:
  """{split: [images, channels] features of `layer`} for a dataset's splits (eval mode)."""
  from rotjax import batch_plans

  return {
    s: np.concatenate(
      [
        model.features(chunk, layer=layer)
        for chunk in batch_plans.images_of(
          getattr(dataset, s), model.batch_size
        )
      ]
    )
    for s in splits
  }


def linear_probe(
  train_x,
  train_y,
  val_x,
  val_y,
  test_x,
  test_y,
  num_classes,
  *,
  steps=500,
  learning_rate=1e-2,
  weight_decays=PROBE_WEIGHT_DECAYS,
  seed=0,
):
  """Multinomial logistic regression on frozen features, full-batch Adam in JAX.

  One probe per weight decay (vmapped); the one best on val is reported on test.
  Features are standardised with the train split's mean and std.
  """
  import jax
  import jax.numpy as jnp
  import optax

  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  norm = lambda x: jnp.asarray((x - mean) / std, jnp.float32)
  train_x, val_x, test_x = norm(train_x), norm(val_x), norm(test_x)
  tx = optax.adam(learning_rate)

  def fit(weight_decay):
    params = {
      'w': jnp.zeros((train_x.shape[1], num_classes)),
      'b': jnp.zeros(num_classes),
    }

    def loss_fn(params):
      logits = train_x @ params['w'] + params['b']
      ce = optax.softmax_cross_entropy_with_integer_labels(
        logits, train_y
      ).mean()
      return ce + weight_decay * jnp.sum(params['w'] ** 2)

    def step(carry, _):
      params, opt_state = carry
      grads = jax.grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(
      step, (params, tx.init(params)), None, length=steps
    )
    acc = lambda x, y: jnp.mean(
      jnp.argmax(x @ params['w'] + params['b'], -1) == y
    )
    return acc(train_x, train_y), acc(val_x, val_y), acc(test_x, test_y)

  wds = jnp.asarray(weight_decays, jnp.float32)
  train_acc, val_acc, test_acc = jax.device_get(jax.jit(jax.vmap(fit))(wds))
  best = int(np.argmax(val_acc))  # first of the ties: the least regularised
  return {
    'train_accuracy': float(train_acc[best]),
    'val_accuracy': float(val_acc[best]),
    'test_accuracy': float(test_acc[best]),
    'weight_decay': float(weight_decays[best]),
    'val_accuracy_per_weight_decay': dict(
      zip(map(str, weight_decays), val_acc.tolist())
    ),
  }


def knn_accuracy(
  train_x, train_y, query_x, query_y, num_classes, k=20, chunk=1024
):
  """Accuracy of a k-nearest-neighbour vote by cosine similarity (ties: summed similarity)."""
  import jax
  import jax.numpy as jnp

  k = min(k, len(train_x))
  unit = lambda x: x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)
  bank = jnp.asarray(unit(train_x), jnp.float32)
  bank_y = jnp.asarray(train_y)

  @jax.jit
  def predict(q):
    sims, idx = jax.lax.top_k(q @ bank.T, k)
    votes = jax.nn.one_hot(bank_y[idx], num_classes).sum(1)
    votes += 1e-3 * (
      jax.nn.one_hot(bank_y[idx], num_classes) * sims[..., None]
    ).sum(1)
    return jnp.argmax(votes, -1)

  query = unit(query_x).astype(np.float32)
  preds = np.concatenate(
    [
      np.asarray(predict(query[i : i + chunk]))
      for i in range(0, len(query), chunk)
    ]
  )
  return float(np.mean(preds == query_y))


def split_predictions(model, split):
  """predictions over a split in memory or streamed from its files, a chunk at a time."""
  from rotjax import batch_plans

  parts, start = [], 0
  for chunk in batch_plans.images_of(split, model.batch_size):
    parts.append(predictions(model, chunk, first_index=start))
    start += len(chunk)
  pred = np.concatenate([p for p, _ in parts])
  return pred, None if parts[0][1] is None else np.concatenate(
    [t for _, t in parts]
  )


def predictions(model, images, first_index: int = 0):
  """(predicted, true) labels for a split's images (from its `first_index`-th on): classes,
  or rotations for a pretext run."""
  if model.config.stage != 'pretext':
    return model.predict(images).argmax(-1), None
  import jax
  from rotjax import steps

  prepare = steps.make_prepare_fn(model.config, train=False)

  @jax.jit
  def rotated(variables, batch, index):
    # The loop's eval pipeline and keys (index: each image's place in the split): the
    # very images its val/test accuracy scored.
    x, labels, _ = prepare(
      {'image': batch, 'index': index}, steps.eval_key(model.config.seed)
    )
    logits, _ = model.module.apply(variables, x, train=False)
    return logits.argmax(-1), labels

  outs = [
    jax.device_get(
      rotated(
        model.variables,
        images[i : i + 128],
        np.arange(
          first_index + i,
          first_index + min(i + 128, len(images)),
          dtype=np.int32,
        ),
      )
    )
    for i in range(0, len(images), 128)
  ]
  return np.concatenate([o[0] for o in outs]), np.concatenate(
    [o[1] for o in outs]
  )


def confusion_matrix(true, pred, num_classes) -> np.ndarray:
  """counts[true, predicted]."""
  counts = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(counts, (true, pred), 1)
  return counts


def tsne_embed(features, seed=0, perplexity=30.0):
  """2-D t-SNE of features (PCA to 50 dimensions first, as is usual)."""
  from sklearn.decomposition import PCA
  from sklearn.manifold import TSNE

  x = (features - features.mean(0)) / (features.std(0) + 1e-6)
  if x.shape[1] > 50 and len(x) > 50:
    x = PCA(50, random_state=seed).fit_transform(x)
  perplexity = min(perplexity, (len(x) - 1) / 3)
  return TSNE(
    2, perplexity=perplexity, init='pca', random_state=seed
  ).fit_transform(x)
