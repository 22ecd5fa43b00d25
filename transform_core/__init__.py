"""transform_core: transformation-in-training for any torch network.

Quantise, round or drop out parameters and activations in the forward pass of any
``torch.nn.Module`` (Rockpool spiking networks included), train through the transforms
with straight-through gradients, then burn the transformed values in and remove the
patches.

Example:
    >>> import torch
    >>> import transform_core as tt
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> T_fn = lambda p: tt.stochastic_rounding(p, num_levels=2**4)
    >>> T_net = tt.make_param_T_network(net, tt.make_param_T_config(net, T_fn, "weights"))
    >>> quantised = tt.remove_T_net(tt.apply_T(T_net))
    >>> bool(quantised[0].weight.unique().numel() <= 16)
    True
"""

from transform_core.errors import CheckpointError, ConfigError, RecipeError, RockqError
from transform_core.families import (
    BUILTIN_FAMILIES,
    TensorInfo,
    family_for_name,
    param_families,
    tensor_infos,
)
from transform_core.patching import (
    ActWrapper,
    TWrapper,
    apply_T,
    make_act_T_config,
    make_act_T_network,
    make_param_T_config,
    make_param_T_network,
    remove_T_net,
)
from transform_core.quantise import (
    class_calc_q_decay,
    deterministic_channel_rounding,
    deterministic_rounding,
    dropout,
    identity,
    int_quant,
    make_backward_passthrough,
    stochastic_channel_rounding,
    stochastic_rounding,
    t_decay,
)
from transform_core.tree import (
    get_nested,
    set_nested,
    tree_flatten,
    tree_items,
    tree_map,
    tree_unflatten,
    tree_update,
)

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_FAMILIES",
    "ActWrapper",
    "CheckpointError",
    "ConfigError",
    "RecipeError",
    "RockqError",
    "TWrapper",
    "TensorInfo",
    "__version__",
    "apply_T",
    "class_calc_q_decay",
    "deterministic_channel_rounding",
    "deterministic_rounding",
    "dropout",
    "family_for_name",
    "get_nested",
    "identity",
    "int_quant",
    "make_act_T_config",
    "make_act_T_network",
    "make_backward_passthrough",
    "make_param_T_config",
    "make_param_T_network",
    "param_families",
    "remove_T_net",
    "set_nested",
    "stochastic_channel_rounding",
    "stochastic_rounding",
    "t_decay",
    "tensor_infos",
    "tree_flatten",
    "tree_items",
    "tree_map",
    "tree_unflatten",
    "tree_update",
]
