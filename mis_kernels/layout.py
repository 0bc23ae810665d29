"""The stream layout's vocabulary, importable without JAX (the planner in models/plan.py writes
it, the kernels beside this file read it; an ingress process imports the planner's Mode)."""

POOL, STREAM = 0, 1  # where a block's prefix keys are: `BlockMeta.prefix[:, 0]`
PREFIX = ("source", "start", "len")  # columns of `BlockMeta.prefix`, one row per block
OWN = ("takes", "start", "len", "pos")  # columns of `BlockMeta.own`, one row per block
# Which tokens of a block take its prefix (`own[:, 0]`): none (a causal run), all (items), or
# those after the block's first sequence (a query's run ends in the block, its items follow).
TAKES_NONE, TAKES_ALL, TAKES_AFTER_RUN = 0, 1, 2
