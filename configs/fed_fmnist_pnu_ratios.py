"""FedPNU's mask-ratio series at the paper's federated settings: FedAvg and FedPNU at mask
ratios 0.1, 0.3, 0.5, 0.7 and 0.9 ('fedpnu@RATIO'), one table row and one accuracy curve per
ratio. Everything else is configs/fed_fmnist_paper.py, rounds included, so its FedAvg row
compares with that config's; six algorithms instead of four take about 1.5 times as long.

With the paper's 1 local epoch, FedPNU trains the reverse of its mask from the start (see
fed_fmnist_paper.py): ratio r leaves 1 - r of the entries frozen at the server's values. To
alternate mask and reverse within a round add --config.local_epochs=2; to redraw the mask
every round, --config.mask.redraw=every_round. 'fedpfn@RATIO' gives FedPFN's series the same way.

python -m tna_jax.main --config=configs/fed_fmnist_pnu_ratios.py --workdir=workdirs/fed_fmnist_pnu_ratios
"""

from tna_jax.config import loader

RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)


def get_config(arg=None):
  config = loader.load_module(loader.config_dir() / "fed_fmnist_paper.py").get_config(arg)
  config.algorithms = ",".join(["fedavg"] + [f"fedpnu@{ratio:g}" for ratio in RATIOS])
  return config
