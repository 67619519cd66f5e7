"""Models: the built-ins, the entry-point contract and the flat view with buffers."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from sgdjob.api.types import ModelSpec
from sgdjob.models import FlatModel, ModelError, build_model
from sgdjob.models.resnet import resnet
from sgdjob.models.transformer import transformer


def test_the_resnet_maps_images_to_logits_and_keeps_batchnorm_buffers() -> None:
    m = resnet(input_shape=(1, 28, 28), num_classes=10, channels=[8, 16], blocks=1)
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert any(isinstance(x, nn.BatchNorm2d) for x in m.modules())


def test_the_resnet_refuses_flat_inputs_naming_the_field() -> None:
    with pytest.raises(ModelError, match=r"spec.model.builtin: .*\(C, H, W\)"):
        build_model(ModelSpec(builtin="resnet"), input_shape=(64,), num_classes=10, seed=0)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_the_transformer_is_causal(positions: str) -> None:
    m = transformer(
        input_shape=(16,),
        num_classes=256,
        d_model=32,
        layers=2,
        heads=4,
        ffn_mult=2,
        positions=positions,
        dropout=0.0,
    ).eval()
    x = torch.randint(0, 256, (2, 16))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 256  # change only the future of position 9
    a, b = m(x), m(y)
    assert a.shape == (2, 16, 256)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def old_style(*, input_dim: int, num_classes: int, width: int) -> nn.Module:
    return nn.Linear(input_dim, num_classes * width)


def takes_all(**kw: Any) -> nn.Module:
    assert kw["input_shape"] == (64,) and kw["input_dim"] == 64 and kw["width"] == 2
    return nn.Linear(64, 3)


def test_an_entry_point_gets_the_arguments_it_names_or_all_of_them() -> None:
    spec = ModelSpec(entry_point="tests.test_models:old_style", kwargs={"width": 2})
    m = build_model(spec, input_shape=(64,), num_classes=3, seed=0)
    assert isinstance(m, nn.Linear) and m.out_features == 6
    spec = ModelSpec(entry_point="tests.test_models:takes_all", kwargs={"width": 2})
    build_model(spec, input_shape=(64,), num_classes=3, seed=0)


def test_the_flat_vector_holds_parameters_then_buffers_and_pulls_load_them() -> None:
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))  # noqa: E731
    a, b = FlatModel(make(), torch.device("cpu")), FlatModel(make(), torch.device("cpu"))
    assert a.trainable == 4 * 3 + 3 + 3 + 3 and a.size == a.trainable + 3 + 3 + 1
    a.model(torch.randn(8, 4)).sum().backward()
    a.buffer_deltas()  # what this forward did to the running statistics
    bn = list(a.model.children())[1]
    assert isinstance(bn, nn.BatchNorm1d) and bn.running_mean is not None
    moved = a.grads[a.trainable : a.trainable + 3]
    torch.testing.assert_close(moved, bn.running_mean)  # from zeros
    assert float(a.grads[-1]) == 1.0  # num_batches_tracked went 0 -> 1
    # "The shard" applies the change; another replica pulls and loads the same buffers.
    b.params.copy_(a.params)
    b.params[a.trainable :] += a.grads[a.trainable :]
    b.load_buffers()
    bn_b = list(b.model.children())[1]
    assert isinstance(bn_b, nn.BatchNorm1d)
    torch.testing.assert_close(bn_b.running_mean, bn.running_mean)
    assert bn_b.num_batches_tracked is not None and int(bn_b.num_batches_tracked) == 1
