"""The one runtime configuration: its defaults, its validation, and that export, the artifact and attach agree on it."""

from __future__ import annotations

import pytest
import torch

from alvts_calib import (
    DEFAULT_BUDGET,
    DEFAULT_SKIPPED_KEYS,
    AlvtsError,
    Budget,
    RuntimeConfig,
    SkippedKeys,
    SkippedUpdate,
    attach,
    calibrate,
    detach,
    export,
    load_selector,
)


def test_defaults_are_the_toolkits_runtime_and_strings_are_parsed():
    config = RuntimeConfig()
    assert (config.budget, config.skipped_keys, config.skipped_update) == (DEFAULT_BUDGET, DEFAULT_SKIPPED_KEYS, None)
    assert config.resolved(has_fitted_maps=True).skipped_update is SkippedUpdate.LINEAR
    assert config.resolved(has_fitted_maps=False).skipped_update is SkippedUpdate.NONE
    parsed = RuntimeConfig(budget="uniform", skipped_keys="drop", skipped_update="mean")
    assert (parsed.budget, parsed.skipped_keys, parsed.skipped_update) == (
        Budget.UNIFORM, SkippedKeys.DROP, SkippedUpdate.MEAN
    )
    assert parsed.replace(skipped_keys=None, budget="adaptive").budget is Budget.ADAPTIVE  # None leaves a field
    with pytest.raises(AlvtsError, match="skipped_keys must be one of drop, pool"):
        RuntimeConfig(skipped_keys="everything")


@pytest.mark.parametrize(
    ("config", "kwargs", "message"),
    [
        (RuntimeConfig(keep_ratio=0.0), {}, "keep ratio must be in"),
        (RuntimeConfig(keep_ratios={3: 1.5}), {}, "layer 3's keep ratio must be in"),
        (RuntimeConfig(skipped_keys="drop", skipped_update="stand-in"), {}, "does not have; use skipped_keys 'pool'"),
        (RuntimeConfig(skipped_update="linear"), {"routed_layers": [1, 2], "fitted_layers": [1]},
         r"needs fitted skip updates for layers \[2\]"),
        (RuntimeConfig(keep_ratio=0.1, skipped_keys="drop"), {"exporting": True}, "measured with pooled skipped keys"),
        (RuntimeConfig(), {"exporting": True}, "export needs a keep ratio"),
    ],
)
def test_validate_names_what_cannot_run(config, kwargs, message):
    with pytest.raises(AlvtsError, match=message):
        config.validate(**kwargs)


def test_the_artifact_records_the_config_and_attach_runs_it(tiny_case, tmp_path):
    case = tiny_case("llava", "sdpa")
    calibration = calibrate(case.model, [case.inputs], rank=16, refine_steps=0, sensitivity_samples=0, progress=False)
    config = RuntimeConfig(keep_ratio=0.5, budget="adaptive-update")
    by_config = export(calibration, tmp_path / "config.safetensors", config=config)
    by_options = export(calibration, tmp_path / "options.safetensors", keep_ratio=0.5, budget="adaptive-update")
    assert (tmp_path / "config.safetensors").read_bytes() == (tmp_path / "options.safetensors").read_bytes()
    with pytest.raises(AlvtsError, match="either a RuntimeConfig or"):
        export(calibration, tmp_path / "both.safetensors", keep_ratio=0.5, config=config)

    runtime = load_selector(tmp_path / "config.safetensors").runtime
    assert runtime == by_config.runtime == by_options.runtime
    assert (runtime.keep_ratio, runtime.budget, runtime.skipped_keys) == (0.5, Budget.ADAPTIVE_UPDATE, SkippedKeys.POOL)
    assert runtime.skipped_update is SkippedUpdate.LINEAR  # the calibration fitted skip maps
    assert runtime.keep_ratios == by_config.keep_ratios and runtime.importance is calibration.importance

    def logits(**options) -> torch.Tensor:
        attach(case.model, tmp_path / "config.safetensors", **options)
        try:
            with case.routing():
                return case.model(**case.inputs).logits
        finally:
            detach(case.model)

    recorded = logits()
    assert torch.equal(logits(config=runtime), recorded)
    assert torch.equal(logits(config=runtime.replace(skipped_update="mean")), logits(skipped_update="mean"))
    uniform = RuntimeConfig(keep_ratio=0.25, skipped_update="linear")  # no per-layer ratios: one for every layer
    assert torch.equal(logits(config=uniform), logits(keep_ratio=0.25))
