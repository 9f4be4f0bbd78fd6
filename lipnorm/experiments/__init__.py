"""Paper experiments E1-E4 (docs/theory.md#experiments): importable `run_*(config)` functions, each
writing figures and markdown to `config.out_dir`, and the CLI
`python -m lipnorm.experiments <sweep|dynamics|compare|regime> [--preset P] [key=value ...]`.
"""
from lipnorm.experiments import compare, correlate, dynamics, presets, regime, sweep
from lipnorm.experiments.registry import (EXPERIMENTS, Experiment, get_config, get_experiment,
                                          register)


# ------------------------------------------------------------------------------ dynamics
def _dynamics(train_cfg, out_dir, **kw):
  def make():
    c = dynamics.default_config()
    c.train_enabled, c.train, c.out_dir = True, train_cfg(), out_dir
    for k, v in kw.items():
      c[k] = v
    return c
  return make


register(Experiment(
    "dynamics", "E2: the paper's Figures 1-3 (weight norms, variances over training) from a "
    "training workdir's JSONL, or after training one", dynamics.default_config,
    dynamics.run_dynamics, {
        "tiny": _dynamics(lambda: presets.tiny_train(8), "runs/dynamics_tiny"),
        "cpu": _dynamics(lambda: presets.cifar_relu10(2000, "none"), "runs/dynamics_relu10"),
        "cpu_bn": _dynamics(lambda: presets.cifar_relu10(2000, "batch"),
                            "runs/dynamics_relu10_bn"),
        "cpu_cnn": _dynamics(lambda: presets.cifar_cnn(2000, "batch"), "runs/dynamics_cnn_bn"),
        "cpu_resnet18_w16": _dynamics(lambda: presets.cifar_resnet18_narrow(300),
                                      "runs/dynamics_resnet18_w16"),
        "gpu_resnet18": _dynamics(lambda: presets.gpu("resnet18_cifar10", 30, "batch"),
                                  "runs/dynamics_resnet18"),
        "gpu_efficientnet_b3": _dynamics(
            lambda: presets.gpu("efficientnet_b3_cifar10", 30, "batch"),
            "runs/dynamics_efficientnet_b3"),
    }))


# --------------------------------------------------------------------------------- sweep
def _sweep_tiny():
  c = sweep.default_config()
  c.out_dir = "runs/sweep_tiny"
  c.model.width = 16
  c.depths, c.k_depth, c.ks = (2, 3), 3, (0, 1, 2)
  c.num_examples, c.train_steps = 8, 4
  c.train = presets.tiny_train(4)
  c.train.probes.enabled = False
  return c


def _sweep_cpu():
  c = sweep.default_config()
  c.out_dir = "runs/sweep_cpu"
  c.model.width = 128
  c.depths, c.k_depth, c.ks = (2, 4, 6, 8, 10), 10, (0, 1, 3, 5, 7, 9)
  c.num_examples, c.train_steps = 64, 200
  c.train = presets.cifar_relu10(200)
  c.train.probes.enabled = False
  return c


def _sweep_gpu():
  c = _sweep_cpu()
  c.out_dir = "runs/sweep_gpu"
  c.model.width = 1024
  c.depths, c.k_depth, c.ks = (2, 4, 8, 16, 24, 32), 16, (0, 1, 2, 4, 8, 12, 15)
  c.num_examples, c.train_steps = 256, 2000
  c.train = presets.cifar_relu10(2000)
  c.train.probes.enabled = False
  return c


register(Experiment("sweep", "E1: Lip_x (local, bound) vs depth L and vs normalizer count k",
                    sweep.default_config, sweep.run_sweep,
                    {"tiny": _sweep_tiny, "cpu": _sweep_cpu, "gpu": _sweep_gpu}))


# ------------------------------------------------------------------------------- compare
def _tiny_compare_train():
  c = presets.tiny_train(6)
  c.probes.lipschitz = False   # layer probes feed E2/E4; E3 measures the final nets itself
  c.eval_every_steps = 3       # two evaluations: the plateau check has a change to report
  return c


def _compare(train_cfg, out_dir, norms, groups, **kw):
  def make():
    c = compare.default_config()
    c.train, c.out_dir, c.norms = train_cfg(), out_dir, norms
    c.norm_options.group.num_groups = groups
    for k, v in kw.items():
      c[k] = v
    return c
  return make


DENSE_NORMS = ("none", "batch", "layer", "group", "rms")   # instance: 1 value per group
CONV_NORMS = ("none", "batch", "layer", "group", "instance", "rms")
register(Experiment(
    "compare", "E3: one architecture trained with each normalizer: accuracy, gap, "
    "Lipschitz constants, bound, Hessian", compare.default_config, compare.run_compare, {
        "tiny": _compare(_tiny_compare_train, "runs/compare_tiny", DENSE_NORMS, 4,
                         num_examples=4, num_eval=200, hessian_examples=16),
        "cpu": _compare(lambda: presets.cifar_relu10(1000), "runs/compare_relu10",
                        DENSE_NORMS, 32),
        "cpu_cnn": _compare(lambda: presets.cifar_cnn(1000), "runs/compare_cnn", CONV_NORMS, 8),
        # the ResNet-18 architecture at width 16 (all 20 BN slots) with none / BN / GN
        "cpu_resnet18_w16": _compare(lambda: presets.cifar_resnet18_narrow(300, 16, "none"),
                                     "runs/compare_resnet18_w16", ("none", "batch", "group"),
                                     8),
        "gpu_resnet18": _compare(lambda: presets.gpu("resnet18_cifar10", 30, "none"),
                                 "runs/compare_resnet18", CONV_NORMS, 32, num_examples=128),
        "gpu_efficientnet_b3": _compare(
            lambda: presets.gpu("efficientnet_b3_cifar10", 30, "none"),
            "runs/compare_efficientnet_b3", CONV_NORMS, 8, num_examples=128),
    }))


