"""`alvts` CLI: calibrate, export, inspect and generate, each mapping onto one library call."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from alvts_calib import attach, calibrate, export, load_calibration
from alvts_calib.artifact import SELECTOR_FORMAT, read_metadata
from alvts_calib.calibration import CALIBRATION_FORMAT
from alvts_calib.capture import input_device, move
from alvts_calib.demo import DEMO_NAME, demo_model, demo_samples
from alvts_calib.doctor import diagnose
from alvts_calib.errors import AlvtsError
from alvts_calib.importance import Importance
from alvts_calib.solver import Init

from .report import budget_description, console, doctor_tables, fidelity_table, key_value_table, print_json

app = typer.Typer(
    help="ALVTS: calibrate, export and attach layer-wise visual token selectors for transformers LVLMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
_state = {"debug": False}

ModelOption = Annotated[
    Path | None,
    typer.Option(help="Local transformers model directory (from_pretrained). Default: the built-in tiny demo model."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


@app.callback()
def _main(debug: Annotated[bool, typer.Option(help="Show full tracebacks on errors.")] = False) -> None:
    _state["debug"] = debug


def _load(model_path: Path | None, dtype: str, attn: str, device: str | None) -> tuple[Any, str]:
    if model_path is None:
        return demo_model(attn), DEMO_NAME
    from alvts_calib.loading import load_model

    return load_model(model_path, dtype=dtype, attn_implementation=attn, device=device), str(model_path)


def _samples(model: Any, model_path: Path | None, data: Path | None, num_samples: int | None) -> list[dict]:
    if model_path is None and data is None:
        return demo_samples(model, num_samples or 16)
    if data is None:
        raise AlvtsError(
            "--data is required with --model: a JSONL of {image, prompt}, an image folder or a saved dataset"
        )
    if model_path is None:
        raise AlvtsError("--data needs --model: the built-in demo model has no processor for real images")
    from alvts_calib.data import build_samples, load_records
    from alvts_calib.loading import load_processor

    samples, report = build_samples(load_records(data), load_processor(model_path), num_samples=num_samples)
    print(f"data: {report.summary()}", file=sys.stderr)
    return samples


@app.command("calibrate")
def calibrate_command(
    out: Annotated[Path, typer.Option(help="Where to write the calibration (.safetensors).")] = Path(
        "alvts-calibration.safetensors"
    ),
    model: ModelOption = None,
    data: Annotated[Path | None, typer.Option(help="Calibration data: JSONL, image folder or saved dataset.")] = None,
    num_samples: Annotated[int | None, typer.Option(help="Use the first N samples (default: all; demo: 16).")] = None,
    rank: Annotated[int | None, typer.Option(help="Selector rank, a multiple of head_dim (default 2 heads).")] = None,
    start_layer: Annotated[int, typer.Option(help="First routed layer (layer 0 is never routed).")] = 1,
    importance: Annotated[Importance, typer.Option(help="Importance definition.")] = Importance.PAPER,
    init: Annotated[Init, typer.Option(help="Selector initialisation.")] = Init.WEIGHT_SVD,
    refine_steps: Annotated[int, typer.Option(help="Importance-consistency refinement steps per layer.")] = 200,
    seed: Annotated[int, typer.Option(help="Random seed (results are deterministic for a seed).")] = 0,
    dtype: Annotated[str, typer.Option(help="Model dtype: auto, float32, float16, bfloat16.")] = "auto",
    attn_implementation: Annotated[str, typer.Option(help="eager, sdpa or flash_attention_2.")] = "sdpa",
    device: Annotated[str | None, typer.Option(help="device_map for loading, e.g. cuda or auto.")] = None,
    resume: Annotated[bool, typer.Option(help="Resume from OUT.partial.safetensors if present.")] = True,
    json_output: JsonOption = False,
) -> None:
    """Run the model over a calibration set and solve a selector for every routed decoder layer."""
    loaded, name = _load(model, dtype, attn_implementation, device)
    samples = _samples(loaded, model, data, num_samples)
    checkpoint = out.with_name(out.name + ".partial.safetensors")
    if not resume and checkpoint.exists():
        checkpoint.unlink()
    result = calibrate(
        loaded, samples, rank=rank, start_layer=start_layer, importance=importance, init=init,
        refine_steps=refine_steps, seed=seed, checkpoint=checkpoint, progress=not json_output,
    )
    result.metadata["model"] = name
    result.save(out)
    checkpoint.unlink(missing_ok=True)
    ratio = result.metadata["options"]["report_keep_ratio"]
    fidelity = {str(i): result.fidelity(i, ratio) for i in sorted(result.layers)}
    if json_output:
        print_json({"out": str(out), "model": name, "summary": result.metadata["summary"], "fidelity": fidelity})
        return
    console.print(fidelity_table(fidelity))
    summary = result.metadata["summary"]
    console.print(
        f"calibrated {len(result.layers)} layers of {name} on {summary['samples']} samples "
        f"in {summary['seconds']:.1f} s (fidelity at keep ratio {ratio}) -> {out}"
    )


@app.command("export")
def export_command(
    calibration: Annotated[Path, typer.Argument(help="Calibration file written by `alvts calibrate`.")],
    keep_ratio: Annotated[float, typer.Option(help="Share of visual tokens each routed layer keeps, in (0, 1].")],
    out: Annotated[Path, typer.Option(help="Selector artifact to write (.safetensors).")] = Path(
        "alvts-selector.safetensors"
    ),
    rank: Annotated[int | None, typer.Option(help="Export at a lower rank than calibrated (leading heads).")] = None,
    dtype: Annotated[str, typer.Option(help="Stored dtype: float32, float16 or bfloat16.")] = "float32",
    budget: Annotated[str, typer.Option(
        help="uniform: KEEP_RATIO in every layer; adaptive (equal coverage) or adaptive-mass (water-filling): "
        "the same average visual tokens per routed layer, spread by calibration statistics.")] = "uniform",
    json_output: JsonOption = False,
) -> None:
    """Write a selector artifact (safetensors + metadata) from a calibration."""
    selector = export(load_calibration(calibration), out, keep_ratio=keep_ratio, rank=rank, dtype=dtype,
                      budget=budget)
    keep_ratios = {str(index): ratio for index, ratio in selector.keep_ratios.items()}
    if json_output:
        print_json({"out": str(out), **selector.metadata, "keep_ratios": keep_ratios})
        return
    console.print(fidelity_table(selector.metadata["fidelity"], keep_ratios))
    console.print(f"exported {len(selector.layers)} routed layers, {budget_description(selector.metadata)}, rank "
                  f"{selector.metadata['rank']} -> {out}")


@app.command("inspect")
def inspect_command(
    path: Annotated[Path, typer.Argument(help="A selector artifact or a calibration file.")],
    json_output: JsonOption = False,
) -> None:
    """Show what an artifact is, for which model, how it was made and how good it is per layer."""
    metadata = read_metadata(path, SELECTOR_FORMAT, CALIBRATION_FORMAT)
    if json_output:
        print_json(metadata)
        return
    fingerprint = metadata["fingerprint"]
    rows = {
        "format": f"{metadata['format']} v{metadata['format_version']}",
        "family": fingerprint["family"],
        "model": f"{fingerprint['num_layers']} layers, hidden {fingerprint['hidden_size']}, "
        f"{fingerprint['num_heads']} heads ({fingerprint['num_kv_heads']} kv), head_dim {fingerprint['head_dim']}",
        "importance": metadata.get("importance", metadata.get("options", {}).get("importance")),
    }
    if metadata["format"] == SELECTOR_FORMAT:
        rows.update({"rank": metadata["rank"], "keep ratio": metadata["keep_ratio"],
                     "budget": budget_description(metadata), "start layer": metadata["start_layer"],
                     "calibration": metadata["calibration"]})
        console.print(key_value_table(str(path), rows))
        console.print(fidelity_table(metadata["fidelity"], metadata["keep_ratios"]))
        return
    rows.update({"options": metadata["options"], "summary": metadata["summary"], "model": metadata.get("model")})
    console.print(key_value_table(str(path), rows))


@app.command("generate")
def generate_command(
    selector: Annotated[Path, typer.Option(help="Selector artifact to attach.")],
    model: ModelOption = None,
    image: Annotated[Path | None, typer.Option(help="Image file (required with --model).")] = None,
    prompt: Annotated[str, typer.Option(help="Prompt text.")] = "Describe the image.",
    keep_ratio: Annotated[float | None, typer.Option(help="Override the artifact's keep ratio.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 16,
    dtype: Annotated[str, typer.Option(help="Model dtype: auto, float32, float16, bfloat16.")] = "auto",
    attn_implementation: Annotated[str, typer.Option(help="eager, sdpa or flash_attention_2.")] = "sdpa",
    device: Annotated[str | None, typer.Option(help="device_map for loading, e.g. cuda or auto.")] = None,
    json_output: JsonOption = False,
) -> None:
    """Attach a selector and generate, reporting the KV cache each layer kept."""
    loaded, name = _load(model, dtype, attn_implementation, device)
    if model is None:
        inputs, decode = demo_samples(loaded, 1)[0], None
    else:
        inputs, decode = _prompt_inputs(model, image, prompt)
    attach(loaded, selector, keep_ratio=keep_ratio)
    inputs = move(inputs, input_device(loaded))
    started = time.perf_counter()
    with torch.no_grad():
        output = loaded.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True)
    seconds = time.perf_counter() - started
    new_tokens = output.sequences[:, inputs["input_ids"].shape[1] :]
    texts = decode(new_tokens) if decode else [row.tolist() for row in new_tokens]
    cache = [layer.keys.shape[-2] for layer in output.past_key_values.layers]
    payload = {"model": name, "outputs": texts, "kv_cache_tokens_per_layer": cache, "seconds": seconds}
    if json_output:
        print_json(payload)
        return
    for text in texts:
        console.print(f"output: {text}")
    console.print(f"KV cache tokens per layer: {cache} ({seconds:.2f} s)")


def _prompt_inputs(model: Path, image: Path | None, prompt: str) -> tuple[dict, Any]:
    import datasets

    from alvts_calib.data import build_samples
    from alvts_calib.loading import load_processor

    if image is None:
        raise AlvtsError("--image is required with --model")
    if not image.is_file():
        raise AlvtsError(f"{image}: image file not found")
    processor = load_processor(model)
    records = datasets.Dataset.from_list([{"image": str(image.resolve()), "prompt": prompt}])
    samples, _ = build_samples(records, processor)
    return samples[0], lambda tokens: processor.batch_decode(tokens, skip_special_tokens=True)


@app.command("doctor")
def doctor_command(json_output: JsonOption = False) -> None:
    """Show versions, GPUs, usable attention backends and supported model families."""
    diagnosis = diagnose()
    if json_output:
        print_json(diagnosis.to_dict())
        return
    console.print(doctor_tables(diagnosis))


def main() -> None:
    """Console entry point: user errors print one line and exit 1 unless --debug."""
    try:
        app()
    except (AlvtsError, OSError, ValueError) as error:
        if _state["debug"]:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
