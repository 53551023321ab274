"""`alvts` CLI: calibrate, export, inspect and generate, each mapping onto one library call."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from alvts_calib import (
    DEFAULT_BUDGET,
    DEFAULT_SKIPPED_KEYS,
    Calibration,
    Importance,
    Init,
    RuntimeConfig,
    SkippedKeys,
    SkippedUpdate,
    attach,
    calibrate,
    export,
    load_calibration,
)
from alvts_calib.artifact import (
    CALIBRATION_FORMAT,
    SELECTOR_FORMAT,
    calibrated_layers,
    checkpoint_path,
    keep_ratio_at,
    load_artifact,
    read_metadata,
)
from alvts_calib.calibration import REFINE_EVALUATIONS, REFINE_STEPS, SENSITIVITY_SAMPLES, input_device, move
from alvts_calib.demo import (
    BUILTIN_MODEL_DIR,
    BUILTIN_NAME,
    CALIBRATION_SAMPLES,
    EVALUATION_SAMPLES,
    builtin_model,
    builtin_processor,
)
from alvts_calib.errors import AlvtsError, SampleError
from alvts_calib.evaluation import DEFAULT_COMPRESSIONS, DEFAULT_METHODS, METHODS
from alvts_calib.model import diagnose
from alvts_calib.options import DEFAULT_START_LAYER
from alvts_calib.outputs import atomic_write, check_output, input_files, output_lock
from alvts_calib.tokens import check_compression

from .report import (
    budget_description,
    console,
    doctor_tables,
    eval_markdown,
    eval_table,
    fidelity_table,
    key_value_table,
    kind_table,
    print_json,
)

app = typer.Typer(
    help="ALVTS: calibrate, export and attach layer-wise visual token selectors for transformers LVLMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help wraps long option names instead of cutting them
    context_settings={"max_content_width": 120},
)
_state = {"debug": False}
DEMO_TASK = "alvts_shapes"

ModelOption = Annotated[
    Path | None,
    typer.Option(help="Local transformers model directory (from_pretrained). Default: the built-in shapes demo model."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
SplitOption = Annotated[str | None, typer.Option(
    help="The split of --data to use, for a source with several (a dataset folder or name).")]
ImageColumnOption = Annotated[str, typer.Option(help="The column of --data holding the image (an image or a path).")]
PromptColumnOption = Annotated[str, typer.Option(help="The column of --data holding the prompt.")]
ChatTemplateOption = Annotated[Path | None, typer.Option(
    help="A Jinja chat template file for the processor (for processors without one, or to replace theirs): each "
    "prompt becomes a user turn after its image. Without one, prompts must hold the image token.")]


@app.callback()
def _main(debug: Annotated[bool, typer.Option(help="Show full tracebacks on errors.")] = False) -> None:
    _state["debug"] = debug


class Interrupted(BaseException):
    """Ctrl-C (SIGINT) in the console script: the command stops and says what was kept. Like KeyboardInterrupt it is
    no Exception, so no library swallows it; unlike it, click does not turn it into a bare "Aborted!"."""

    exit_code = 130


def _load(model_path: Path | None, dtype: str, attn: str, device: str | None) -> tuple[Any, str]:
    if model_path is None:
        return builtin_model("float32" if dtype == "auto" else dtype, attn, device), BUILTIN_NAME
    from alvts_calib.model import load_model

    return load_model(model_path, dtype=dtype, attn_implementation=attn, device=device), str(model_path)


def _processor(model_path: Path | None, chat_template: Path | None = None) -> Any:
    """The model's processor, with `chat_template` (a Jinja file) replacing its chat template when given."""
    if model_path is None:
        processor = builtin_processor()
    else:
        from alvts_calib.model import load_processor

        processor = load_processor(model_path)
    if chat_template is not None:
        if not chat_template.is_file():
            raise AlvtsError(f"--chat-template {chat_template}: no such file; pass a Jinja chat template file")
        processor.chat_template = chat_template.read_text(encoding="utf-8")
    return processor


def _max_tokens(model_path: Path | None) -> int | None:
    """The positions the model takes, read from its config (no weights are loaded)."""
    from alvts_calib.model import max_positions

    return max_positions(model_path or BUILTIN_MODEL_DIR)


