"""Causal language models: what makes an LM expert measurable and probeable beside the classifiers.

- :mod:`.model` — building a causal LM from an expert's config (never remote code), binding its
  parameters to the base's tensor names, tokenising prompt/completion examples once, and the mean
  next-token cross-entropy over the completion tokens;
- :mod:`.probe` — loss and perplexity of base, experts and merges on held-out text per task.

APL, calibration and Fisher reach the LM loss through :mod:`merging.apl.taskloss` (the one task-loss
interface), not through a second code path. Nothing here knows the demo zoo.
"""
