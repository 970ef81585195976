"""The torchvision backbones: what make_backbone builds for each --backbone and --stem, the heads on their
features, and the exact meta-gradient through each (forward mode, network_tangent) against double backward
in float64. Narrow instances of the same torchvision classes keep the float64 checks fast."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
import torchvision
from conftest import default_name
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.models.vision_transformer import VisionTransformer

import experiment
import model_vgg_human as human
import model_vgg_maoal as maoal
import model_vgg_maxl as maxl
import model_vgg_single as single
import model_vgg_wamal as wamal

F64 = torch.float64


def narrow(backbone: str) -> nn.Module:
    """A small network of the torchvision class behind `backbone`, headless, in float64."""
    torch.manual_seed(0)
    if backbone == "resnet18":
        network = ResNet(BasicBlock, [1, 1, 1, 1])
        network.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)  # the CIFAR stem
        network.maxpool = nn.Identity()
    elif backbone == "resnet50":
        network = ResNet(Bottleneck, [1, 1, 1, 1], width_per_group=16)
    else:
        network = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)
    return experiment.headless(network).double()


def checked(script, **settings):
    cfg = script.check_config(script.Config(device="cpu", **settings))
    experiment.check_run_settings(cfg)
    return cfg


@pytest.mark.parametrize(
    "settings, conv1, pooled, features",
    [
        (dict(backbone="resnet18"), (3, 1), False, 512),
        (dict(backbone="resnet18", stem="imagenet"), (7, 2), True, 512),
        (dict(backbone="resnet50", dataset="cifar100"), (3, 1), False, 2048),
    ],
)
def test_make_backbone_builds_the_torchvision_resnet_with_the_stem_asked_for(settings, conv1, pooled, features):
    cfg = checked(single, **settings)
    network = experiment.make_backbone(cfg)
    assert type(network).__name__ == "ResNet" and isinstance(network.fc, nn.Identity)
    assert (network.conv1.kernel_size[0], network.conv1.stride[0]) == conv1
    assert isinstance(network.maxpool, nn.MaxPool2d) == pooled
    assert network.num_features == features
    model = single.VGG16(20, network)
    assert model.classifier[0].in_features == features
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 20)


def test_vit_is_built_at_the_image_size_and_the_vgg_default_is_the_scripts_own():
    vit = experiment.make_backbone(checked(single, backbone="vit_b_16"))
    assert isinstance(vit, VisionTransformer) and vit.image_size == 32 and vit.num_features == 768
    assert experiment.make_backbone(checked(single)) is None
    model = single.VGG16(20)
    assert model.backbone is None and [n for n, _ in model.named_children()][:5] == [f"block{i}" for i in range(1, 6)]


def test_the_paper_initialisation_leaves_a_torchvision_backbone_alone():
    network = narrow("resnet18").float()
    before = {name: p.clone() for name, p in network.state_dict().items()}
    model = maxl.VGG16([5] * 20, network)
    assert all(torch.equal(before[name], p) for name, p in model.backbone.state_dict().items())
    assert torch.count_nonzero(model.classifier1[0].bias) == 0  # the heads get the paper's init


def test_vgg_on_larger_images_pools_its_last_feature_map():
    model = single.VGG16(10).eval()
    assert model.features(torch.randn(2, 3, 64, 64)).shape == (2, 512)


# WAMAL takes network_tangent from MAXL: ResNet-18's blocks (the slowest in float64) in MAXL only.
@pytest.mark.parametrize(
    "script, backbone",
    [(maxl, "resnet18"), (maxl, "resnet50"), (maxl, "vit_b_16"), (wamal, "resnet50"), (wamal, "vit_b_16")],
    ids=["maxl-resnet18", "maxl-resnet50", "maxl-vit_b_16", "wamal-resnet50", "wamal-vit_b_16"],
)
def test_every_meta_gradient_goes_through_each_backbone(script, backbone):
    psi = [2, 3]
    model = script.VGG16(psi, narrow(backbone)).double()
    generator = (script.LabelWeightGenerator if script is wamal else script.LabelGenerator)(psi, narrow(backbone))
    generator = generator.double()
    model.train(), generator.train()
    torch.manual_seed(1)
    size = {"vit_b_16": 32, "resnet50": 16, "resnet18": 8}[backbone]  # the narrow ViT is built for 32x32
    images, primary = torch.randn(4, 3, size, size, dtype=F64), torch.tensor([0, 1, 1, 0])
    assert script.tangent_path(model, images) == []  # the generic forward-mode path
    grads = {
        method: torch.cat(
            [
                g.flatten()
                for g in (wamal.wamal_meta_gradients if script is wamal else maxl.meta_gradients)(
                    model=model,
                    label_generator=generator,
                    images=images,
                    primary=primary,
                    inner_lr=0.1,
                    method=method,
                    fd_step=1e-4,
                )[0]
            ]
        )
        for method in ("second-order", "double-backward", "finite-difference")
    }
    exact = grads["double-backward"]
    assert torch.isfinite(exact).all() and exact.norm() > 0
    assert (grads["second-order"] - exact).norm() / exact.norm() < 1e-9
    # The authors' approximation goes through every backbone too (ReLU kinks keep it from being exact).
    assert torch.nn.functional.cosine_similarity(grads["finite-difference"], exact, dim=0) > 0.99


def test_a_layer_without_a_forward_mode_rule_is_refused_in_one_line():
    class NoJvp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * 2

    class Doubling(nn.Module):
        num_features = 8

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3 * 32 * 32, 8)

        def forward(self, x):
            return NoJvp.apply(self.linear(x.flatten(1)))

    model = maxl.VGG16([2, 3], Doubling()).train()
    params = {name: p.detach() for name, p in model.named_parameters()}
    direction = {name: torch.ones_like(p) for name, p in params.items()}
    with pytest.raises(experiment.UsageError, match="no forward-mode rule .*use --meta-grad double-backward"):
        maxl.network_tangent(model, params, direction, {}, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize(
    "script, settings, message",
    [
        (single, dict(pretrained=True), "--pretrained loads torchvision's ImageNet weights"),
        (single, dict(backbone="vgg16", stem="cifar"), "--stem chooses the first layers of resnet18 and resnet50"),
        (single, dict(backbone="vit_b_16", image_size=40), "give a multiple of 16"),
        (single, dict(image_size=16), "--image-size must be at least 32"),
        (maoal, dict(backbone="resnet18"), "resnet18 runs the authors' CIFAR-100/20, --task domains"),
        (maoal, dict(backbone="resnet50", task="domains"), "maoal is defined on vgg16, resnet18 only"),
        (human, dict(dataset="cifar10"), "human runs on cifar100 only"),
        (maoal, dict(dataset="svhn"), "maoal runs on cifar100 only"),
    ],
)
def test_backbone_and_dataset_refusals(script, settings, message):
    with pytest.raises(experiment.UsageError, match=message):
        checked(script, **settings)


@pytest.mark.parametrize("script", [single, human, maxl, wamal], ids=["single", "human", "maxl", "wamal"])
def test_run_names_carry_the_backbone_and_keep_the_papers(script):
    paper = default_name(script, checked(script))
    resnet = default_name(script, checked(script, backbone="resnet18"))
    imagenet = default_name(script, checked(script, backbone="resnet18", stem="imagenet"))
    assert "-" not in paper.split("seed0")[1] and resnet == paper.replace("seed0", "seed0-resnet18")
    assert imagenet == paper.replace("seed0", "seed0-resnet18-imagenetstem")
    cfg = checked(script, backbone="resnet18")
    assert script.published_accuracy(cfg) == {} and experiment.paper_data(checked(script))
    assert dataclasses.asdict(cfg)["stem"] == "cifar"


def test_pretrained_weights_are_asked_for_and_vits_position_embeddings_fit_the_image_size(monkeypatch):
    """--pretrained asks torchvision for its ImageNet weights (stood in for here: nothing downloads); ViT's, made at
    224, get their position embeddings interpolated to the run's image size and load into its network."""
    asked = []

    def vit(image_size=224, weights=None):
        asked.append(weights)
        torch.manual_seed(1 if weights else 0)  # the same stand-in "ImageNet" weights at every call
        return VisionTransformer(224 if weights else image_size, 16, 1, 2, 16, 32)

    def resnet(weights=None):
        asked.append(weights)
        return ResNet(BasicBlock, [1, 1, 1, 1])

    monkeypatch.setattr(torchvision.models, "vit_b_16", vit)
    monkeypatch.setattr(torchvision.models, "resnet18", resnet)
    network = experiment.make_backbone(checked(single, backbone="vit_b_16", pretrained=True, image_size=64))
    imagenet = vit(weights="DEFAULT").encoder.pos_embedding  # the stand-in's 14 x 14 + 1 positions
    assert network.encoder.pos_embedding.shape == (1, 4 * 4 + 1, 16) and imagenet.shape == (1, 14 * 14 + 1, 16)
    torch.testing.assert_close(network.encoder.pos_embedding[:, 0], imagenet[:, 0])  # the class token's, as it was
    experiment.make_backbone(checked(single, backbone="resnet18", pretrained=True))
    default = [torchvision.models.ViT_B_16_Weights.DEFAULT, torchvision.models.ResNet18_Weights.DEFAULT]
    assert asked == [None, default[0], "DEFAULT", default[1]]  # the network at 64, its weights, ours above, ResNet's