def _records(model_path: Path | None, data: str | None, demo_split: str, count: int, **source: Any) -> Any:
    """The user's records (`source`: the split and column options of `load_records`), or the built-in demo's
    `demo_split` when neither --model nor --data is given."""
    if data is not None:
        from alvts_calib.data import load_records

        return load_records(data, **source)
    if model_path is not None:
        raise AlvtsError(
            "--data is required with --model: a JSONL of {image, prompt}, an image folder, a saved dataset, a "
            "parquet file or a dataset name"
        )
    from alvts_calib.demo import split_records

    return split_records(demo_split, count)


def _inputs(model_path: Path | None, data: str | None, records: Any, *files: Path) -> list[Path]:
    """Every file a command reads: the model's, the data's (its images too) and `files`."""
    paths = data is not None and getattr(records.features.get("image"), "dtype", None) in ("string", "large_string")
    images = [Path(image) for image in records["image"] if image] if paths else []
    return input_files([model_path or BUILTIN_MODEL_DIR, data, *files]) + images


@contextmanager
def _writing(outputs: list[Path | None], inputs: Iterable[Path]) -> Iterator[None]:
    """Hold every output's lock for the block, after checking none is a directory, a special file or an input."""
    given = [path for path in outputs if path is not None]
    inputs = list(inputs)
    targets = [check_output(path, inputs) for path in given]
    if len(set(targets)) < len(targets):
        raise AlvtsError(f"{' and '.join(map(str, given))} are the same file; give each output its own path")
    with ExitStack() as stack:
        for path in given:
            stack.enter_context(output_lock(path))
        yield


