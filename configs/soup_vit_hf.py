"""Model soups of a Hugging Face ViT fine-tuned K times on CIFAR-10, vanilla vs TNA-PFN (the
paper souped fine-tuned ViTs). Meant for a GPU: ViT-B/16 sees 224x224 images (CIFAR-10's
32x32 are resized to the checkpoint's image_size inside the model, as its image processor
would).

Needs the checkpoint (config.json, model.safetensors), fetched once on a machine with
internet, e.g. `huggingface-cli download google/vit-base-patch16-224-in21k --local-dir=vit-base`,
and CIFAR-10 prepared for TFDS (see tna_jax/core/data.py). The classifier gets 10 labels (a
head of another size is re-initialized, one head init shared by every model).

python -m tna_jax.main --config=configs/soup_vit_hf.py --workdir=workdirs/soup_vit_hf \
  --config.base.path=vit-base --config.data_dir=DIR

Each variant's uniform and greedy soups are also written as Hugging Face checkpoints,
WORKDIR/hf/<variant>_<uniform|greedy>/, which `transformers` loads with `from_pretrained`.
"""

from tna_jax.config import loader


def get_config(arg=None):
  config = loader.defaults("soup")
  config.dataset = "cifar10"
  config.base.update(source="hf", path="vit-base")  # a local copy of google/vit-base-patch16-224-in21k (or gs://...)
  config.optimizer.update(name="adamw", learning_rate=3e-5, schedule="cosine", warmup_steps=200, weight_decay=0.1)
  config.batch_size = 64
  config.eval_batch_size = 256
  config.split.update(start=0, num_train=20000, num_heldout=5000)
  config.soup.update(num_models=8, lr_factors="0.3,1,3", epochs="2,4", augment="none,flip,crop,flip+crop",
                     crop_padding=4)
  return loader.apply_preset(config, arg)
