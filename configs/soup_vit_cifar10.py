"""Model soups of ViTs on CIFAR-10 (needs CIFAR-10 prepared for TFDS: see tna_jax/core/data.py).

From a big_vision ViT checkpoint (the paper souped fine-tuned CLIP ViT-B/32s):
  --config.base.source=big_vision_npz --config.base.path=ViT.npz plus the checkpoint's
  model knobs (e.g. ViT-Ti/16: width=192 depth=12 num_heads=3 mlp_dim=768 patch_size=16;
  position embeddings are resampled to 32x32 inputs). By default the base is pretrained
  here on CIFAR-10 classes 0-4.

python -m tna_jax.main --config=configs/soup_vit_cifar10.py --workdir=workdirs/soup_vit_cifar10 \
    --config.data_dir=DIR
"""

from tna_jax.config import loader


def get_config(arg=None):
  config = loader.defaults("soup")
  config.dataset = "cifar10"
  config.model.update(patch_size=4, depth=6, width=192, num_heads=3, mlp_dim=768, pool="gap")
  config.pretrain.update(start=0, num_train=25000, classes="0/1/2/3/4", num_epochs=30)
  config.split.update(start=25000, num_train=20000, num_heldout=5000)
  config.soup.update(num_models=12, lr_factors="0.3,1,3", epochs="5,10", augment="flip,crop,flip+crop",
                     crop_padding=4)
  return loader.apply_preset(config, arg)
