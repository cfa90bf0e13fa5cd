"""Reference PyTorch SiT and official-PPFlow-layout models, written for this project (model.py)."""

from third_party.torch_ref.model import LEVEL_FACTORS
from third_party.torch_ref.model import TorchPPF
from third_party.torch_ref.model import depth_to_space
from third_party.torch_ref.model import ppf_state_from_sit
from third_party.torch_ref.model import sincos_grid
from third_party.torch_ref.model import space_to_depth
