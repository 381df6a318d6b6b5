"""Which registered models the per-model checks run on."""

from xception import list_models

# xception65 and xception65p are xception41 and xception41p with 16 middle blocks instead of 8 (and
# 65p's batch-norm epsilon): the same modules, the same code. The per-model checks of interfaces,
# features and fast paths run each distinct architecture once; the checks where the depth itself
# matters (parity with timm, torch.export of the deep models, DeepLabv3+ backbones) run them all.
SAME_CODE_AS = {"xception65": "xception41", "xception65p": "xception41p"}


def distinct_models() -> list[str]:
    """Every registered model but those that repeat another's code with more blocks."""
    return [name for name in list_models() if name not in SAME_CODE_AS]