@app.command("calibrate")
def calibrate_command(
    out: Annotated[Path, typer.Option(help="Where to write the calibration (.safetensors).")] = Path(
        "alvts-calibration.safetensors"
    ),
    model: ModelOption = None,
    data: Annotated[str | None, typer.Option(
        help="Calibration data {image, prompt}: a JSONL file, an image folder with metadata.jsonl, a saved dataset, "
        "a parquet/csv/json file or folder, or a dataset name for datasets.load_dataset.")] = None,
    split: SplitOption = None,
    image_column: ImageColumnOption = "image",
    prompt_column: PromptColumnOption = "prompt",
    chat_template: ChatTemplateOption = None,
    num_samples: Annotated[
        int | None, typer.Option(help=f"Use the first N samples (default: all; demo: {CALIBRATION_SAMPLES}).")
    ] = None,
    rank: Annotated[int | None, typer.Option(
        help="Selector rank, a multiple of head_dim (default 2 heads, at least 256).")] = None,
    start_layer: Annotated[int, typer.Option(help="First routed layer; earlier layers process every token.")] = (
        DEFAULT_START_LAYER),
    importance: Annotated[Importance, typer.Option(
        help="Importance definition: text (attention the text rows give each visual token), paper (S_V2V x S_T2V) "
        "or last (the last position's attention).")] = Importance.TEXT,
    init: Annotated[Init, typer.Option(help="Selector initialisation.")] = Init.WEIGHT_SVD,
    refine_steps: Annotated[int, typer.Option(
        help="Importance-consistency refinement steps per layer.")] = REFINE_STEPS,
    skip_update_rank: Annotated[int | None, typer.Option(
        help="Rank of each layer's fitted update for skipped visual tokens (0: fit none; default hidden size / 8, "
        "at most 64).")] = None,
    sensitivity_samples: Annotated[int, typer.Option(
        help="Samples on which each layer's effect on the answer is measured, for --budget sensitivity at export "
        "(0: do not measure).")] = SENSITIVITY_SAMPLES,
    refine_compressions: Annotated[str, typer.Option(
        help="Comma-separated compressions, e.g. 0.89, at which to refine the sensitivity split with every layer "
        "routed at once (on the sensitivity samples); export with the same --compression to use it.")] = "",
    refine_evaluations: Annotated[int, typer.Option(
        help="Most splits evaluated per refined compression.")] = REFINE_EVALUATIONS,
    seed: Annotated[int, typer.Option(help="Random seed (results are deterministic for a seed).")] = 0,
    dtype: Annotated[str, typer.Option(help="Model dtype: auto, float32, float16, bfloat16.")] = "auto",
    attn_implementation: Annotated[str, typer.Option(help="eager, sdpa or flash_attention_2.")] = "sdpa",
    device: Annotated[str | None, typer.Option(help="device_map for loading, e.g. cuda or auto.")] = None,
    resume: Annotated[bool, typer.Option(help="Resume from OUT.partial.safetensors if present.")] = True,
    json_output: JsonOption = False,
) -> None:
    """Run the model over a calibration set and solve a selector for every routed decoder layer."""
    from alvts_calib.calibration import HELDOUT_FRACTION, REPORT_KEEP_RATIO, calibration_options
    from alvts_calib.data import build_samples
    from alvts_calib.model import check_load_options, model_config

    refined_at = _compressions(refine_compressions, "--refine-compressions") if refine_compressions else ()
    check_load_options(dtype, attn_implementation, device)
    calibration_options(
        model_config(model or BUILTIN_MODEL_DIR), rank=rank, start_layer=start_layer, importance=importance, init=init,
        refine_steps=refine_steps, heldout_fraction=HELDOUT_FRACTION, report_keep_ratio=REPORT_KEEP_RATIO, seed=seed,
        skip_update_rank=skip_update_rank, sensitivity_samples=sensitivity_samples, refine_compressions=refined_at,
        refine_evaluations=refine_evaluations,
    )
    records = _records(model, data, "calibration", num_samples or CALIBRATION_SAMPLES, split=split,
                       image_column=image_column, prompt_column=prompt_column)
    checkpoint = checkpoint_path(out)
    with _writing([out, checkpoint], _inputs(model, data, records)):
        samples, report = build_samples(records, _processor(model, chat_template), num_samples=num_samples,
                                        max_tokens=_max_tokens(model))
        print(f"data: {report.summary()}", file=sys.stderr)
        loaded, name = _load(model, dtype, attn_implementation, device)
        if not resume:
            checkpoint.unlink(missing_ok=True)
        started = time.perf_counter()
        try:
            result = calibrate(
                loaded, samples, rank=rank, start_layer=start_layer, importance=importance, init=init,
                refine_steps=refine_steps, skip_update_rank=skip_update_rank, sensitivity_samples=sensitivity_samples,
                refine_compressions=refined_at, refine_evaluations=refine_evaluations, seed=seed,
                checkpoint=checkpoint, progress=not json_output,
            )
        except SampleError as error:
            raise AlvtsError(f"{data or 'the demo data'} row {report.rows[error.index] + 1}: {error.reason}; fix or "
                             "remove that row") from error
        except (KeyboardInterrupt, Interrupted):
            saved = f"what was finished is saved in {checkpoint}" if checkpoint.exists() else "nothing was saved yet"
            raise Interrupted(f"interrupted; {saved}: rerun the same command to resume") from None
        seconds = time.perf_counter() - started
        result.metadata["model"] = name
        result.save(out)
        checkpoint.unlink(missing_ok=True)
    ratio = result.metadata["options"]["report_keep_ratio"]
    fidelity = {str(i): result.fidelity(i, ratio) for i in sorted(result.layers)}
    if json_output:
        print_json({"out": str(out), "model": name, "summary": result.metadata["summary"], "fidelity": fidelity,
                    "refined_budgets": result.metadata.get("refined_budgets", {}), "seconds": seconds})
        return
    console.print(fidelity_table(fidelity))
    summary = result.metadata["summary"]
    visual_tokens = summary["visual_tokens"]
    for count, entry in sorted(result.metadata.get("refined_budgets", {}).items(), key=lambda item: int(item[0])):
        console.print(
            f"refined the split at {entry['compression']:.0%} compression ({count} of {visual_tokens} tokens per "
            f"layer; export with --compression {entry['compression']:g}): next-token KL "
            f"{entry['divergence_before']:.4f} -> {entry['divergence_after']:.4f} in {entry['evaluations']} splits"
        )
    console.print(
        f"calibrated {len(result.layers)} layers of {name} on {summary['samples']} samples "
        f"in {seconds:.1f} s (fidelity at keep ratio {ratio}) -> {out}"
    )


