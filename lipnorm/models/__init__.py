"""The model zoo: pure linen modules taking `norm=` (a normalizer registry name) and
`num_classes=`; each exposes `structure()` (see `lipnorm.models.structure`)."""
from lipnorm.models import structure
from lipnorm.models.activations import get_activation
from lipnorm.models.cnn import CNN
from lipnorm.models.registry import get_model, model_names, register_model
from lipnorm.models.relu_net import ReLUNet

register_model("relu_net", ReLUNet)
register_model("mlp", ReLUNet)
register_model("cnn", CNN)

__all__ = ["structure", "get_activation", "get_model", "model_names", "register_model",
           "ReLUNet", "CNN"]
