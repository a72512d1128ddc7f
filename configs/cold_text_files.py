"""ColD fusion from a Hugging Face checkpoint on a text_files dataset, offline on a CPU: a
tiny RoBERTa (2 layers, width 32) with LoRA r=4, vanilla vs TNA-PFN on the adapters.

Make the dataset (four topics, label = topic) and the checkpoint first; nothing is
downloaded, and neither PyTorch nor transformers is needed:

python -m tna_jax.fusion.tiny_hf --out=/tmp/tiny_hf
python -m tna_jax.main --config=configs/cold_text_files.py --workdir=workdirs/cold_text_files

The tasks relabel the four topics (as the image tasks of cold relabel classes), each on its
own training examples. Compare the mask rules with --config.mask.select=magnitude_small
(or magnitude_large; README, "Starting from pretrained models").
"""

from tna_jax.config import loader


def get_config(arg=None):
  config = loader.defaults("cold")
  config.dataset = "text_files"
  config.data_dir = "/tmp/tiny_hf/data"  # train.jsonl, test.jsonl of `python -m tna_jax.fusion.tiny_hf`
  config.base.update(source="hf", path="/tmp/tiny_hf/roberta")
  config.model.update(lora_rank=4, lora_alpha=8.0)
  config.finetune.trainable = "lora|head"
  config.mask.include = "lora"
  config.optimizer.update(learning_rate=3e-3)
  config.batch_size = 64
  config.eval_batch_size = 512
  config.cold.update(tasks="0/1,2/3,0+2/1+3", unseen_tasks="0/1/2/3", rounds=3, epochs_per_round=2,
                     examples_per_task=512, start=0, max_len=32)
  return loader.apply_preset(config, arg)
