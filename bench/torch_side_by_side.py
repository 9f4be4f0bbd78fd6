"""lipnorm vs PyTorch (CPU): one SGD-momentum train step of the same architecture, batch
and optimizer, timed in one run, per model. Prints lipnorm/PyTorch step-time ratios
(below 1.0: lipnorm is faster) and lipnorm's compile time, for each `conv_impl`.

  pip install -r bench/requirements.txt        # PyTorch CPU: optional, for this script only
  python bench/torch_side_by_side.py                                   # all four models
  python bench/torch_side_by_side.py --models=resnet18 --steps=2 --conv_impls=xla,matmul

Models (CIFAR shape 32x32x3, 10 classes, cross-entropy, SGD momentum 0.9, weight decay
5e-4 on every parameter in both frameworks):
  relu_net        relu_net-10, width 512, no normalizer (configs/relu10_cifar10.py)
  cnn             the default CNN (widths 16, 32, 64; 2 convs per stage; avg-pool), BN
  resnet18        CIFAR ResNet-18 (3x3 stem), BN
  efficientnet_b0 EfficientNet-B0 with stem stride 1 (32x32 inputs), BN, swish, SE,
                  dropout and stochastic depth as in lipnorm (PyTorch pads its
                  depthwise convs symmetrically, k // 2, instead of TF "SAME": same shapes
                  and cost)
lipnorm runs its own jitted train step (lipnorm.training.steps, one device); PyTorch its
eager `model.train()` loop with one intra-op thread per host core. Step time is the median of
`--steps` steps after `--warmup` untimed ones; each is synchronized. On a shared machine
absolute times drift; compare the ratios, which come from adjacent measurements.
"""
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "1")

from absl import app, flags  # noqa: E402

MODELS = ("relu_net", "cnn", "resnet18", "efficientnet_b0")
CONV_MODELS = ("cnn", "resnet18", "efficientnet_b0")
_MODELS = flags.DEFINE_list("models", list(MODELS), f"Models to time, of {MODELS}.")
_CONV_IMPLS = flags.DEFINE_list("conv_impls", ["xla", "matmul"],
                                "lipnorm conv implementations to time for conv models.")
_BATCH = flags.DEFINE_integer("batch", 128, "Batch size.")
_STEPS = flags.DEFINE_integer("steps", 0, "Timed steps per setting (0: 20 for relu_net, "
                              "5 for cnn, 2 for resnet18 and efficientnet_b0).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps after the first (compiling) one.")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "PyTorch intra-op threads (0: "
                                      "every host core, as XLA's CPU thread pool uses).")
DEFAULT_STEPS = {"relu_net": 20, "cnn": 5, "resnet18": 2, "efficientnet_b0": 2}
IMAGE = (32, 32, 3)
NUM_CLASSES = 10
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
LIPNORM_KWARGS = {
    "relu_net": dict(depth=10, width=512, norm="none"),
    "cnn": dict(norm="batch"),
    "resnet18": dict(norm="batch"),
    "efficientnet_b0": dict(norm="batch", stem_stride=1),
}


def timed_steps(step, steps: int, warmup: int) -> tuple[float, float]:
  """(first call s, median s of `steps` calls after `warmup` more); `step()` blocks."""
  t = time.perf_counter()
  step()
  first = time.perf_counter() - t
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  return first, statistics.median(times)


# ------------------------------------------------------------------------------ lipnorm
def lipnorm_step(name: str, conv_impl, batch_size: int):
  """(a zero-argument function running one lipnorm train step (blocking), the number of
  trainable parameters)."""
  import jax
  import numpy as np
  from lipnorm.training import base_config, build_model, create_train_state, make_optimizer
  from lipnorm.training.distributed import replicate
  from lipnorm.training.steps import make_steps

  config = base_config()
  config.model.name = name
  for k, v in LIPNORM_KWARGS[name].items():
    config.model[k] = v
  if conv_impl is not None:
    config.model.conv_impl = conv_impl
  config.schedule.name = "constant"
  config.optimizer.learning_rate, config.optimizer.momentum = LR, MOMENTUM
  config.optimizer.weight_decay = WEIGHT_DECAY
  devices = jax.local_devices()[:1]
  model = build_model(config, NUM_CLASSES)
  tx = make_optimizer(config, 1000)
  state = [replicate(jax.device_get(create_train_state(model, tx, IMAGE, 0)), devices)]
  p_train, _ = make_steps(config, model, tx, NUM_CLASSES, devices=devices)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(1, batch_size, *IMAGE)).astype(np.float32),
           "label": rng.integers(0, NUM_CLASSES, size=(1, batch_size)).astype(np.int32)}

  def step():
    state[0], metrics = p_train(state[0], batch)
    jax.block_until_ready(metrics)
  return step, sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state[0].params))


