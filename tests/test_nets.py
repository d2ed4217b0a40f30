import pytest
import torch
import torch.nn.functional as F

from lightning_modules.errors import UserError
from lightning_modules.nets import CLASSIFIERS, FlatParams, build_classifier

SMALL = {"convnet", "alexnet"}


@pytest.mark.parametrize("name", list(CLASSIFIERS))
@pytest.mark.parametrize("classes", [10, 100])
def test_output_shape(name, classes):
    net = build_classifier(name, channels=3, num_classes=classes, im_size=32)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, classes)


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 64)])
def test_other_channels_and_sizes(channels, size):
    for name in CLASSIFIERS:
        net = build_classifier(name, channels=channels, num_classes=7, im_size=size)
        assert net(torch.randn(2, channels, size, size)).shape == (2, 7)


def test_convnet_parameter_counts_match_reference():
    assert FlatParams(build_classifier("convnet", num_classes=10)).numel == 320_010
    assert FlatParams(build_classifier("convnet", num_classes=100)).numel == 504_420


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_functional_call_on_flat_vector_matches_module(name):
    torch.manual_seed(0)
    net = build_classifier(name, num_classes=10)
    layout = FlatParams(net)
    theta = layout.flatten(net)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(layout.call(net, theta, x), net(x))
    other = theta + 0.01 * torch.randn_like(theta)
    layout.load_into(net, other)
    torch.testing.assert_close(layout.call(net, other, x), net(x))


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_double_backward_through_an_unrolled_step(name):
    """d/dx of a loss after one student step θ' = θ - α ∇θ L(θ, x): needs second derivatives."""
    torch.manual_seed(0)
    net = build_classifier(name, num_classes=10)
    layout = FlatParams(net)
    theta = layout.flatten(net).requires_grad_(True)
    x = torch.randn(2 if name not in SMALL else 4, 3, 32, 32, requires_grad=True)
    y = torch.arange(len(x)) % 10
    alpha = torch.tensor(0.01, requires_grad=True)
    (g,) = torch.autograd.grad(
        F.cross_entropy(layout.call(net, theta, x), y), theta, create_graph=True
    )
    theta1 = theta - alpha * g
    target = theta.detach() + 0.1
    loss = ((theta1 - target) ** 2).sum()
    gx, galpha = torch.autograd.grad(loss, (x, alpha))
    assert gx.abs().sum() > 0 and torch.isfinite(gx).all() and galpha.abs() > 0


def test_unknown_net_and_bad_options():
    with pytest.raises(UserError, match="unknown net 'lenet'"):
        build_classifier("lenet")
    with pytest.raises(UserError, match="unknown norm"):
        build_classifier("convnet", norm="weird")
    with pytest.raises(UserError, match="does not take"):
        build_classifier("alexnet", depth=4)


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_activations_are_in_place_and_change_nothing(name):
    """In-place ReLUs (less peak memory in the unroll) give the outputs and input gradients of
    copying ones."""
    torch.manual_seed(0)
    net = build_classifier(name, num_classes=10)
    relus = [m for m in net.modules() if isinstance(m, (torch.nn.ReLU, torch.nn.LeakyReLU))]
    assert relus and all(m.inplace for m in relus)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = net(x)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    for m in relus:
        m.inplace = False
    if name.startswith("resnet"):  # its blocks call F.relu(..., inplace=True) directly
        return
    copy = net(x)
    (gc,) = torch.autograd.grad(copy.square().sum(), x)
    torch.testing.assert_close(out, copy)
    torch.testing.assert_close(gx, gc)


def test_leaky_relu_convnet_double_backward():
    torch.manual_seed(0)
    net = build_classifier("convnet", num_classes=10, width=8, act="leakyrelu")
    layout = FlatParams(net)
    theta = layout.flatten(net).requires_grad_(True)
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    loss = F.cross_entropy(layout.call(net, theta, x), torch.arange(4))
    (g,) = torch.autograd.grad(loss, theta, create_graph=True)
    (gx,) = torch.autograd.grad((theta - 0.01 * g).square().sum(), x)
    assert torch.isfinite(gx).all() and gx.abs().sum() > 0
