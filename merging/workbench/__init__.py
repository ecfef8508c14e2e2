"""The app's session logic, free of any UI toolkit: what each button of the page does.

A :class:`Session` is the small, per-browser-tab state (which experts, their task data, the
importance map, the per-layer plan with the user's overrides, the merge history). Heavy objects —
the :class:`ExpertSet`, its :class:`MergeEngine`, the prober, the merged bodies — live in a process-wide cache keyed by the expert selection (:func:`models_for`),
bounded by bytes (``MERGE_LAB_CACHE_BYTES``), so two tabs that pick the same experts share them
and a tab never holds model weights itself.

Results that are a pure function of their inputs — an importance map, a merge, a probe of a merge,
an export — are cached across sessions under a content hash of those inputs (:class:`ResultCache`,
:func:`merge_key`): a class of 30 pressing the same buttons waits for the work once. A merged body
evicted under memory pressure is rebuilt from what the session recorded when it merged.

Everything a user can send is checked here (``check_*``: numbers, choices, uploads, safetensors
headers), whatever the route — the browser's widgets or the HTTP API. Every user-facing failure is
a :class:`MergeLabError` with a plain-language message that names the field or the tensor.

The package is one module per step of the page, in the order the page runs them:

- ``limits`` — every number, choice and seed a handler receives, checked on the server;
- ``cache`` — the byte-bounded model cache and the content-hashed result cache;
- ``session`` — per-tab state and the demo zoo; ``preflight`` — broken files found before use;
- ``experts`` — loading and checking a selection; ``importance`` — APL importance;
- ``prepare`` — data-aware methods' inputs through their declared ``prepare`` (snapshot, cache);
- ``plan`` — per-layer drop ratios and weights with overrides and presets; ``merge``; ``probe``;
- ``export``; ``history`` — the session's merges as JSON; ``views`` — numbers behind each chart;
- ``estimates`` — how long a long step takes here (measured rate × units); ``guide`` — the guided walk.

Everything is re-exported here, so ``from merging import workbench as wb; wb.merge(...)`` is the API.
"""

from .. import zoo as _zoo  # noqa: F401  (registers the zoo: reference scheme the page's refs use)
from ..errors import MergeLabError  # noqa: F401
from ..io.names import check_name, derive_name, safe_join  # noqa: F401
from .budget import check_memory, estimate_step_bytes, max_experts, memory_budget_bytes  # noqa: F401
from .cache import (  # noqa: F401
    CACHE,
    CLIENTS,
    MAX_MERGES_KEPT,
    MERGE_STATS,
    RESULTS,
    ModelCache,
    Models,
    ResultCache,
    _release_freed_memory,
    cache_budget_bytes,
    content_hash,
    estimate_bytes,
    files_fingerprint,
    release_session,
    selection_key,
)
from .estimates import (  # noqa: F401
    EXACT_SCOPES,
    FULL_SCOPE,
    QUICK_SCOPE,
    SWEEP_RATIOS,
    calibrate,
    duration_text,
    exact_levels,
    forget_rates,
    rate_of,
    step_estimates,
    sweep_steps,
)
from .experts import (  # noqa: F401
    EXPERT_HEADERS,
    attach_task_data,
    data_status,
    expert_rows,
    head_size,
    load_experts,
    load_warnings,
    models_for,
    parse_extra_refs,
    task_vector_stats,
    tokenizer_for,
)
from .export import (  # noqa: F401
    clean_old_exports,
    export,
    export_tasks,
    exports_root,
    read_zip_names,
    retention_sweep,
    size_text,
    zip_is_stored,
)
from .generate import DEFAULT_NEW_TOKENS, MAX_NEW_TOKENS, generate_side_by_side  # noqa: F401
from .guide import STEPS as GUIDE_STEPS  # noqa: F401
from .guide import guide_line, next_step  # noqa: F401
from .history import (  # noqa: F401
    HISTORY_FORMAT,
    accuracy_changes,
    below_base,
    history_json,
    history_table,
    merge_changes,
    restore_history,
    save_history,
)
from .importance import Comparison, compare_interventions, compute_importance  # noqa: F401
from .limits import (  # noqa: F401
    DEFAULT_FEWSHOT,
    DEFAULT_METHOD,
    DROP,
    DTYPE_CHOICES,
    EXPORT_MAX_AGE,
    INTERVENTIONS,
    MAX_FEWSHOT,
    MAX_HISTORY_BYTES,
    MAX_PROBE_ROWS,
    MAX_SEED,
    MAX_SENTENCE_CHARS,
    MIN_FEWSHOT,
    MODES,
    PER_LAYER_KEYS,
    SWEEP_METHODS,
    WEIGHT,
    Progress,
    cell_param,
    check_cell,
    check_choice,
    check_dtype,
    check_fewshot,
    check_method,
    check_number,
    check_seed,
    check_shared,
    max_upload_bytes,
    method_spec,
    no_progress,
)
from .lm import (  # noqa: F401
    attach_data,
    attach_lm_data,
    is_lm_session,
    layer_swap_rows,
    layer_swap_shared,
    lm_probe_rows,
    run_lm_probe,
    set_layer_swap,
    suggest_layer_swap,
)
from .merge import (  # noqa: F401
    MergeSummary,
    build_recipe,
    clean_shared,
    expert_parameters,
    key_settings,
    merge,
    merge_key,
    merged_tensors,
    method_available,
    recipe_expert_params,
    settings_for,
)
from .plan import (  # noqa: F401
    apply_table,
    is_overridden,
    layer_swap_groups,
    layer_values,
    override_list,
    plan,
    preset_layer_swap,
    preset_uniform,
    reset_overrides,
    set_cell,
    suggestion,
    suggestion_source,
    table_rows,
    with_overrides,
)
from .preflight import MAX_HEADER_BYTES, accept_upload, check_safetensors, preflight_ref, scan_nonfinite  # noqa: F401
from .prepare import importance_id, prepared, snapshot, view_prepared  # noqa: F401
from .probe import drop_sweep, history_rows, predict, prober_for, run_probe  # noqa: F401
from .session import MergeInputs, Session, TaskData, ensure_zoo, open_default_zoo, zoo_refs  # noqa: F401
from .views import (  # noqa: F401
    conflict_data,
    cosine_data,
    fidelity_by_expert,
    fidelity_data,
    hidden_view,
    importance_maps,
    layer_answer,
    layer_importance,
    magnitude_data,
    unit_module_choices,
)
from .zoo_build import ZooStatus, demo_zoos, forget_zoo_builds, is_lm_zoo_name, lm_zoo_name, start_zoo_build, zoo_status  # noqa: F401
