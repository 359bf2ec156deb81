"""Training every method alike: the run of all pairs (``experiment``), one pair (``runner``), the loop
(``loop``) and its step (``step``) and state (``state``), optimizers, checkpoints, distributed training,
run folders and ablations."""
