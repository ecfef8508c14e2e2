"""Names and defaults the data-aware method declarations need at import time.

Kept apart from the measurement code (importance, calibration, Fisher) so that declaring a
method — what ``merging.methods.get_method("ties")`` does for every method — loads no scipy,
no transformers and no importance machinery: those load only when a data-aware method prepares.
"""

from __future__ import annotations

from ..params import PER_LAYER, SHARED, ParamSpec

#: APL's calibration defaults (mean drop ratio p̄, temperatures τ1/τ2, smallest keep rate, λ) and its
#: variants' options (issue #14), measured by benchmarks/bench_apl_variants.py (RESULTS-apl-variants.md:
#: both zoo settings, seeds 0–2, each row's λ chosen by few-shot loss). By the selected few-shot loss
#: alone: importance_at = merged won on four experts (0.814 vs 0.843) but lost on the pair (0.751 vs
#: 0.739), so it stays "base"; locate lost (1.019, 0.742); saliency with 1/keep was far worse than
#: without (1.195 vs 0.802 on four experts), so saliency_rescale stays off; drop = saliency (no rescale)
#: won in both settings (0.802 vs 0.843, 0.650 vs 0.739) — the protocol picks it — but "random" stays
#: the default here, for the reasons the results file gives: saliency chooses its entries with the
#: gradient of the very few-shot loss it is then scored on (in-sample entry by entry, where the other
#: rows fit a few numbers per layer), and a saliency default also needs recipes calibrated by the CLI
#: (which skip prepare) to carry its scores. Scored on a held-out few-shot draw (disjoint from the one
#: saliency fits its mask to) saliency is not lower in both settings (0.927 vs 0.876 on four experts,
#: 0.792 vs 0.795 on the pair), nor is the merged point (0.857 vs 0.876; 0.797 vs 0.795): the protocol
#: keeps drop = random and importance_at = base (benchmarks/RESULTS-apl-variants.md).
DEFAULTS = {"drop_ratio": 0.5, "tau1": 2.0, "tau2": 2.0, "q_min": 0.01, "lambda": 1.0,
            "drop": "random", "saliency_rescale": False, "importance_at": "base"}
#: how APL drops inside a layer: one rate for every entry, or per hidden-state unit
WITHIN_LAYER = ("uniform", "hidden")
#: engine extras key of APL's per-unit percentile profiles (a PerTensor input)
UNIT_EXTRAS = "apl_unit_percentiles"
#: engine extras key of APL's element saliency |g ⊙ Δ| per droppable tensor and expert (drop = "saliency")
SALIENCY_EXTRAS = "apl_saliency"
#: where APL measures importance: at the base (the paper's intervention) or at the task-arithmetic merge
IMPORTANCE_POINTS = ("base", "merged")
#: engine extras key of the Fisher diagonals (a PerTensor input, split along rows)
FISHER_EXTRAS = "fisher"

# APL's calibration parameters, declared once: the method's declaration, the calibration's checks, the
# app's controls and the CLI all read these (ranges are never typed twice).
MEAN_DROP = ParamSpec("drop_ratio", "float", DEFAULTS["drop_ratio"],
                      "Mean drop ratio p̄: on average, the share of each expert's change that is thrown away (weighted by "
                      "parameter count; with random dropping what is kept is scaled up to make up for it). APL's per-layer suggestions "
                      "— or your per-layer overrides — spread it over the layers, less dropped where it matters.", PER_LAYER, 0.0, 0.999)
TAU1 = ParamSpec("tau1", "float", DEFAULTS["tau1"],
                 "Temperature τ1: how strongly importance shapes the per-layer drop ratios. Small = important "
                 "layers keep much more of their change; very large = every layer drops the same share (plain "
                 "DARE, random dropping).", SHARED, 1e-3, 1e12)
TAU2 = ParamSpec("tau2", "float", DEFAULTS["tau2"],
                 "Temperature τ2: how strongly importance shapes each expert's merge weight in a layer. Small = "
                 "the expert whose change matters most there dominates; very large = every expert weighs the same.",
                 SHARED, 1e-3, 1e12)
Q_MIN = ParamSpec("q_min", "float", DEFAULTS["q_min"], "q_min: the smallest share of its change any layer or unit keeps, so "
                  "no part is dropped entirely.",
                  SHARED, 0.0, 0.5)
WITHIN = ParamSpec("within_layer", "choice", "uniform",
                   "Inside a layer: one drop ratio for every entry, or per hidden-state unit by importance rank.",
                   SHARED, choices=WITHIN_LAYER)
IMPORTANCE_AT = ParamSpec("importance_at", "choice", DEFAULTS["importance_at"],
                          "Where importance is measured. base: each part of an expert's change is switched on alone "
                          "at the base model (the paper's test). merged: each part is switched off at the plain "
                          "task-arithmetic merge (base + λ × every expert's change), so a part that clashes with "
                          "the other experts' changes shows it. Merged costs one extra gradient pass per expert.",
                          SHARED, choices=IMPORTANCE_POINTS)
