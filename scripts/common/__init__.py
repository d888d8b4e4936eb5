"""Shared infrastructure of the training jobs (`scripts/train_*.py`) and the demo.

One concept per module: the run folder and its logs (`run_folder`), atomic checkpoints with
verified resume (`checkpoint`), the learning-rate schedule (`schedule`), an EMA of weights
(`ema`), non-finite step guards (`guards`), fault injection for the kill tests (`faults`), the
wall-clock budget (`budget`), the deterministic step sampler (`sampler`), argument checks
(`validation`), in-training validation metrics (`evaluation`), optimizer groups (`optim`), PNG
grids (`images`), the tokenizer job's GAN objective (`vqgan_objective`), the shared flags,
train state and step loop (`loop`), the run folder's curves.png (`curves`) and the demo's
metrics report (`demo_report`). Only the jobs parse arguments; model code stays free of
optimizers and logging.
"""