@app.command("export")
def export_command(
    calibration: Annotated[Path, typer.Argument(help="Calibration file written by `alvts calibrate`.")],
    keep_ratio: Annotated[float | None, typer.Option(
        help="Share of visual tokens each routed layer keeps, in (0, 1]; or give --compression.")] = None,
    compression: Annotated[float | None, typer.Option(
        help="Instead of --keep-ratio: the compression (e.g. 0.89) as `alvts eval` counts it, whose split "
        "`--refine-compressions` refined.")] = None,
    out: Annotated[Path, typer.Option(help="Selector artifact to write (.safetensors).")] = Path(
        "alvts-selector.safetensors"
    ),
    rank: Annotated[int | None, typer.Option(help="Export at a lower rank than calibrated (leading heads).")] = None,
    dtype: Annotated[str, typer.Option(help="Stored dtype: float32, float16 or bfloat16.")] = "float32",
    budget: Annotated[str, typer.Option(
        help="uniform: KEEP_RATIO in every layer; sensitivity (least measured answer divergence), adaptive-update "
        "(where the layers change the hidden states), adaptive (equal coverage) or adaptive-mass (water-filling): "
        "the same average visual tokens per routed layer, spread by calibration statistics.")] = DEFAULT_BUDGET.value,
    skipped_keys: Annotated[SkippedKeys, typer.Option(
        help="pool: the text attends to one stand-in for a layer's skipped visual tokens (counted in its budget); "
        "drop: it does not see them (the paper); all: it reads every visual token's own key and value, from its "
        "current state (the layout a serving engine keeps; costs their key/value projections and cache).")
    ] = DEFAULT_SKIPPED_KEYS,
    json_output: JsonOption = False,
) -> None:
    """Write a selector artifact (safetensors + metadata) from a calibration."""
    if (keep_ratio is None) == (compression is None):
        raise AlvtsError("give exactly one of --keep-ratio (e.g. 0.11) and --compression (e.g. 0.89)")
    runtime = RuntimeConfig(keep_ratio=keep_ratio, budget=budget, skipped_keys=skipped_keys)
    with _writing([out], [calibration]):
        loaded = load_calibration(calibration)
        if compression is not None:
            runtime = runtime.replace(keep_ratio=keep_ratio_at(loaded, compression))
        selector = export(loaded, out, rank=rank, dtype=dtype, config=runtime)
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
    kind = _kind(path, metadata)
    if json_output:
        print_json({"kind": kind, **metadata})
        return
    fingerprint = metadata["fingerprint"]
    rows = {
        "kind": kind,
        "format": f"{metadata['format']} v{metadata['format_version']}",
        "family": fingerprint["family"],
        "model": f"{fingerprint['num_layers']} layers, hidden {fingerprint['hidden_size']}, "
        f"{fingerprint['num_heads']} heads ({fingerprint['num_kv_heads']} kv), head_dim {fingerprint['head_dim']}",
        "importance": metadata.get("importance", metadata.get("options", {}).get("importance")),
    }
    if metadata["format"] == SELECTOR_FORMAT:
        rows.update({"rank": metadata.get("rank"), "keep ratio": metadata.get("keep_ratio"),
                     "budget": budget_description(metadata) if "budget" in metadata else None,
                     "start layer": min(map(int, metadata["keep_ratios"])), "calibration": metadata.get("calibration")})
        console.print(key_value_table(str(path), rows))
        console.print(fidelity_table(metadata.get("fidelity") or {key: {} for key in metadata["keep_ratios"]},
                                     metadata["keep_ratios"]))
        return
    rows.update({"options": metadata["options"], "summary": metadata["summary"], "model": metadata.get("model")})
    console.print(key_value_table(str(path), rows))


def _kind(path: Path, metadata: dict[str, Any]) -> str:
    """What the file is and what to do with it, in words."""
    if metadata["format"] == SELECTOR_FORMAT:
        return "selector artifact: attach it (alvts generate --selector, alvts eval, alvts_calib.attach)"
    unfinished = load_calibration(path).unfinished()
    if unfinished is None:
        return "calibration: export a selector from it with alvts export (or compare methods with alvts eval)"
    return f"unfinished calibration checkpoint ({unfinished}): rerun the alvts calibrate command that made it"


