"""The paper's ColD setting: RoBERTa-base from a Hugging Face checkpoint with LoRA r=8 on GLUE,
vanilla vs TNA-PFN on the adapters. Meant for a GPU (RoBERTa-base: 125M parameters, 4
contributors x 2 variants fine-tuned side by side each round).

Needs the checkpoint (config.json, model.safetensors, tokenizer.json), fetched once on a
machine with internet, e.g. `huggingface-cli download FacebookAI/roberta-base --local-dir=roberta-base`,
and GLUE prepared for TFDS: `tfds build glue/sst2 ... --file_format=array_record`. Texts are
tokenized with the checkpoint's tokenizer.json (pairs as <s> a </s></s> b </s>).

python -m tna_jax.main --config=configs/cold_glue_roberta.py --workdir=workdirs/cold_glue_roberta \
  --config.base.path=roberta-base --config.data_dir=DIR

The final fused base of each variant is also written as a Hugging Face checkpoint,
WORKDIR/hf/<variant>_round<rounds>/, which `transformers` loads with `from_pretrained`.
"""

from tna_jax.config import loader


def get_config(arg=None):
  config = loader.defaults("cold")
  config.dataset = "glue"
  config.base.update(source="hf", path="roberta-base")  # a local copy of FacebookAI/roberta-base (or gs://...)
  config.model.update(lora_rank=8, lora_alpha=16.0)  # LoRA on attention and MLP projections
  config.finetune.trainable = "lora|head"
  config.mask.include = "lora"
  config.optimizer.update(learning_rate=5e-4, schedule="cosine", warmup_steps=100)
  config.batch_size = 32
  config.eval_batch_size = 256
  config.cold.update(tasks="sst2,qnli,mnli,qqp", unseen_tasks="rte,mrpc", rounds=5, epochs_per_round=1,
                     examples_per_task=20000, max_len=128)
  config.num_test = 2000
  return loader.apply_preset(config, arg)
