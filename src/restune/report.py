"""Parameter counts in the conventions papers use (docs/methods/README.md).

Papers count the head in two ways, sometimes in one table: not at all, or at the benchmark's average class count
(VTAB-1k: 940 classes over 19 tasks; FGVC: 1,173 over 5). The report gives every convention, labelled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from restune.tune import backbone_parameters, classifier_path, get_store

__all__ = ["Report", "report", "VTAB_CLASSES", "FGVC_CLASSES"]

VTAB_CLASSES = (940, 19)  # sum of classes, number of tasks
FGVC_CLASSES = (1173, 5)


def _count(params: object) -> int:
    return sum(p.numel() for p in params)


@dataclass
class Report:
    """Trainable-parameter counts of a model.

    Attributes:
        trainable: every parameter with ``requires_grad``, head included.
        head: trainable parameters of ``model.get_classifier()`` (0 when the head is frozen).
        trainable_without_head: ``trainable - head``; trainable backbone tensors (a class token) count here.
        total: every parameter of the model.
        sets: per tuner set, the parameters of its tuners.
        tuners: per (set, tuner type): number of tuner instances and their parameters.
        head_inputs: the head's input width D, for the benchmark-average head (D + 1) * mean classes.
        num_classes: the concrete head's output width (0 without a head).
        active: the active tuner set, if any.
    """

    trainable: int
    head: int
    trainable_without_head: int
    total: int
    sets: dict[str, int] = field(default_factory=dict)
    tuners: list[tuple[str, str, int, int]] = field(default_factory=list)
    head_inputs: int = 0
    num_classes: int = 0
    active: str | None = None

    @property
    def vtab_average_head(self) -> int:
        return round((self.head_inputs + 1) * VTAB_CLASSES[0] / VTAB_CLASSES[1])

    @property
    def fgvc_average_head(self) -> int:
        return round((self.head_inputs + 1) * FGVC_CLASSES[0] / FGVC_CLASSES[1])

    @property
    def with_vtab_head(self) -> int:
        return self.trainable_without_head + self.vtab_average_head

    @property
    def with_fgvc_head(self) -> int:
        return self.trainable_without_head + self.fgvc_average_head

    def __str__(self) -> str:
        d = self.head_inputs
        rows: list[tuple[str, str, str, int]] = [(s, t, f"{n:,}", c) for s, t, n, c in self.tuners]
        summary = [
            ("trainable without head", self.trainable_without_head),
            (f"head ({d + 1} x {self.num_classes} classes)", self.head),
            ("trainable", self.trainable),
            (f"without head + VTAB-1k average head ({d + 1} x 940/19)", self.with_vtab_head),
            (f"without head + FGVC average head ({d + 1} x 1173/5)", self.with_fgvc_head),
            ("total parameters", self.total),
        ]
        width = max([len(label) for label, _ in summary] + [24])
        lines = [
            f"| {'set':<10} | {'tuner':<12} | {'sites':>5} | {'parameters':>12} |",
            f"|{'-' * 12}|{'-' * 14}|{'-' * 6}:|{'-' * 13}:|",
        ]
        lines += [f"| {s:<10} | {t:<12} | {n:>5} | {c:>12,} |" for s, t, n, c in rows]
        lines += [
            "",
            f"| {'count':<{width}} | {'parameters':>12} | {'% of total':>10} |",
            f"|{'-' * (width + 2)}|{'-' * 13}:|{'-' * 11}:|",
        ]
        for label, value in summary:
            share = 100.0 * value / self.total if self.total else 0.0
            lines.append(f"| {label:<{width}} | {value:>12,} | {share:>9.3f}% |")
        return "\n".join(lines)


def report(model: nn.Module) -> Report:
    """Count a model's parameters: trainable, head, trainable without head, total, per set and per tuner."""
    trainable = _count(p for p in model.parameters() if p.requires_grad)
    head_path = classifier_path(model)
    head_module = model.get_submodule(head_path) if head_path else None
    head = _count(p for p in head_module.parameters() if p.requires_grad) if head_module is not None else 0
    head_inputs = int(getattr(head_module, "in_features", 0) or getattr(model, "num_features", 0) or 0)
    num_classes = int(getattr(head_module, "out_features", 0) or 0)
    total = _count(model.parameters())
    store = get_store(model)
    sets: dict[str, int] = {}
    tuners: list[tuple[str, str, int, int]] = []
    if store is not None:
        for set_name, tuner_set in store.sets.items():
            sets[set_name] = _count(tuner_set.tuners.parameters())
            grouped: dict[str, list[int]] = {}
            seen: set[int] = set()  # a tensor shared by several tuners (ARC's projections) counts once
            for _, module in tuner_set.named_tuners():
                fresh = [p for p in module.parameters() if id(p) not in seen]
                seen.update(id(p) for p in fresh)
                grouped.setdefault(module.config.type, []).append(_count(fresh))
            tuners += [(set_name, t, len(counts), sum(counts)) for t, counts in grouped.items()]
            backbone = _count(p for n, p in backbone_parameters(model).items() if n in tuner_set.backbone_names)
            if backbone:
                tuners.append((set_name, "backbone", len(tuner_set.backbone_names), backbone))
    return Report(
        trainable=trainable,
        head=head,
        trainable_without_head=trainable - head,
        total=total,
        sets=sets,
        tuners=tuners,
        head_inputs=head_inputs,
        num_classes=num_classes,
        active=store.active if store is not None else None,
    )