@app.command("generate")
def generate_command(
    selector: Annotated[Path, typer.Option(help="Selector artifact to attach.")],
    model: ModelOption = None,
    image: Annotated[Path | None, typer.Option(help="Image file (required with --model; demo: a test image).")] = None,
    prompt: Annotated[str | None, typer.Option(help="Prompt text (demo: that image's question).")] = None,
    keep_ratio: Annotated[float | None, typer.Option(help="Override the artifact's keep ratio.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 16,
    dtype: Annotated[str, typer.Option(help="Model dtype: auto, float32, float16, bfloat16.")] = "auto",
    attn_implementation: Annotated[str, typer.Option(help="eager, sdpa or flash_attention_2.")] = "sdpa",
    device: Annotated[str | None, typer.Option(help="device_map for loading, e.g. cuda or auto.")] = None,
    json_output: JsonOption = False,
) -> None:
    """Attach a selector and generate, reporting the KV cache each layer kept."""
    from alvts_calib.model import check_load_options

    if max_new_tokens < 1:
        raise AlvtsError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    check_load_options(dtype, attn_implementation, device)
    processor = _processor(model)
    inputs, prompt = _prompt_inputs(processor, model, image, prompt)
    loaded, name = _load(model, dtype, attn_implementation, device)
    attach(loaded, selector, keep_ratio=keep_ratio)
    inputs = move(inputs, input_device(loaded))
    started = time.perf_counter()
    with torch.no_grad():
        output = loaded.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True)
    seconds = time.perf_counter() - started
    new_tokens = output.sequences[:, inputs["input_ids"].shape[1] :]
    texts = processor.batch_decode(new_tokens, skip_special_tokens=True)
    cache = [layer.keys.shape[-2] for layer in output.past_key_values.layers]
    payload = {"model": name, "prompt": prompt, "outputs": texts, "kv_cache_tokens_per_layer": cache}
    payload["seconds"] = seconds
    if json_output:
        print_json(payload)
        return
    console.print(f"prompt: {prompt}")
    for text in texts:
        console.print(f"output: {text}")
    console.print(f"KV cache tokens per layer: {cache} ({seconds:.2f} s)")


def _prompt_inputs(processor: Any, model: Path | None, image: Path | None, prompt: str | None) -> tuple[dict, str]:
    """Processor inputs for one image and prompt (checked before the model loads); the demo's first test example
    when neither is given."""
    from alvts_calib.data import single_sample

    if image is None and model is None:
        from alvts_calib.demo import split_records

        row = split_records("test", 1)[0]
        image_value, prompt = row["image"], prompt if prompt is not None else row["prompt"]
    elif image is None:
        raise AlvtsError("--image is required with --model")
    elif not image.is_file():
        raise AlvtsError(f"{image}: image file not found")
    else:
        image_value, prompt = str(image.resolve()), prompt or "Describe the image."
    sample = single_sample(image_value, prompt, processor, max_tokens=_max_tokens(model),
                           source=f"--image {image}" if image is not None else "the demo example")
    return sample, prompt


@app.command("eval")
def eval_command(
    selector: Annotated[Path, typer.Argument(
        help="A calibration file (alvts: the toolkit's defaults at each budget) or a selector artifact "
        "(alvts-uniform: its layers at one ratio per budget).")],
    model: ModelOption = None,
    data: Annotated[str | None, typer.Option(
        help="Labelled data {image, prompt, answer}, in any form calibrate --data takes (demo: its test split).")
    ] = None,
    split: SplitOption = None,
    image_column: ImageColumnOption = "image",
    prompt_column: PromptColumnOption = "prompt",
    answer_column: Annotated[str, typer.Option(help="The column of --data holding the answer.")] = "answer",
    chat_template: ChatTemplateOption = None,
    num_samples: Annotated[int | None, typer.Option(
        help=f"Evaluate the first N usable rows (default: all; demo: {EVALUATION_SAMPLES}).")] = None,
    methods: Annotated[str | None, typer.Option(
        help=f"Comma-separated, from {', '.join(METHODS)} (default: {', '.join(DEFAULT_METHODS)}; with a selector "
        "file alvts-uniform instead of alvts).", show_default=False)] = None,
    compression: Annotated[str, typer.Option(
        help="Comma-separated compressions: 1 - (visual tokens processed per layer / visual tokens).")] = ",".join(
        str(c) for c in DEFAULT_COMPRESSIONS),
    batch_size: Annotated[int, typer.Option(help="Rows per generate() call.")] = 32,
    skipped_update: Annotated[SkippedUpdate | None, typer.Option(
        help="What visual tokens that skip a layer get: linear (the processed tokens' mean update plus the calibrated "
        "map of each token's deviation; the default with fitted maps), none (the paper), mean (that mean update "
        "alone), stand-in (the update of their pooled stand-in plus the map) or exact (a diagnostic bound: the "
        "unrouted layer's update, at the cost of running it on every token).", show_default=False)
    ] = None,
    skipped_keys: Annotated[SkippedKeys, typer.Option(
        help="For alvts, alvts-uniform, oracle and random: pool (one stand-in for the skipped visual tokens, "
        "counted in the budget), drop (the paper) or all (every visual token's own key and value, from its current "
        "state: the serving-friendly layout, which costs their key/value projections and cache). FastV, "
        "PyramidDrop and DART run as published.")
    ] = DEFAULT_SKIPPED_KEYS,
    budget: Annotated[str, typer.Option(
        help="How alvts spreads its tokens over layers: sensitivity, adaptive-update, adaptive, adaptive-mass or "
        "uniform.")
    ] = DEFAULT_BUDGET.value,
    dtype: Annotated[str, typer.Option(help="Model dtype: auto, float32, float16, bfloat16.")] = "auto",
    attn_implementation: Annotated[str, typer.Option(help="eager, sdpa or flash_attention_2.")] = "sdpa",
    device: Annotated[str | None, typer.Option(help="device_map for loading, e.g. cuda or auto.")] = None,
    out: Annotated[Path | None, typer.Option(help="Also write the full report as JSON to this file.")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Also write the table as Markdown to this file.")] = None,
    json_output: JsonOption = False,
) -> None:
    """Accuracy of the full model and of ALVTS, its oracle and the peers at matched visual-token budgets."""
    from alvts_calib import evaluate
    from alvts_calib.data import build_labelled_items
    from alvts_calib.evaluation import check_methods, default_methods
    from alvts_calib.model import check_load_options

    method_names = None if methods is None else tuple(name.strip() for name in methods.split(",") if name.strip())
    compressions = _compressions(compression)
    runtime = RuntimeConfig(budget=budget, skipped_keys=skipped_keys, skipped_update=skipped_update)
    if batch_size < 1:
        raise AlvtsError(f"--batch-size must be at least 1, got {batch_size}")
    check_load_options(dtype, attn_implementation, device)
    loaded_artifact = load_artifact(selector)
    calibration = loaded_artifact if isinstance(loaded_artifact, Calibration) else None
    artifact = calibrated_layers(calibration) if calibration is not None else loaded_artifact
    method_names = default_methods(calibration) if method_names is None else method_names
    check_methods(method_names, artifact, calibration)
    records = _records(model, data, "test", num_samples or EVALUATION_SAMPLES, split=split, image_column=image_column,
                       prompt_column=prompt_column, answer_column=answer_column)
    with _writing([out, markdown], _inputs(model, data, records, selector)):
        processor = _processor(model, chat_template)
        items, data_report = build_labelled_items(records, processor, num_samples=num_samples)
        print(f"data: {data_report.summary()}", file=sys.stderr)
        loaded, name = _load(model, dtype, attn_implementation, device)
        report = evaluate(
            loaded, processor, items, selector=artifact, calibration=calibration, methods=method_names,
            compressions=compressions, batch_size=batch_size, config=runtime, progress=not json_output, model_name=name,
            data_name=str(data or "builtin:shapes test split"), data_summary=data_report.summary(),
        )
        payload = report.to_dict()
        if out is not None:
            _write_text(out, json.dumps(payload, indent=1))
        if markdown is not None:
            _write_text(markdown, eval_markdown(report.rows()))
    if json_output:
        print_json(payload)
        return
    console.print(eval_table(
        report.rows(),
        f"{name}: {len(items)} rows, {report.num_visual} visual tokens, skipped update {report.skipped_update}",
    ))
    by_kind = kind_table(report.rows(), "accuracy by kind of row (the data's kind column)")
    if by_kind is not None:
        console.print(by_kind)
    for method, target in report.infeasible:
        console.print(f"{method} at {target:.0%}: infeasible (its full layers alone exceed the budget)")
    console.print(f"evaluated in {report.seconds:.0f} s" + (f" -> {out}" if out else ""))


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def _compressions(value: str, option: str = "--compression") -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in value.split(","))
    except ValueError:
        message = f"{option} takes comma-separated numbers in [0, 1) such as 0.67,0.89, got {value!r}"
        raise AlvtsError(message) from None
    for item in values:
        check_compression(item)
    return values


@app.command("demo-data")
def demo_data_command(
    out: Annotated[Path, typer.Argument(help="Folder to write images/ and metadata.jsonl into.")],
    split: Annotated[str, typer.Option(help="calibration, test or train.")] = "test",
    count: Annotated[int, typer.Option(help="Number of rows.")] = 100,
    json_output: JsonOption = False,
) -> None:
    """Write a split of the demo task in the toolkit's data format (an image folder with metadata.jsonl)."""
    from alvts_calib.demo import SPLIT_SEEDS, write_split

    if count < 1:
        raise AlvtsError(f"count must be at least 1, got {count}")
    if split not in SPLIT_SEEDS:
        raise AlvtsError(f"unknown split {split!r}; choose from {', '.join(SPLIT_SEEDS)}")
    metadata = write_split(out, split, count)
    if json_output:
        print_json({"metadata": str(metadata), "rows": count, "split": split})
        return
    console.print(f"wrote {count} rows -> {metadata}")


@app.command("lmms-eval-task")
def lmms_eval_task_command(
    out: Annotated[Path, typer.Argument(help="Folder to write the task into (pass it to lmms-eval --include_path).")],
    count: Annotated[int, typer.Option(
        help="Rows of the demo's test split: the first COUNT, as alvts eval --num-samples COUNT takes them.")
    ] = EVALUATION_SAMPLES,
    json_output: JsonOption = False,
) -> None:
    """Write the demo's held-out split as a local lmms-eval task, alvts_shapes (no Hub access)."""
    from alvts_calib.answers import answer_token_budget
    from alvts_calib.demo import split_records
    from alvts_calib.integrations.lmms_eval import write_task

    if count < 1:
        raise AlvtsError(f"count must be at least 1, got {count}")
    records = split_records("test", count)
    budget = answer_token_budget(builtin_processor().tokenizer, records["answer"])
    task = write_task(out, records, name=DEMO_TASK, max_new_tokens=budget)
    if json_output:
        print_json({"task": DEMO_TASK, "yaml": str(task), "rows": count})
        return
    console.print(f"wrote the lmms-eval task {DEMO_TASK} ({count} rows) -> {task}; run it with lmms-eval --model "
                  f"alvts_llava_hf --model_args pretrained={BUILTIN_MODEL_DIR},selector=SELECTOR,device=cpu --tasks "
                  f"{DEMO_TASK} --include_path {out}")


@app.command("doctor")
def doctor_command(json_output: JsonOption = False) -> None:
    """Show versions, GPUs, usable attention backends and supported model families."""
    diagnosis = diagnose()
    if json_output:
        print_json(diagnosis.to_dict())
        return
    console.print(doctor_tables(diagnosis))


for _command in app.registered_commands:  # plain help would otherwise cut each command's summary to fit a line
    _command.short_help = _command.callback.__doc__.strip().splitlines()[0]


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted("interrupted")


def main() -> None:
    """Console entry point: user errors print one line and exit 1 (Ctrl-C: 130) unless --debug."""
    signal.signal(signal.SIGINT, _interrupt)
    try:
        app()
    except Interrupted as error:
        if _state["debug"]:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(Interrupted.exit_code)
    except (AlvtsError, OSError, ValueError) as error:
        if _state["debug"]:
            raise
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