# ------------------------------------------------------------------------------ PyTorch
def torch_model(name: str):
  import torch
  from torch import nn

  if name == "relu_net":
    layers, width_in = [nn.Flatten()], IMAGE[0] * IMAGE[1] * IMAGE[2]
    for _ in range(LIPNORM_KWARGS[name]["depth"] - 1):
      layers += [nn.Linear(width_in, 512), nn.ReLU()]
      width_in = 512
    return nn.Sequential(*layers, nn.Linear(width_in, NUM_CLASSES))

  def conv_bn(cin, cout, k, stride=1, groups=1, act=None):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1)]
    return nn.Sequential(*layers, act) if act is not None else nn.Sequential(*layers)

  if name == "cnn":
    layers, cin = [], IMAGE[2]
    for s, width in enumerate((16, 32, 64)):
      if s > 0:
        layers.append(nn.AvgPool2d(2, 2))
      for _ in range(2):
        layers.append(conv_bn(cin, width, 3, act=nn.ReLU()))
        cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(cin, NUM_CLASSES))

  if name == "resnet18":
    class Block(nn.Module):
      def __init__(self, cin, cout, stride):
        super().__init__()
        self.branch = nn.Sequential(conv_bn(cin, cout, 3, stride, act=nn.ReLU()),
                                    conv_bn(cout, cout, 3))
        self.shortcut = (conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout
                         else nn.Identity())

      def forward(self, x):
        return torch.relu(self.branch(x) + self.shortcut(x))

    layers, cin = [conv_bn(IMAGE[2], 64, 3, act=nn.ReLU())], 64
    for stage in range(4):
      for b in range(2):
        cout = 64 * 2 ** stage
        layers.append(Block(cin, cout, 2 if stage > 0 and b == 0 else 1))
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(cin, NUM_CLASSES))

  if name == "efficientnet_b0":
    from lipnorm.models.efficientnet import B0_BLOCKS, STEM_FILTERS, TOP_FILTERS

    class MBConv(nn.Module):
      def __init__(self, cin, cout, k, stride, expand, drop):
        super().__init__()
        mid = cin * expand
        layers = [conv_bn(cin, mid, 1, act=nn.SiLU())] if expand != 1 else []
        layers.append(conv_bn(mid, mid, k, stride, groups=mid, act=nn.SiLU()))
        self.convs = nn.Sequential(*layers)
        red = max(1, int(cin * 0.25))
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(mid, red, 1), nn.SiLU(),
                                nn.Conv2d(red, mid, 1), nn.Sigmoid())
        self.project = conv_bn(mid, cout, 1)
        self.residual, self.drop = stride == 1 and cin == cout, drop

      def forward(self, x):
        h = self.convs(x)
        h = self.project(h * self.se(h))
        if not self.residual:
          return h
        if self.training and self.drop > 0:
          keep = 1 - self.drop
          mask = torch.bernoulli(torch.full((h.shape[0], 1, 1, 1), keep))
          h = h * mask / keep
        return x + h

    layers = [conv_bn(IMAGE[2], STEM_FILTERS, 3, LIPNORM_KWARGS[name]["stem_stride"],
                      act=nn.SiLU())]
    num_blocks = sum(r for r, *_ in B0_BLOCKS)
    b = 0
    for repeats, k, stride, expand, cin, cout in B0_BLOCKS:
      for j in range(repeats):
        layers.append(MBConv(cin if j == 0 else cout, cout, k, stride if j == 0 else 1,
                             expand, 0.2 * b / num_blocks))
        b += 1
    layers.append(conv_bn(B0_BLOCKS[-1][-1], TOP_FILTERS, 1, act=nn.SiLU()))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
                         nn.Linear(TOP_FILTERS, NUM_CLASSES))
  raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")


def torch_step(name: str, batch_size: int):
  """(a zero-argument function running one PyTorch train step, the number of parameters)."""
  import torch
  torch.manual_seed(0)
  model = torch_model(name).train()
  opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM,
                        weight_decay=WEIGHT_DECAY)
  x = torch.randn(batch_size, IMAGE[2], IMAGE[0], IMAGE[1])
  y = torch.randint(0, NUM_CLASSES, (batch_size,))
  loss_fn = torch.nn.CrossEntropyLoss()

  def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    loss.item()
  return step, sum(p.numel() for p in model.parameters())


def main(argv):
  del argv
  import jax
  bad = [m for m in _MODELS.value if m not in MODELS]
  if bad:
    print(f"unknown model(s) {bad}; valid names: {', '.join(MODELS)}")
    sys.exit(2)
  try:
    import torch
  except ImportError:
    print("PyTorch is not installed: skipping the side-by-side benchmark "
          "(pip install -r bench/requirements.txt to run it).")
    return
  torch.set_num_threads(_TORCH_THREADS.value or os.cpu_count())
  print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op threads), {os.cpu_count()} host cores; "
        f"batch {_BATCH.value}, image {IMAGE}; median step after {_WARMUP.value} warm-up")
  print(f"{'model':<16}{'conv_impl':<10}{'steps':>6}{'lipnorm s':>11}{'torch s':>10}"
        f"{'ratio':>8}{'lipnorm 1st call s':>20}{'params lipnorm/torch':>22}")
  for name in _MODELS.value:
    steps = _STEPS.value or DEFAULT_STEPS[name]
    impls = _CONV_IMPLS.value if name in CONV_MODELS else [None]
    # PyTorch first and again last: each lipnorm timing has a PyTorch one next to it.
    t_step, t_params = torch_step(name, _BATCH.value)
    _, torch_s = timed_steps(t_step, steps, _WARMUP.value)
    rows = []
    for impl in impls:
      l_step, l_params = lipnorm_step(name, impl, _BATCH.value)
      first, lip_s = timed_steps(l_step, steps, _WARMUP.value)
      rows.append((impl, first, lip_s))
      del l_step
    if len(impls) > 1:
      _, torch_s2 = timed_steps(t_step, steps, _WARMUP.value)
      torch_s = statistics.mean([torch_s, torch_s2])
    for impl, first, lip_s in rows:
      print(f"{name:<16}{impl or '-':<10}{steps:>6}{lip_s:>11.4f}{torch_s:>10.4f}"
            f"{lip_s / torch_s:>8.2f}{first:>20.1f}{f'{l_params}/{t_params}':>22}",
            flush=True)


if __name__ == "__main__":
  app.run(main)
