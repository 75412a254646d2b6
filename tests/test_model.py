"""ft_net keys, shapes and feature norm; pretrained-weight loading never downloads."""
import pytest
import torch

import model as model_lib
from model import ModelError, ft_net


@pytest.mark.parametrize("arch,dim", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_keys_shapes_and_unit_feature(arch, dim):
    net = ft_net(7, arch).eval()
    keys = net.state_dict().keys()
    for key in ["model.conv1.weight", "model.bn1.weight", "model.layer1.0.conv1.weight", "model.fc.weight",
                "classifier.add_block.0.weight", "classifier.add_block.0.running_mean",
                "classifier.classifier.0.weight", "classifier.classifier.0.bias"]:
        assert key in keys
    assert net.classifier.add_block[0].num_features == dim
    with torch.no_grad():
        logits, f = net(torch.randn(3, 3, 64, 32))
    assert logits.shape == (3, 7) and f.shape == (3, dim)
    assert torch.allclose(f.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(net.extract(torch.zeros(2, 3, 64, 32)), net(torch.zeros(2, 3, 64, 32))[1])
    assert model_lib.infer_arch(net.state_dict()) == arch


def test_head_initialisation():
    torch.manual_seed(0)
    net = ft_net(751, "resnet18")
    bn, fc = net.classifier.add_block[0], net.classifier.classifier[0]
    assert abs(bn.weight.mean().item() - 1) < 0.01 and 0.01 < bn.weight.std().item() < 0.03
    assert torch.all(bn.bias == 0) and torch.all(fc.bias == 0)
    assert 0.0005 < fc.weight.std().item() < 0.002


def test_pretrained_from_file_and_clear_errors(tmp_path, monkeypatch):
    import torchvision
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    net = ft_net(5, "resnet18", pretrained=str(path))
    assert torch.equal(net.model.conv1.weight, reference.conv1.weight)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_cache"))
    with pytest.raises(ModelError, match="--no_pretrained"):
        ft_net(5, "resnet18", pretrained=True)
    with pytest.raises(ModelError, match="unknown arch"):
        ft_net(5, "resnet101")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="corrupt"):
        model_lib.load_checkpoint(tmp_path / "bad.pth")
