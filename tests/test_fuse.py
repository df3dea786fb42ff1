"""``tritonbn.fuse(model)`` (issue 15, item 5): a small ResNet written here (a torchvision-style
BasicBlock and Bottleneck: ``nn.ReLU(inplace=True)``, ``F.relu``, the ``relu_`` method, ``out +=
identity``, ``torch.add``), converted and fused, trains 3 steps and evaluates like the unfused torch
model (outputs, every gradient, every buffer); which chains fuse and which must not (an output
read twice, an add writing the identity); broadcast residuals; untraceable modules left as they
are with a warning; state_dicts load both ways.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonbn
from tritonbn import nn as tnn
from tritonbn import trace
from test_nn import assert_same_state

F64_TOL = dict(atol=1e-10, rtol=1e-10)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: one ReLU module used twice, ``out += identity``."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck, its ReLUs written three other ways (F.relu, relu_, torch.relu)."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, channels, 1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out)).relu_()
        return torch.relu(torch.add(self.bn3(self.conv3(out)), x))


class SmallResNet(nn.Module):
    """stem (conv, BN, ReLU in a Sequential), a BasicBlock with a downsample, a Bottleneck, and a
    head whose BatchNorm1d is read twice (not fusable)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
        self.layer1 = BasicBlock(4, 6, stride=2)
        self.layer2 = Bottleneck(6, 3)
        self.fc = nn.Linear(6, 5)
        self.head_bn = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.layer2(self.layer1(self.stem(x))).mean((2, 3))
        h = self.head_bn(self.fc(features))
        return F.relu(h) + h  # the BN's output read twice: stays unfused


# (path of a batch norm in SmallResNet, its class after fuse)
EXPECTED_LAYERS = {
    "stem.1": tnn.BatchNormReLU2d,
    "layer1.bn1": tnn.BatchNormReLU2d,
    "layer1.bn2": tnn.BatchNormAddReLU2d,
    "layer1.downsample.1": tnn.BatchNorm2d,  # its output is the identity, not a ReLU's input
    "layer2.bn1": tnn.BatchNormReLU2d,
    "layer2.bn2": tnn.BatchNormReLU2d,
    "layer2.bn3": tnn.BatchNormAddReLU2d,
    "head_bn": tnn.BatchNorm1d,
}


def _models(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(torch's float64 SmallResNet, the same converted and fused)."""
    torch.manual_seed(seed)
    theirs = SmallResNet().double()
    for module in theirs.modules():  # gamma, beta away from 1, 0: their gradients matter
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(module.weight, 0.5, 1.5), nn.init.uniform_(module.bias, -0.5, 0.5)
    return theirs, tritonbn.fuse(tritonbn.convert(copy.deepcopy(theirs)))


def _train_step(model: nn.Module, optimizer, x: torch.Tensor, seed: int) -> dict:
    """One SGD step: the output, every parameter's gradient (before the update)."""
    optimizer.zero_grad()
    y = model(x)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()
    return {"y": y.detach()} | grads


def test_fuse_rewrites_the_resnet_chains_and_keeps_the_state_dict():
    theirs, ours = _models()
    for name, cls in EXPECTED_LAYERS.items():
        assert type(ours.get_submodule(name)) is cls, name
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert type(ours).__name__ == "SmallResNet" and isinstance(ours, torch.fx.GraphModule)
    relus = [node.target for node in ours.graph.nodes if node.target in (F.relu, torch.relu, "relu_") or (
        node.op == "call_module" and isinstance(ours.get_submodule(node.target), nn.ReLU))]
    assert relus == [F.relu]  # only the head's, whose BN output is read twice
    assert isinstance(ours.stem, nn.Sequential) and ours.stem[1] is ours.get_submodule("stem.1")
    ours.load_state_dict(theirs.state_dict())  # a torch checkpoint loads into the fused model
    theirs.load_state_dict(ours.state_dict())  # and back
    assert tritonbn.fuse(ours) is ours  # nothing left to fuse


def test_fused_resnet_trains_and_evaluates_like_the_torch_model(path):
    theirs, ours = _models()
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (theirs, ours)]
    with trace.capture() as t:
        for step in range(3):
            x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
            expected = _train_step(theirs, optimizers[0], x, step)
            actual = _train_step(ours, optimizers[1], x, step)
            assert actual.keys() == expected.keys()
            for key, value in expected.items():
                torch.testing.assert_close(actual[key], value, msg=lambda m, k=key: f"step {step}: {k}: {m}", **F64_TOL)
        theirs.eval(), ours.eval()
        torch.testing.assert_close(ours(x), theirs(x), **F64_TOL)
    assert set(t.paths) == {path}
    if t.launches:  # the kernel paths: five ReLU chains, two of them with the addend
        fused = [launch.flags for launch in t.launches if launch.flags.get("RELU")]
        assert fused and any(flags.get("ADDEND") for flags in fused)
    assert_same_state(ours, theirs, **F64_TOL)


class _ReadTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.bn(x)
        return torch.relu(y), y


class _AddIntoIdentity(nn.Module):
    """``identity.add_(bn(x))`` writes the caller's tensor: fusing would stop that write.  (torch.fx
    records ``identity += y`` as ``identity + y``, its own traced graphs dropping the write.)"""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x, identity):
        identity.add_(self.bn(x))
        return torch.relu(identity)


