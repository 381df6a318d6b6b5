"""The evaluation report (``xception eval --report DIR``): what went right per class and what went wrong.

    confusion_matrix.png   rows: true class, columns: predicted
    per_class.csv / .md    precision, recall, F1 and support per class (+ macro averages, top-1/top-5)
    mistakes.png           the most confident mistakes, each with the Grad-CAM map of the class it wrongly chose

The mistakes are gathered during the evaluation pass itself (:class:`MistakeWatch` sits between
:func:`~xception.inference.evaluate.evaluate` and the model), so the metrics are computed once, in one
place. Under ``torchrun`` the gallery shows rank 0's share of the images; the metrics cover all ranks.
Every file is written atomically.
"""

from __future__ import annotations

import csv
import heapq
import io
import itertools
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..fileio import atomic_write
from ..preprocessing import Preprocessing
from ..plotting import gallery, overlay, plot_confusion
from . import explain as cam

FILES = {"confusion": "confusion_matrix.png", "csv": "per_class.csv", "markdown": "per_class.md",
         "mistakes": "mistakes.png"}


class MistakeWatch(nn.Module):
    """The model's logits passed through unchanged; the ``keep`` most confident mistakes kept aside.

    Iterate the loader through :meth:`batches` so the watch knows each batch's targets.
    """

    def __init__(self, model: nn.Module, keep: int = 8) -> None:
        super().__init__()
        self.model, self.keep = model, keep
        self.targets: torch.Tensor | None = None
        self._heap: list[tuple[float, int, torch.Tensor, int, int]] = []  # (confidence, order, image, true, pred)
        self._order = itertools.count()

    def batches(self, loader: Any) -> "_Batches":
        return _Batches(loader, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        confidence, pred = logits.detach().float().softmax(dim=1).max(dim=1)
        for i in (pred.cpu() != self.targets).nonzero().flatten().tolist():
            item = (confidence[i].item(), next(self._order), x[i].detach().float().cpu(), int(self.targets[i]),
                    int(pred[i]))
            (heapq.heappush if len(self._heap) < self.keep else heapq.heappushpop)(self._heap, item)
        return logits

    def mistakes(self) -> list[tuple[float, torch.Tensor, int, int]]:
        """``(confidence, input, true, predicted)``, most confident first."""
        return [(c, x, t, p) for c, _, x, t, p in sorted(self._heap, key=lambda m: (-m[0], m[1]))]


class _Batches:
    def __init__(self, loader: Any, watch: MistakeWatch) -> None:
        self.loader, self.watch = loader, watch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:  # (images, targets, indices, skipped)
            self.watch.targets = batch[1]
            yield batch


def per_class_metrics(confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support of each class (rows of ``confusion``: true, columns: predicted).

    A ratio with nothing to divide by (no image predicted as the class, none of it) is 0, as
    scikit-learn's default.
    """
    c = torch.tensor(confusion, dtype=torch.float64)
    hits, support, predicted = c.diag(), c.sum(1), c.sum(0)
    precision = hits / predicted.clamp(min=1)
    recall = hits / support.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return [{"class": name, "precision": p, "recall": r, "f1": f, "support": int(s)}
            for name, p, r, f, s in zip(classes, precision.tolist(), recall.tolist(), f1.tolist(), support.tolist())]


def _macro(rows: list[dict[str, Any]], key: str) -> float:
    """The mean over the classes present in the data."""
    values = [r[key] for r in rows if r["support"] > 0]
    return sum(values) / max(len(values), 1)


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["class", "precision", "recall", "f1", "support"], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, **{k: f"{r[k]:.4f}" for k in ("precision", "recall", "f1")}})
    return buffer.getvalue()


def _markdown(result: dict[str, Any], rows: list[dict[str, Any]], shown: int, layer: str) -> str:
    def pct(v: float) -> str:
        return f"{100 * v:.1f}%"

    lines = [
        "# Evaluation report", "",
        f"- Weights: `{result['checkpoint']}`", f"- Data: `{result['data']}` ({result['count']} images"
        + (f", {result['skipped']} unreadable skipped)" if result.get("skipped") else ")"),
        f"- Top-1 **{pct(result['top1'])}**, top-5 {pct(result['top5'])}, loss {result['loss']:.4f}",
        f"- Macro averages: precision {pct(_macro(rows, 'precision'))}, recall {pct(_macro(rows, 'recall'))}, "
        f"F1 {pct(_macro(rows, 'f1'))}", "",
        "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['class']} | {pct(r['precision'])} | {pct(r['recall'])} | {pct(r['f1'])} | {r['support']} |"
              for r in rows]
    lines += ["", f"![confusion matrix]({FILES['confusion']})", "",
              f"The {shown} most confident mistakes, each with the Grad-CAM map (at `{layer}`) of the class it "
              "chose:", "",
              f"![most confident mistakes]({FILES['mistakes']})", ""]
    return "\n".join(lines)


def plot_mistakes(path: Path, model: nn.Module, mistakes: list[tuple[float, torch.Tensor, int, int]],
                  classes: Sequence[str], preprocessing: Preprocessing, layer: str | None = None,
                  per_row: int = 4) -> Path:
    """A gallery: per mistake the image (true / predicted class, confidence) and its Grad-CAM overlay."""
    if not mistakes:
        return gallery(path, [], title="most confident mistakes", empty="no mistakes", per_row=per_row)
    device = next(model.parameters()).device
    inputs = torch.stack([x for _, x, _, _ in mistakes]).to(device)
    targets = [p for _, _, _, p in mistakes]
    maps = cam.class_activation_maps(model, inputs, targets, methods=["gradcam"], layer=layer)["gradcam"]
    entries = []
    for n, (confidence, x, true, pred) in enumerate(mistakes):
        image = cam.to_display(x, preprocessing)
        entries.append((image, f"true: {classes[true]}\npredicted: {classes[pred]} {100 * confidence:.0f}%",
                        overlay(image, maps[n]), f"Grad-CAM: {classes[pred]}"))
    return gallery(path, entries, title="most confident mistakes", per_row=per_row)


def write_report(out: str | Path, result: dict[str, Any], model: nn.Module, watch: MistakeWatch,
                 preprocessing: Preprocessing, layer: str | None = None) -> dict[str, str]:
    """Write the report's files into ``out`` (created if needed); return their paths by kind.
    ``layer``: where the mistakes' Grad-CAM maps are taken (default: the last feature map)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = result["class_names"]
    rows = per_class_metrics(result["confusion"], classes)
    paths = {kind: out / name for kind, name in FILES.items()}
    mistakes = watch.mistakes()
    plot_mistakes(paths["mistakes"], model, mistakes, classes, preprocessing, layer)  # first: it may refuse the layer
    plot_confusion(result["confusion"], classes, paths["confusion"])
    atomic_write(paths["csv"], lambda f: f.write(_csv_text(rows)), mode="w")
    text = _markdown(result, rows, len(mistakes), layer or cam.FEATURES)
    atomic_write(paths["markdown"], lambda f: f.write(text), mode="w")
    return {kind: str(p) for kind, p in paths.items()}
