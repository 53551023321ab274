"""What routing costs the text when it cannot see skipped visual tokens, with stale states taken out of the picture.

An emulation on the demo model (eager attention, prefill, first answer token): every token is still processed
by every layer, but from layer 1 on the text rows' attention sees only each layer's top-k visual keys (by the
full attention of the text rows) and, per variant, the rest as
- drop: nothing (what a routed layer does in the paper);
- pool: one merged key and value (their means) attended to with the mass of all of them (logit + log n),
  which is what `SkippedKeys.POOL` gives a routed layer.
It prints first-token accuracy retention and KL(full || variant) per question kind, and writes JSON.

    python benchmarks/skipped_attention.py --tokens 7 --out docs/results/skipped-attention.json
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch
import transformers.models.llama.modeling_llama as llama
from rich.console import Console
from rich.table import Table

from alvts_calib.calibration import kl_divergence
from alvts_calib.data import build_labelled_items
from alvts_calib.demo import BUILTIN_NAME, builtin_model, builtin_processor, split_records

VARIANTS = ("drop", "pool")
class TextView:
    """Replaces eager attention: text rows see each layer's kept visual keys and, pooled or not, the rest."""

    def __init__(self):
        self.skipped: dict[int, torch.Tensor] = {}  # layer -> (B, L) skipped visual keys
        self.text: torch.Tensor | None = None  # (B, L) text query rows
        self.variant = "drop"
        self.original = llama.eager_attention_forward

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        skipped = self.skipped.get(module.layer_idx)
        if skipped is None:
            return self.original(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        key, value = (llama.repeat_kv(t, module.num_key_value_groups) for t in (key, value))
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling + attention_mask
        hidden = self.text[:, None, :, None] & skipped[:, None, None, :]  # (B, 1, Lq, Lk)
        weights_of_skipped = skipped[:, None, :, None].float()
        count = weights_of_skipped.sum(2, keepdim=True).clamp(min=1)
        if self.variant == "drop":
            weights = scores.masked_fill(hidden, torch.finfo(scores.dtype).min).softmax(-1)
            return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights
        mean_key = (key * weights_of_skipped).sum(2, keepdim=True) / count
        mean_value = (value * weights_of_skipped).sum(2, keepdim=True) / count
        pooled_scores = torch.matmul(query, mean_key.transpose(2, 3)) * scaling  # n copies: mass of all of them
        weights = torch.where(hidden, pooled_scores.expand_as(scores), scores).softmax(-1)
        output = torch.matmul(weights * ~hidden, value) + (weights * hidden).sum(-1, keepdim=True) * mean_value
        return output.transpose(1, 2).contiguous(), weights


def measure(rows: int, tokens: int, batch_size: int = 50) -> dict:
    model, processor = builtin_model(attn_implementation="eager"), builtin_processor()
    processor.tokenizer.padding_side = "left"
    items, _ = build_labelled_items(split_records("test", rows), processor)
    view = TextView()
    llama.eager_attention_forward = view
    results: dict[str, dict[str, list]] = {variant: collections.defaultdict(list) for variant in ("full", *VARIANTS)}
    try:
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            inputs = processor(images=[i.image for i in batch], text=[i.text for i in batch], padding=True,
                               return_tensors="pt")
            answers = torch.tensor([processor.tokenizer(i.answer, add_special_tokens=False)["input_ids"][0]
                                    for i in batch])
            visual = inputs["input_ids"] == model.config.image_token_id
            after_image = torch.arange(visual.shape[1]) > torch.where(visual, torch.arange(visual.shape[1]), -1).amax(
                -1, keepdim=True)
            view.text, view.skipped = after_image & inputs["attention_mask"].bool(), {}
            with torch.no_grad():
                full = model(**inputs, output_attentions=True, logits_to_keep=1)
            reference = full.logits[:, -1].log_softmax(-1)
            for layer, attention in enumerate(full.attentions[1:], start=1):
                received = (attention.mean(1) * view.text[..., None]).sum(1).masked_fill(~visual, -1.0)
                kept = torch.zeros_like(visual).scatter_(1, received.topk(tokens, dim=-1).indices, True)
                view.skipped[layer] = visual & ~kept
            kinds = [item.kind for item in batch]  # the demo data's kind: the question form
            for kind, correct in zip(kinds, (reference.argmax(-1) == answers).tolist(), strict=True):
                results["full"][kind].append((correct, 0.0))
            for variant in VARIANTS:
                view.variant = variant
                with torch.no_grad():
                    routed = model(**inputs, logits_to_keep=1).logits[:, -1].log_softmax(-1)
                kl = kl_divergence(reference, routed)
                for kind, correct, divergence in zip(kinds, (routed.argmax(-1) == answers).tolist(), kl.tolist(),
                                                     strict=True):
                    results[variant][kind].append((correct, divergence))
    finally:
        llama.eager_attention_forward = view.original
    return summarise(results, rows, tokens)


def summarise(results: dict, rows: int, tokens: int) -> dict:
    def stats(pairs: list) -> dict:
        return {"accuracy": sum(c for c, _ in pairs) / len(pairs), "kl": sum(d for _, d in pairs) / len(pairs)}

    report = {"model": BUILTIN_NAME, "rows": rows, "visual_tokens_seen": tokens, "variants": {}}
    for variant, per_kind in results.items():
        everything = [pair for pairs in per_kind.values() for pair in pairs]
        report["variants"][variant] = {"all": stats(everything), **{k: stats(v) for k, v in sorted(per_kind.items())}}
    return report


def table(report: dict) -> Table:
    full = report["variants"]["full"]
    result = Table(title=f"text sees {report['visual_tokens_seen']} visual keys per layer, every token updated "
                         f"({report['model']}, {report['rows']} held-out rows)")
    result.add_column("question kind")
    result.add_column("full accuracy", justify="right")
    for variant in VARIANTS:
        result.add_column(f"{variant}: accuracy", justify="right")
        result.add_column(f"{variant}: KL", justify="right")
    for kind in full:
        cells = [f"{full[kind]['accuracy']:.1%}"]
        for variant in VARIANTS:
            measured = report["variants"][variant][kind]
            cells += [f"{measured['accuracy']:.1%}", f"{measured['kl']:.3f}"]
        result.add_row(kind, *cells)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=7, help="visual keys the text sees per layer (7 of 64: 89%%)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/skipped-attention.json"))
    args = parser.parse_args()
    report = measure(args.rows, args.tokens)
    args.out.write_text(json.dumps(report, indent=1), encoding="utf-8")
    Console().print(table(report))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
