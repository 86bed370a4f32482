"""Sequence tasks for online learning, generated locally: spiking working-memory tasks
(delayed cue recall, delayed match-to-sample, evidence accumulation), the copy and adding
tasks, and MNIST-1D.

Every generator but `mnist1d` takes a JAX PRNG key and a batch size and returns a `Batch`
of time-major arrays, `inputs` `(T, B, n_in)`, with the targets of every step and a mask
of the steps whose loss counts. `evaluate` runs a model over such a batch and measures its
accuracy in the decision window and its firing rates.
"""

from ._adding import adding_task as adding_task
from ._batch import Batch as Batch
from ._copy import copy_task as copy_task
from ._cue_recall import cue_recall as cue_recall
from ._evaluate import Evaluation as Evaluation, evaluate as evaluate
from ._evidence import evidence_accumulation as evidence_accumulation
from ._match_to_sample import delayed_match_to_sample as delayed_match_to_sample
from ._mnist1d import mnist1d as mnist1d