# -------------------------------------------------------------------------------- regime
def _regime(compare_preset, out_dir, depths, width):
  def make():
    c = regime.default_config()
    c.out_dir = out_dir
    c.compare = get_config("compare", compare_preset)
    c.compare.out_dir = out_dir + "/compare"
    c.construction.depths, c.construction.width = depths, width
    if compare_preset == "tiny":
      c.construction.in_dim, c.construction.num_examples = 8, 4
    return c
  return make


register(Experiment(
    "regime", "E4: how often normalizers amplify (sigma < |gamma|) and an explicit "
    "amplifying BN construction", regime.default_config, regime.run_regime, {
        "tiny": _regime("tiny", "runs/regime_tiny", (2, 3, 4), 8),
        "cpu": _regime("cpu", "runs/regime_cpu", (2, 4, 8, 16, 32), 128),
        "gpu": _regime("gpu_resnet18", "runs/regime_gpu", (2, 4, 8, 16, 32, 64), 512),
    }))


# ----------------------------------------------------------------------------- correlate
def _correlate_tiny():
  """A few relu_nets on the bundled digits: runs in well under a minute."""
  c = correlate.default_config()
  c.out_dir = "runs/correlate_tiny"
  c.train.data.batch_size = 64
  c.train.log_every_steps = 10
  c.base.update(depth=2, width=16, lr=0.05, batch=64)
  c.blocks = ({"norm": ("none", "batch"), "depth": (2, 3)},)
  c.target_loss, c.max_steps, c.chunk_steps = 0.05, 40, 20
  c.num_examples, c.hessian_examples = 4, 16
  return c


def _correlate_cifar():
  """E5 on the first 10,000 CIFAR-10 training images, 42 nets (relu_net and cnn), to
  train cross-entropy 0.05 or 4000 steps (about 51 epochs at batch 128)."""
  c = correlate.default_config()
  c.out_dir = "runs/correlate_cifar"
  c.train.data.source = "cifar10"
  c.train.data.num_train = 10000
  c.train.data.augment = False
  c.train.data.eval_batch_size = 500
  c.train.log_every_steps = 50
  c.target_loss, c.max_steps, c.chunk_steps = 0.05, 4000, 500
  c.base.update(model="relu_net", depth=6, width=256, norm="none", k="all", lr=0.01,
                wd=5e-4, batch=128)
  c.blocks = (
      # architecture x normalizer
      {"depth": (4, 8), "width": (256, 512), "norm": ("none", "batch", "layer")},
      # optimization x normalizer
      {"depth": 8, "lr": (0.01, 0.05), "wd": (0.0, 5e-4), "batch": (64, 256),
       "norm": ("none", "batch")},
      # number of BN layers at depth 8
      {"depth": 8, "norm": "batch", "k": (1, 2, 3, 5)},
      # the CNN with each normalizer at two learning rates
      {"model": "cnn", "depth": 2, "width": 16,
       "norm": ("none", "batch", "layer", "group", "rms"), "lr": (0.01, 0.05)},
  )
  return c


def _correlate_cpu_small():
  """E5 at the size of a busy 2-core CPU: 42 small relu_nets and 5 cnns on the first
  2,000 CIFAR-10 training images, each trained to train cross-entropy 0.05 or 600 steps
  (about 38 epochs at batch 128; a cnn: 3000 steps, 190 epochs, since at 600 none
  of them fitted), so that the nets overfit and the gap is real. About 20-40 s per
  relu_net and up to 20 minutes per cnn on one busy core."""
  c = _correlate_cifar()
  c.out_dir = "runs/correlate_cpu_small"
  c.train.data.num_train = 2000
  c.train.log_every_steps = 50
  c.target_loss, c.max_steps, c.chunk_steps = 0.05, 600, 300
  c.max_steps_per_model = {"cnn": 3000}
  c.num_examples, c.hessian_examples = 32, 256
  c.base.update(model="relu_net", depth=3, width=128, norm="none", k="all", lr=0.02,
                wd=5e-4, batch=128)
  c.blocks = (
      # architecture x normalizer
      {"depth": (2, 4), "width": (64, 256), "norm": ("none", "batch", "layer")},
      # optimization x normalizer
      {"lr": (0.01, 0.05), "wd": (0.0, 5e-4), "batch": (64, 256), "norm": ("none", "batch")},
      # number of BN layers at depth 4
      {"depth": 4, "norm": "batch", "k": (1, 2)},
      # the other normalizers at two widths
      {"norm": ("group", "rms"), "width": (64, 256)},
      # every normalizer at two learning rates
      {"norm": ("none", "batch", "layer", "rms"), "lr": (0.01, 0.05)},
      # the CNN (widths 16/32/64, 2 convs per stage) with each normalizer, at the
      # learning rate that fits 2,000 images fastest of the grid's
      {"model": "cnn", "depth": 2, "width": 16,
       "norm": ("none", "batch", "layer", "group", "rms"), "lr": 0.05},
  )
  return c


register(Experiment(
    "correlate", "E5: does capacity predict generalization? Kendall tau (and Jiang et "
    "al.'s granulated tau) of capacity measures vs the generalization gap over a grid "
    "of trained nets", correlate.default_config, correlate.run_correlate,
    {"tiny": _correlate_tiny, "cifar": _correlate_cifar,
     "cpu_small": _correlate_cpu_small}))

__all__ = ["EXPERIMENTS", "Experiment", "get_config", "get_experiment", "register"]
