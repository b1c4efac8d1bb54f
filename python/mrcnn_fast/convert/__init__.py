"""Weight-name maps between mrcnn_fast models and other implementations (pure strings and tensors), the importers
of torchvision detection checkpoints (load_torchvision) and detectron2 checkpoints (detectron2_import), and the
one door over every format (checkpoints.load_checkpoint)."""
from .detectron2_import import (
    ImportReport,
    UnsafePickleError,
    load_detectron2,
    looks_like_detectron2,
    read_detectron2_weights,
    safe_load_pickle,
)
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
           "load_detectron2", "read_detectron2_weights", "safe_load_pickle", "looks_like_detectron2",
           "UnsafePickleError", "ImportReport", "load_torchvision"]
