"""Weight-name maps between mrcnn_fast models and other implementations (pure strings and tensors), and the
importer of torchvision detection checkpoints (load_torchvision)."""
from .torchvision_import import load_torchvision
from .torchvision_names import (
    copy_weights_from_torchvision,
    copy_weights_to_torchvision,
    from_torchvision_name,
    from_torchvision_state_dict,
    to_torchvision_name,
    to_torchvision_state_dict,
)

__all__ = ["to_torchvision_name", "from_torchvision_name", "to_torchvision_state_dict",
           "from_torchvision_state_dict", "copy_weights_to_torchvision", "copy_weights_from_torchvision",
           "load_torchvision"]
