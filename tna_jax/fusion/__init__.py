"""Fusing models fine-tuned from one base: the base itself (pretrained, grafted, loaded from
orbax or big_vision .npz), label tasks, model soups (uniform, greedy), merging operators (task
arithmetic, TIES, DARE) and ColD fusion."""
