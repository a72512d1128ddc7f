"""ColD fusion of a byte-level Transformer with LoRA on GLUE, vanilla vs TNA-PFN on the
adapters (needs GLUE prepared for TFDS: `tfds build glue/sst2 ... --file_format=array_record`).

As in the paper's ColD setting (RoBERTa-base + LoRA r=8), only the LoRA adapters and the
heads train, and the TNA-PFN mask fixes a fraction of the adapter entries. With no
pretrained text model offline, the base is the seeded initialization unless
--config.base.source=orbax --config.base.path=CKPT gives one.

python -m tna_jax.main --config=configs/cold_glue.py --workdir=workdirs/cold_glue --config.data_dir=DIR
"""

from tna_jax.config import loader


def get_config(arg=None):
  config = loader.defaults("cold")
  config.dataset = "glue"
  config.model.update(name="text_transformer", depth=4, width=256, num_heads=4, mlp_dim=1024, pool="gap",
                      lora_rank=8, lora_alpha=16.0)
  config.base.source = "init"
  config.finetune.trainable = "lora|head"
  config.mask.include = "lora"
  config.cold.update(tasks="sst2,qnli,mnli,qqp", unseen_tasks="rte,mrpc", rounds=5, epochs_per_round=1,
                     examples_per_task=20000, max_len=128)
  config.num_test = 2000
  return loader.apply_preset(config, arg)
