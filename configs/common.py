"""Shared defaults for every stage; each stage's file starts from `get_config()`."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.stage = 'supervised'  # pretext | finetune | supervised
  config.workdir = ''  # where checkpoints and metrics.jsonl go (required)
  config.seed = 0  # model init, augmentation and data order
  config.init_from = (
    ''  # another run's workdir: load its backbone ('' = random init)
  )
  config.head = ('fc',)  # re-initialised when init_from's shape differs
  config.trainable = ('all',)  # subtree names trained; everything else frozen
  # BatchNorm in frozen subtrees, in training: 'batch' (the reports' PyTorch, frozen layers in
  # .train() mode) normalises with batch statistics and updates the running ones, gamma/beta
  # fixed; 'running' normalises with the running statistics and leaves them as they are;
  # 'reestimated' is 'running' with those statistics first re-estimated on this run's training
  # images (one no-gradient pass before the first step: rotjax/bn_stats.py).
  config.freeze_bn = 'batch'

  config.model = ml_collections.ConfigDict()
  config.model.name = 'resnet18'  # resnet18 | resnet34 | resnet50
  config.model.stem = 'cifar'  # cifar (3x3/1) | imagenet (7x7/2 + max-pool)
  config.model.width = 64  # channels of layer1; 16 makes a fast CPU model
  config.model.dtype = (
    'auto'  # compute: auto (= bfloat16, params stay fp32) | float32 | bfloat16
  )
  config.model.conv = (
    'auto'  # auto (= oneDNN on CPU where it builds, else XLA) | xla | onednn
  )
  config.model.norm = 'auto'  # training BatchNorm(+ReLU): auto (= oneDNN where the convolutions are) | xla | onednn
  config.model.sync_bn = True  # BatchNorm statistics over the global batch

  config.data = ml_collections.ConfigDict()
  config.data.dataset = 'cifar10'  # cifar10 | imagenette
  config.data.source = (
    'tfds:cifar10'  # tfds:NAME | folder:PATH (PATH/SPLIT/CLASS/IMAGE)
  )
  config.data.data_dir = ''  # tfds sources: tfds's data_dir ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets)
  config.data.train_split = 'train'
  config.data.test_split = 'test'  # folder split / tfds split reported as test
  config.data.val_fraction = (
    0.1  # carved from train, seeded; used for model selection
  )
  config.data.split_seed = 0  # fixes the val split and label subset across runs
  config.data.samples_per_class = (
    0  # balanced labelled subset of train (0 = all)
  )
  config.data.max_train_images = (
    0  # cap on train images, for quick CPU runs (0 = all)
  )
  config.data.max_eval_images = 0  # cap on val and test images (0 = all)
  config.data.image_size = 32
  config.data.preprocess = (
    'cifar'  # cifar (pad-crop, flip) | imagenet (resized crop, flip)
  )
  config.data.cache_dir = (
    '~/.cache/rotjax'  # decoded folder datasets are cached here
  )
  # memory: decode each split once into RAM; stream: decode each batch from its files in
  # worker processes (datasets larger than memory); auto: memory where the decoded images
  # take at most half the memory available, else stream (input_pipeline.choose_loader).
  # Both give the same batches.
  config.data.loader = 'auto'
  config.data.workers = 0  # decoding processes (0 = one per core)
  config.data.skip_bad_files = (
    False  # skip unreadable images with a warning (else error)
  )
  # Training data shards; the batch order depends on their number. 0: one per
  # process. On one host, set it to a multi-host run's process count to replay
  # that run's batches exactly.
  config.data.num_shards = 0

  config.rotation = ml_collections.ConfigDict()
  config.rotation.num_rotations = 4  # 4 | 6 | 8 directions, k * 360 / N degrees
  config.rotation.mode = (
    'all'  # all: N copies of each image (RotNet) | random: one each
  )
  # disc: every N (4 too) turned by the same bilinear resampling and cut to the same disc,
  # pretext augmented by flips only (CIFAR) or square crops (ImageNet), so no trace of the
  # pipeline turns with the image and N = 4, 6, 8 see the same pixels. square: N = 4 only,
  # exact rot90 of the whole pad-cropped square (RotNet, the reports).
  config.rotation.geometry = 'disc'

  config.optim = ml_collections.ConfigDict()
  config.optim.name = 'adam'  # adam (the reports) | sgd (momentum, cosine)
  config.optim.learning_rate = 1e-3
  # '' = the optimizer's own (adam: step, the reports; sgd: cosine) | step | cosine |
  # onecycle (up to learning_rate over 30% of the run, cosine down to ~0: rotjax/optim.py)
  config.optim.schedule = ''
  config.optim.decay_every_epochs = (
    10  # adam: lr x decay_factor every this many epochs
  )
  config.optim.decay_factor = 0.1
  config.optim.momentum = 0.9  # sgd
  config.optim.weight_decay = 5e-4  # sgd
  config.optim.warmup_epochs = 0  # sgd: linear warm-up before the cosine

  # Multi-host: one process per host, all launched with the same config. Set
  # coordinator_address (+ num_processes, process_id per process), or auto=True
  # where a cluster launcher (SLURM, Open MPI, Kubernetes, Cloud TPU) tells JAX.
  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator_address = (
    ''  # 'host0:1234' ('' and auto=False: one process)
  )
  config.distributed.num_processes = 0
  config.distributed.process_id = -1
  config.distributed.auto = (
    False  # jax.distributed.initialize() with auto-detection
  )
  config.distributed.cpu_collectives = (
    'gloo'  # CPU-only clusters: cross-process collectives
  )

  config.batch_size = 128  # global, split over all devices
  config.num_devices = 0  # local devices to use (0 = all)
  # Data parallel (rotjax/data_parallel.py): 'auto' (= 'jit': one program over a device
  # mesh, JAX's way) or 'pmap' (the earlier way, kept as a mode; same numbers).
  config.parallel = 'auto'
  config.eval_batch_size = 256
  config.num_epochs = 30
  config.label_smoothing = 0.1
  config.log_every_steps = 20  # progress bar refresh (a host sync)
  config.keep_checkpoints = 3
  # Also checkpoint every this many steps inside an epoch (0: at epoch ends only): a run
  # killed mid-epoch resumes there, with the same batches and metrics as an unbroken one.
  config.checkpoint_every_steps = 0
  config.progress = True
  # Compiled programs kept between processes (rotjax/compile_cache.py): 'auto'
  # (~/.cache/rotjax/jit), a folder, or '' to turn it off; ROTJAX_COMPILE_CACHE wins.
  config.compile_cache = 'auto'
  return config


def make_smoke(config: ml_collections.ConfigDict) -> None:
  """Shrinks a config to seconds on a CPU: narrow model, few tiny batches."""
  config.model.width = 8
  config.batch_size = 16
  config.eval_batch_size = 32
  config.num_epochs = 2
  config.data.max_train_images = 64
  config.data.max_eval_images = 32
  config.data.val_fraction = 0.2
  config.log_every_steps = 2
  config.keep_checkpoints = 2
  config.progress = False


def make_cpu(config: ml_collections.ConfigDict) -> None:
  """A run that shows the effect in minutes on 2 CPU cores: ResNet18 at width 16, 5k images."""
  config.model.width = 16
  config.batch_size = 128
  config.num_epochs = 3
  config.data.max_train_images = 5_000
  config.data.max_eval_images = 1_000
  config.log_every_steps = 5
