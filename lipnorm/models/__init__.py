"""The model zoo: pure linen modules taking `norm=` (a `NormSpec`; `get_model` builds it
from a normalizer registry name, `norm_layers` and `norm_options`) and `num_classes=`;
each exposes `structure()` (see `lipnorm.models.structure`). Models are frozen and
hashable; impossible shapes raise ValueError at construction."""
from lipnorm.models import structure
from lipnorm.models.activations import get_activation
from lipnorm.models.cnn import CNN
from lipnorm.models.efficientnet import VARIANTS as EFFICIENTNET_VARIANTS
from lipnorm.models.efficientnet import EfficientNet
from lipnorm.models.norm_spec import NormSpec
from lipnorm.models.registry import get_model, model_names, model_options, register_model
from lipnorm.models.relu_net import ReLUNet
from lipnorm.models.resnet import ResNet

register_model("relu_net", ReLUNet)
register_model("mlp", ReLUNet)
register_model("cnn", CNN)
register_model("resnet18", ResNet, stage_sizes=(2, 2, 2, 2), block="basic")
register_model("resnet34", ResNet, stage_sizes=(3, 4, 6, 3), block="basic")
register_model("resnet50", ResNet, stage_sizes=(3, 4, 6, 3), block="bottleneck")
for _variant, (_width, _depth, _dropout) in EFFICIENTNET_VARIANTS.items():
  register_model(f"efficientnet_{_variant}", EfficientNet, width_coefficient=_width,
                 depth_coefficient=_depth, dropout_rate=_dropout)

__all__ = ["structure", "get_activation", "get_model", "model_names", "model_options",
           "register_model", "NormSpec",
           "ReLUNet", "CNN", "ResNet", "EfficientNet"]
