"""Shared defaults: the paper's CIFAR-10 setting (Table I/II), LPLgrad with the loss head.

Per data set files import this and override what differs. Budgets follow the
paper's B (initial set and per-round query size), R (subset scored per round)
and A (final labeled set): num_rounds = (A - B) / B + 1.
"""

import ml_collections

BUDGETS = ("high", "low")


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.strategy = "lplgrad"
  # simulated: the pool's labels are known and revealed when queried.
  # human: a person labels each query (data.source="image_folder" with
  # labeled/<class>/, unlabeled/ and optionally test/<class>/; see docs/labeling.md).
  config.oracle = "simulated"

  config.data = ml_collections.ConfigDict()
  config.data.source = "tfds"  # tfds | image_folder | digits | npz
  config.data.name = "cifar10"  # TFDS name (tfds), display name otherwise
  config.data.root = ""  # image folder / .npz path
  config.data.data_dir = ""  # TFDS data_dir ("" = TFDS default)
  config.data.manual_dir = ""  # TFDS manual_dir for pre-downloaded archives
  config.data.download = True  # TFDS fetches a missing data set (False: air-gapped)
  config.data.train_split = "train"
  config.data.test_split = "test"
  config.data.image_size = 32
  config.data.class_names = ()  # npz only: names for labels 0..C-1
  # Multi-host: each process loads only its devices' rows of the pool, which stays split
  # by rows over the devices (batches are gathered with one all-reduce of their rows; the
  # query reads each process's own rows for its devices). With stream: each process maps
  # its own rows, and the devices cache the labeled images.
  config.data.shard_pool = False
  # Stream: the pool stays where it is (the npy route: on disk, memory-mapped); the devices
  # hold the labeled images alone (at most the final labeled set), and the query and the
  # evaluation read their images a chunk at a time. Selections and training are unchanged.
  config.data.stream = False
  # fixed: data.mean / data.std, the CIFAR-10 constants of the authors' code | pool: the
  # pool's per-channel statistics (image folders, digits, data sets without such constants) |
  # auto: with model.pretrained, the statistics the weights were trained with (ImageNet's
  # for torchvision's ResNets, 0.5 and 0.5 for timm's ViTs); otherwise fixed.
  config.data.normalization = "auto"
  config.data.mean = (0.4914, 0.4822, 0.4465)
  config.data.std = (0.2023, 0.1994, 0.2010)

  config.model = ml_collections.ConfigDict()
  config.model.name = "resnet18"
  config.model.width = 64
  config.model.depth = 6  # vit: transformer blocks
  config.model.heads = 4  # vit: attention heads (width must be a multiple)
  config.model.stem = "cifar"  # cifar (3x3, no pool) | imagenet (7x7/2 + pool)
  config.model.loss_head_width = 128
  # pytorch: PyTorch's default init of every conv and linear layer (the authors' code) |
  # he: He-normal fan_out convolutions, lecun_normal / zero-bias dense layers.
  config.model.init = "pytorch"
  # unbiased: running variance updated with n/(n-1) times the batch variance (PyTorch) |
  # biased: with the batch variance itself (Flax).
  config.model.bn_running_var = "unbiased"
  # A weights file (.safetensors, .npz; .pth with PyTorch) of torchvision's resnet18/34/50
  # (with stem="imagenet", width 64) or timm's ViTs (name vit_s16 / vit_b16) to start from;
  # see docs/pretrained.md. "": random initialisation.
  config.model.pretrained = ""
  # finetune: every layer trains on the images | linear: the pretrained backbone is frozen,
  # its features computed once per run; a linear head and the loss head train on them
  # (no augmentation).
  config.model.train_mode = "finetune"

  config.train = ml_collections.ConfigDict()
  config.train.epochs = 200
  config.train.batch_size = 128
  config.train.eval_batch_size = 500
  config.train.learning_rate = 0.1
  # The main model's layers other than its classifier head, e.g. a pretrained backbone
  # fine-tuned more gently than its new head; None: learning_rate.
  config.train.backbone_learning_rate = ml_collections.config_dict.placeholder(float)
  config.train.lr_milestones = (160,)
  config.train.lr_decay = 0.1
  # constant: the loss-prediction module keeps learning_rate (the authors' code never steps
  # its scheduler) | decay: it follows the main model's step decay.
  config.train.aux_lr_schedule = "constant"
  config.train.momentum = 0.9
  config.train.weight_decay = 5e-4
  # Train the loss-prediction module jointly: None = the strategy's default
  # (lplgrad, learning_loss: yes; the other baselines: no).
  config.train.use_aux = ml_collections.config_dict.placeholder(bool)
  config.train.aux_weight = 1.0
  config.train.margin = 1.0
  config.train.detach_features_epoch = 120
  # after: the ranking loss stops reaching the main model when epoch > detach_features_epoch
  # (0-based, the authors' `epoch > epoch_loss`) | from: when epoch >= detach_features_epoch.
  config.train.detach_rule = "after"
  config.train.augment = "crop_flip"  # crop_flip | crop | flip | none
  config.train.crop_padding = 4
  # False: warm start, as the authors' code | True: a fresh model each round (from
  # model.pretrained where set) | None: True with pretrained weights, else False.
  config.train.reinit_each_round = ml_collections.config_dict.placeholder(bool)
  config.train.compute_dtype = "float32"  # float32 | bfloat16 (float32 weights and statistics)
  config.train.epoch_loop = "host"  # host (a loop of async steps) | scan (one call per epoch)

  config.al = ml_collections.ConfigDict()
  config.al.initial_size = 1000
  config.al.query_size = 1000
  config.al.subset_size = 25000
  config.al.num_rounds = 10

  config.query = ml_collections.ConfigDict()
  config.query.reduction = "layer_sum"  # layer_sum (authors' code) | frobenius (paper eq. 8)
  config.query.method = "fast"  # fast (per-layer, one backward) | vmap (reference)
  config.query.chunk_size = 64
  config.query.compute_dtype = "float32"  # gradient-norm scoring: float32 | bfloat16

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_epochs = 10  # also at the end of every round and on SIGTERM/SIGINT
  config.checkpoint.keep = 2  # newest checkpoints kept (the older one is a fallback);
  # 0 keeps every checkpoint

  # Multi-host runs (one process per host, the same command on each; see docs/devices.md).
  config.distributed = ml_collections.ConfigDict()
  config.distributed.initialize = False  # call jax.distributed.initialize first
  config.distributed.coordinator_address = ""  # host:port of process 0 ("": from the cluster)
  config.distributed.num_processes = 0  # 0: from the cluster (SLURM, Open MPI, TPU)
  config.distributed.process_id = -1  # -1: from the cluster
  config.distributed.cpu_collectives = "gloo"  # how CPU devices of different hosts talk
  config.distributed.initialization_timeout_seconds = 300
  config.distributed.heartbeat_timeout_seconds = 100  # a host silent this long fails the run
  config.distributed.shutdown_timeout_seconds = 300

  config.log = ml_collections.ConfigDict()
  config.log.progress = True
  config.log.tensorboard = True
  config.log.checkpoints = True  # print a line per periodic checkpoint
  return config


def set_budget(config, budget: str, *, high: tuple, low: tuple) -> ml_collections.ConfigDict:
  """Sets (B, R, A) from the paper's high- or low-budget row."""
  if budget not in BUDGETS:
    raise ValueError(f"unknown budget {budget!r}: expected one of {', '.join(BUDGETS)}")
  initial, subset, final = high if budget == "high" else low
  config.al.initial_size = initial
  config.al.query_size = initial
  config.al.subset_size = subset
  config.al.num_rounds = (final - initial) // initial + 1
  return config
