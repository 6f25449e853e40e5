"""PyTorch ConvMixer checkpoints -> Keras, with parity proven against the real network.

Nothing here needs torch except reading torch-pickled files and the parity run;
`.safetensors` checkpoints convert with no torch installed.
"""

import sys

# Loading triton's shared library after TensorFlow's crashes the process (SIGSEGV) with
# the CUDA builds of torch. torchvision (and so timm) imports triton through torch's
# compiler stack; TensorFlow is always loaded here, and conversion never compiles GPU
# kernels, so triton is kept out unless something imported it first.
if "triton" not in sys.modules:
    sys.modules["triton"] = None

from weights_converter.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_state_dict,
    read_checkpoint,
)
from weights_converter.convert import (
    Conversion,
    convert_checkpoint,
    convert_file,
    convert_state_dict,
    keras_to_state_dict,
)
from weights_converter.mapping import MappingError, infer_config, weight_table
from weights_converter.parity import ParityError, ParityReport, check_parity, reference_model

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "Conversion",
    "MappingError",
    "ParityError",
    "ParityReport",
    "check_parity",
    "convert_checkpoint",
    "convert_file",
    "convert_state_dict",
    "infer_config",
    "keras_to_state_dict",
    "load_state_dict",
    "read_checkpoint",
    "reference_model",
    "weight_table",
]