class _SumReadTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x, identity):
        s = self.bn(x) + identity
        return torch.relu(s) * s


class _CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return torch.relu(self.bn(x)) + self.bn(x)


@pytest.mark.parametrize("module", [_ReadTwice, _AddIntoIdentity, _SumReadTwice, _CalledTwice],
                         ids=["bn-output-read-twice", "add-writes-the-identity", "sum-read-twice",
                              "bn-called-twice"])
def test_fuse_leaves_chains_whose_values_are_read_elsewhere(module):
    fused = tritonbn.fuse(module())
    assert type(fused.bn) is tnn.BatchNorm2d
    assert not isinstance(fused, torch.fx.GraphModule)  # nothing fused: the model itself


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x, identity):
        return F.relu(self.bn(x) + identity)


@pytest.mark.parametrize("identity_shape,identity_dtype", [
    ((2, 3, 4, 5), torch.float32), ((1, 3, 1, 1), torch.float32), ((2, 3, 4, 5), torch.float64)],
    ids=["residual-fused", "broadcast-unfused", "promoting-unfused"])
def test_fused_add_keeps_torchs_broadcasting_and_promotion(path, identity_shape, identity_dtype):
    torch.manual_seed(0)
    theirs = _Residual()
    ours = tritonbn.fuse(copy.deepcopy(theirs))
    assert type(ours.bn) is tnn.BatchNormAddReLU2d
    x = torch.randn(2, 3, 4, 5)
    identity = torch.randn(identity_shape, dtype=identity_dtype)
    with trace.capture() as t:
        actual = ours(x, identity)
    expected = theirs(x, identity)
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=2e-5)
    if t.launches:
        assert any(launch.flags.get("ADDEND") for launch in t.launches) == (identity_shape == x.shape
                                                                            and identity_dtype == x.dtype)
    assert_same_state(ours, theirs)


class _Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it; its child Sequential traces."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU())
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        x = self.inner(x)
        if x.sum() > 0:
            x = x * 2
        return torch.relu(self.bn(x))


def test_fuse_leaves_an_untraceable_module_as_it_is_and_fuses_its_children(path):
    torch.manual_seed(0)
    theirs = _Untraceable()
    with pytest.warns(UserWarning, match=r"_Untraceable \(_Untraceable\) is not traceable"):
        ours = tritonbn.fuse(copy.deepcopy(theirs))
    assert type(ours) is _Untraceable and type(ours.bn) is tnn.BatchNorm2d
    assert type(ours.inner.get_submodule("1")) is tnn.BatchNormReLU2d
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(ours(x), theirs(x), atol=2e-5, rtol=2e-5)
    assert_same_state(ours, theirs)


def test_fuse_keeps_modes_and_unused_state_and_checks_its_argument():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())
    model.register_buffer("step", torch.tensor(7))  # read by no forward: kept all the same
    model[0].eval()
    fused = tritonbn.fuse(model)
    assert isinstance(fused, torch.fx.GraphModule) and fused.training and not fused.get_submodule("0").training
    assert torch.equal(fused.state_dict()["step"], torch.tensor(7))
    assert list(fused.state_dict()) == list(model.state_dict())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        tritonbn.fuse(lambda x: x)


def test_fused_resnet_compiles_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    theirs, ours = _models()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    compiled = torch.compile(ours, fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    expected = theirs(x)
    expected.sum().backward()
    torch.testing.assert_close(y, expected, **F64_TOL)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m, n=name: f"{n}: {m}", **F64_TOL)
    assert_same_state(ours, theirs, **F64_TOL)
    torch._dynamo.reset()
