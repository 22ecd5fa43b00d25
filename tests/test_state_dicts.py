"""Building a network from --arch and loading its state dict without a second copy."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from transform_core.errors import CheckpointError
from transform_core.state_dicts import build_loaded

FACTORIES = '''
import torch
from torch import nn


def plain(width=4):
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2))


class WithConstant(nn.Module):
    """A non-persistent buffer: not in the state dict, so meta would leave it empty."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.register_buffer("scale", torch.full((2,), 3.0), persistent=False)

    def forward(self, x):
        return self.fc(x) * self.scale


DEFAULT_SCALE = torch.tensor(2.0)  # made at import, as Rockpool's default arguments are


class ScaledByDefault(nn.Module):
    """Keeps a default tensor made when its module was imported (not a buffer)."""

    def __init__(self, scale=DEFAULT_SCALE):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.scale = scale

    def forward(self, x):
        return self.fc(x) * self.scale


def imports_while_building():
    """Imports a module for the first time inside the factory, as lazy factories do."""
    import arch_lazy_helper

    return arch_lazy_helper.ScaledByDefault()


def reads_values():
    """Reads a tensor's value while building, which the meta device cannot do."""
    net = nn.Linear(2, 2)
    if float(net.weight.detach().abs().sum()) < 0:
        raise RuntimeError("unreachable")
    return net
'''


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "arch_factories.py").write_text(textwrap.dedent(FACTORIES))
    (tmp_path / "arch_lazy_helper.py").write_text(textwrap.dedent(FACTORIES))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "arch_factories"
    sys.modules.pop("arch_factories", None)
    sys.modules.pop("arch_lazy_helper", None)


def test_a_plain_network_adopts_the_loaded_tensors(factories: str) -> None:
    state = {
        k: torch.randn_like(v)
        for k, v in nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).state_dict().items()
    }
    net = build_loaded(f"{factories}:plain", {"width": 4}, state)
    for name, tensor in net.state_dict().items():
        assert tensor.data_ptr() == state[name].data_ptr(), name
    assert all(p.requires_grad and isinstance(p, nn.Parameter) for p in net.parameters())
    assert net(torch.ones(1, 4)).shape == (1, 2)


def test_a_non_persistent_buffer_falls_back_to_an_ordinary_build(factories: str) -> None:
    state = {"fc.weight": torch.ones(2, 2), "fc.bias": torch.zeros(2)}
    net = build_loaded(f"{factories}:WithConstant", None, state)
    assert torch.equal(net.scale, torch.full((2,), 3.0))
    assert torch.equal(net(torch.ones(1, 2)), torch.full((1, 2), 6.0))


def test_tensors_a_module_makes_on_import_are_not_made_on_meta(factories: str) -> None:
    # The factory's module is first imported by build_loaded: its module-level tensor must
    # be an ordinary one, or every later network of the process would share a meta tensor.
    state = {"fc.weight": torch.ones(2, 2), "fc.bias": torch.zeros(2)}
    net = build_loaded(f"{factories}:ScaledByDefault", None, state)
    assert not sys.modules[factories].DEFAULT_SCALE.is_meta
    assert net.fc.weight.data_ptr() == state["fc.weight"].data_ptr()  # still built on meta
    assert torch.equal(net(torch.ones(1, 2)), torch.full((1, 2), 4.0))


def test_a_factory_that_imports_while_building_is_built_normally(factories: str) -> None:
    state = {"fc.weight": torch.ones(2, 2), "fc.bias": torch.zeros(2)}
    net = build_loaded(f"{factories}:imports_while_building", None, state)
    assert not sys.modules["arch_lazy_helper"].DEFAULT_SCALE.is_meta
    assert torch.equal(net(torch.ones(1, 2)), torch.full((1, 2), 4.0))
    assert not any(type(f).__name__ == "_RefuseFirstImports" for f in sys.meta_path)


def test_a_factory_that_cannot_build_on_meta_falls_back(factories: str) -> None:
    state = {"weight": torch.ones(2, 2), "bias": torch.zeros(2)}
    net = build_loaded(f"{factories}:reads_values", None, state)
    assert torch.equal(net.weight.detach(), torch.ones(2, 2))


def test_another_dtype_in_the_file_is_copied_into_the_networks_dtype(factories: str) -> None:
    state = {
        k: torch.ones_like(v, dtype=torch.float64)
        for k, v in nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)).state_dict().items()
    }
    net = build_loaded(f"{factories}:plain", {"width": 2}, state)
    assert all(t.dtype == torch.float32 for t in net.state_dict().values())
    assert torch.equal(net[0].weight.detach(), torch.ones(2, 2))


def test_a_state_dict_that_does_not_fit_is_refused(factories: str) -> None:
    with pytest.raises(CheckpointError, match=r"1 missing key \(bias\)"):
        build_loaded(f"{factories}:reads_values", None, {"weight": torch.ones(2, 2)})


def test_several_shape_mismatches_are_counted_in_the_plural() -> None:
    from transform_core.state_dicts import load_state_dict_strict

    net = nn.Linear(2, 3)
    state = {"weight": torch.ones(4, 2), "bias": torch.zeros(4)}
    with pytest.raises(CheckpointError, match=r"2 shape mismatches \(") as err:
        load_state_dict_strict(net, state)
    assert "mismatchs" not in str(err.value)
