"""Training: the settings of a run, data and batches, the resumable training loops of the Mixer
and the Energy MetaFormer, evaluation, and data-parallel training over MPI/NCCL ranks."""
