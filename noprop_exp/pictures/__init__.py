"""Pictures of what a trained model does, logged under `pictures/` of its MLflow run.

Made at the end of training (`eval.pictures=true`) and on demand for a logged run with
`noprop-pictures RUN_ID`:

- `predictions.png`: a grid of random test images with predicted and true labels, wrong in red;
- `trajectories.png`: for a few test images, the class probabilities (softmax of the method's
  trajectory scores) at each block (DT) or at evenly spaced steps (CT, FM), noise first;
- `accuracy_by_step.png`: test accuracy read out at every block/step, and for DT each block's own
  argmax along the chain and with z_{t-1} drawn from q, next to the last block fed pure noise
  (the per-block diagnostics of docs/NOPROP_SPEC.md §2; also logged as metrics);
- `accuracy_vs_steps.png`: accuracy against the number of inference steps, one line per solver;
- `embedding.png`: prototype rows as images (paper Figure 2), or learned rows in 2-D by PCA.

A picture that would have nothing to show (a run without a step sweep, a fixed one-hot embedding)
is skipped, and `pictures/notes.txt` says why.

The package has three layers, each importable without the ones above it:

- `measures`: the numbers behind the pictures, from a `Method` (torch only);
- `figures`: pure builders, tensors and lists in, `matplotlib.figure.Figure` out;
- `logged`: one run's whole set, made from its `Method` and logged into MLflow; `cli`, the
  `noprop-pictures` command.

This file imports none of them, so `import noprop_exp.pictures.measures` loads no matplotlib.
"""
