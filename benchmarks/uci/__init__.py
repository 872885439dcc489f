"""Gal & Ghahramani (2016)'s UCI regression benchmark for MC dropout (``python -m benchmarks.uci``).

data.py      the published splits and hyper-parameter grids on disk
protocol.py  the paper's protocol: grid search, final training, test metrics
stacked.py   many small dropout MLPs trained and sampled as one stacked network
baselines.py heteroscedastic MC dropout, Concrete dropout and Deep Ensembles on the same splits
bo.py        1-D Bayesian optimisation (GP, expected improvement) of τ, for the ICML ablation
results.py   per-split results and their summary over splits
store.py     uci.csv / uci.json merged run by run, uci.md regenerated
report.py    uci.md: our numbers next to the published ones
cli.py       the command line
"""
