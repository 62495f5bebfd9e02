"""Compare KAR against the bare backbone over a Hydra multirun: tables, a chart, optional W&B.

`python -m kar.report <multirun dir>... [--metric auc] [--out DIR] [--wandb]` reads every job's
``metrics.json``, pairs base runs (``adaptor == "none"``) with KAR runs by seed, and writes
``report.md`` / ``report.csv`` (the paper's Table 1 layout: mean ± std over seeds, relative
improvement, paired t-test) for the test and validation splits, plus ``report_gains.png``.
Several directories may be given (a main sweep and an ablation sweep, say); their runs are
pooled. The same comparison is made on the slices the jobs scored (cold items, users with
short histories: see `kar.slices`), on the test split.

Rows are keyed by (dataset, knowledge, backbone, adaptor, llm): one row per KAR variant, so
several adaptors (or LLMs) in one sweep each get their own rows against the same base runs.
The base model reads no knowledge, so a base run serves every knowledge setting and LLM.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from kar.errors import KarError

BASE_ADAPTOR = "none"
SPLITS = ("test", "valid")
TABLE_METRICS = ("auc", "logloss")  # the paper's Table 1 columns
LOWER_IS_BETTER = frozenset({"logloss"})
DISPLAY_NAMES = {"auc": "AUC", "logloss": "LogLoss"}
REQUIRED_KEYS = ("valid", "test", "backbone", "adaptor", "llm", "dataset", "seed")
DEFAULT_KNOWLEDGE = "both"
SLICE_SPLIT = "test"  # slices are reported on the split that is evaluated once
REPORT_FILES = ("report.md", "report.csv", "report_gains.png")
SLICE_TITLES = {
    "cold_items": "Cold items (few training samples)",
    "short_history_users": "Users with short histories (few ratings in all)",
}


class ReportError(KarError, ValueError):
    """The runs cannot be compared as they are; the message names the file or group and the fix."""


@dataclass(frozen=True)
class RunRecord:
    """One finished training job, as its metrics.json describes it."""

    path: Path
    dataset: str
    backbone: str
    adaptor: str
    llm: str
    knowledge: str
    seed: int
    scores: dict[str, dict[str, float]]  # split (or "test:<slice>") -> metric -> value
    slice_samples: dict[str, int] = field(default_factory=dict)  # "test:<slice>" -> samples


@dataclass(frozen=True)
class MetricComparison:
    """Base vs KAR on one metric of one split."""

    metric: str
    base_mean: float
    base_std: float | None  # sample std (ddof=1); None with a single run
    kar_mean: float
    kar_std: float | None
    improvement_pct: float  # relative gain of the KAR mean; a decrease counts for LogLoss
    paired_improvements_pct: tuple[float, ...]  # per paired seed, in seed order
    p_value: float | None  # paired t-test over seeds; None with fewer than 2 pairs

    @property
    def paired_improvement_std(self) -> float | None:
        if len(self.paired_improvements_pct) < 2:
            return None
        return float(np.std(self.paired_improvements_pct, ddof=1))


@dataclass(frozen=True)
class ComparisonRow:
    """One KAR variant against the base runs of the same dataset and backbone, on one split."""

    split: str
    dataset: str
    knowledge: str
    backbone: str
    adaptor: str
    llm: str
    base_seeds: tuple[int, ...]
    kar_seeds: tuple[int, ...]
    metrics: dict[str, MetricComparison]

    @property
    def paired_seeds(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.base_seeds) & set(self.kar_seeds)))


@dataclass
class ReportTables:
    """Everything a report shows; `write_report` renders it."""

    root: Path  # the first directory given; `roots` lists all
    metric: str  # the headline metric: the chart's
    metrics: tuple[str, ...]  # the metrics in the tables, in column order
    test: list[ComparisonRow]
    valid: list[ComparisonRow]
    notes: list[str]
    slices: dict[str, list[ComparisonRow]] = field(default_factory=dict)  # "test:<slice>"
    # (dataset, "test:<slice>") -> samples in the slice (the same for every run on a dataset)
    slice_samples: dict[tuple[str, str], int] = field(default_factory=dict)
    roots: tuple[Path, ...] = ()

    def rows(self, split: str) -> list[ComparisonRow]:
        if split in self.slices:
            return self.slices[split]
        return {"test": self.test, "valid": self.valid}[split]

    @property
    def splits(self) -> tuple[str, ...]:
        """Every split with rows: test, valid, then the slices of the test split."""
        return (*SPLITS, *sorted(self.slices))


# ------------------------------------------------------------------------------------- loading
def _knowledge_of(path: Path, data: dict[str, Any]) -> str:
    """The job's knowledge setting: metrics.json's field, else the job's saved config, else both.

    Older metrics.json files lack the field; the pipeline's resolved config.yaml next to them
    still says which knowledge the adaptor was fed.
    """
    if "knowledge" in data:
        return str(data["knowledge"])
    config_path = path.parent / "config.yaml"
    if not config_path.is_file():
        return DEFAULT_KNOWLEDGE
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as err:
        raise ReportError(
            f"{config_path}: not valid YAML ({err}); restore it or add a `knowledge` field "
            f"to {path}"
        ) from err
    if isinstance(config, dict) and "knowledge" in config:
        return str(config["knowledge"])
    return DEFAULT_KNOWLEDGE


def load_run(path: Path, metrics: Sequence[str] = TABLE_METRICS) -> RunRecord:
    """Read and check one metrics.json; errors name the file and the missing or bad entry."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(
            f"{path}: not valid JSON ({err}); the job probably died while writing it - "
            f"rerun the job or delete its directory"
        ) from err
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    for key in REQUIRED_KEYS:
        if key not in data:
            raise ReportError(
                f"{path}: missing key {key!r}; it is not a metrics.json written by kar's "
                f"train stage - rerun the job or delete its directory"
            )
    scores: dict[str, dict[str, float]] = {}
    for split in SPLITS:
        values = data[split]
        if not isinstance(values, dict):
            raise ReportError(f"{path}: {split!r} must map metric names to numbers")
        for metric in metrics:
            if metric not in values:
                raise ReportError(
                    f"{path}: missing key {split}.{metric}; choose --metric among "
                    f"{', '.join(sorted(values)) or '(none)'}"
                )
            value = values[metric]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ReportError(f"{path}: {split}.{metric} must be a number, got {value!r}")
        scores[split] = {metric: float(values[metric]) for metric in metrics}
    seed = data["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ReportError(f"{path}: 'seed' must be an integer, got {seed!r}")
    slice_samples: dict[str, int] = {}
    for name, values in (data.get("slices") or {}).get(SLICE_SPLIT, {}).items():
        # A slice without a metric (a single class in it) is left out of the comparison.
        if isinstance(values, dict) and all(_is_number(values.get(m)) for m in metrics):
            scores[f"{SLICE_SPLIT}:{name}"] = {m: float(values[m]) for m in metrics}
            slice_samples[f"{SLICE_SPLIT}:{name}"] = int(values.get("samples", 0))
    return RunRecord(
        path=path,
        dataset=str(data["dataset"]),
        backbone=str(data["backbone"]),
        adaptor=str(data["adaptor"]),
        llm=str(data["llm"]),
        knowledge=_knowledge_of(path, data),
        seed=seed,
        scores=scores,
        slice_samples=slice_samples,
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------- comparing
def _improvement_pct(base: float, kar: float, higher_is_better: bool) -> float:
    change = (kar - base) if higher_is_better else (base - kar)
    return 100.0 * change / base


def _std(values: Sequence[float]) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) >= 2 else None


def _compare(
    metric: str, split: str, base: dict[int, RunRecord], kar: dict[int, RunRecord]
) -> MetricComparison:
    higher = metric not in LOWER_IS_BETTER
    base_values = [base[s].scores[split][metric] for s in sorted(base)]
    kar_values = [kar[s].scores[split][metric] for s in sorted(kar)]
    paired = sorted(set(base) & set(kar))
    base_paired = np.array([base[s].scores[split][metric] for s in paired])
    kar_paired = np.array([kar[s].scores[split][metric] for s in paired])
    p_value = None
    if len(paired) >= 2:
        p = float(stats.ttest_rel(kar_paired, base_paired).pvalue)
        p_value = None if math.isnan(p) else p  # identical differences: no variance to test
    base_mean, kar_mean = float(np.mean(base_values)), float(np.mean(kar_values))
    return MetricComparison(
        metric=metric,
        base_mean=base_mean,
        base_std=_std(base_values),
        kar_mean=kar_mean,
        kar_std=_std(kar_values),
        improvement_pct=_improvement_pct(base_mean, kar_mean, higher),
        paired_improvements_pct=tuple(
            _improvement_pct(float(b), float(k), higher)
            for b, k in zip(base_paired, kar_paired, strict=True)
        ),
        p_value=p_value,
    )


def _describe(path_a: Path, path_b: Path) -> str:
    return f"{path_a} and {path_b}"


def _index_kar(runs: list[RunRecord]) -> dict[tuple[str, ...], dict[int, RunRecord]]:
    groups: dict[tuple[str, ...], dict[int, RunRecord]] = defaultdict(dict)
    for run in runs:
        key = (run.dataset, run.knowledge, run.backbone, run.adaptor, run.llm)
        if run.seed in groups[key]:
            raise ReportError(
                f"two KAR runs with the same dataset/knowledge/backbone/adaptor/llm/seed: "
                f"{_describe(groups[key][run.seed].path, run.path)}. The sweep varied something "
                f"else; report each setting's directory separately (if it varied `knowledge`, "
                f"metrics.json or the job's config.yaml must say so)"
            )
        groups[key][run.seed] = run
    return groups


def _index_base(runs: list[RunRecord]) -> dict[tuple[str, str], dict[int, list[RunRecord]]]:
    seen: dict[tuple[Any, ...], RunRecord] = {}
    groups: dict[tuple[str, str], dict[int, list[RunRecord]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for run in runs:
        identity = (run.dataset, run.backbone, run.knowledge, run.llm, run.seed)
        if identity in seen:
            raise ReportError(
                f"two base runs with the same dataset/backbone/knowledge/llm/seed: "
                f"{_describe(seen[identity].path, run.path)}. The sweep varied something else; "
                f"report each setting's directory separately"
            )
        seen[identity] = run
        groups[(run.dataset, run.backbone)][run.seed].append(run)
    return groups


def _pick_base(candidates: list[RunRecord], knowledge: str, llm: str) -> RunRecord:
    # Base runs ignore knowledge and LLM, so any would do; a sweep that crossed them with
    # adaptor=none ran the base several times, and the matching one is the natural partner.
    return min(candidates, key=lambda r: (r.knowledge != knowledge, r.llm != llm, str(r.path)))


def _metrics_files(root: Path) -> list[Path]:
    if not root.exists():
        raise FileNotFoundError(
            f"{root}: no such directory; pass the Hydra multirun directory (hydra.sweep.dir)"
        )
    if not root.is_dir():
        raise ReportError(f"{root}: not a directory; pass the Hydra multirun directory")
    files = sorted(root.rglob("metrics.json"))
    if not files:
        raise FileNotFoundError(
            f"{root}: no metrics.json found below it; pass a multirun directory whose jobs "
            f"finished training (stage=train)"
        )
    return files


def build_report(roots: Path | Sequence[Path], metric: str = "auc") -> ReportTables:
    """Compare every KAR variant under `roots` with the base runs of its dataset and backbone."""
    roots = (Path(roots),) if isinstance(roots, (str, Path)) else tuple(map(Path, roots))
    if not roots:
        raise ReportError("no directory given; pass at least one Hydra multirun directory")
    root = roots[0]
    files = sorted({f for r in roots for f in _metrics_files(r)})
    metrics = TABLE_METRICS if metric in TABLE_METRICS else (*TABLE_METRICS, metric)
    runs = [load_run(path, metrics) for path in files]
    base_runs = [r for r in runs if r.adaptor == BASE_ADAPTOR]
    kar_runs = [r for r in runs if r.adaptor != BASE_ADAPTOR]
    if not kar_runs:
        raise ReportError(
            f"{root}: all {len(runs)} runs have adaptor=none; include a KAR adaptor in the "
            f"sweep, e.g. `adaptor=none,base`"
        )
    if not base_runs:
        raise ReportError(
            f"{root}: no base runs to compare against (every run uses an adaptor); include "
            f"adaptor=none in the sweep, e.g. `python -m kar -m adaptor=none,base seed=1,2,3`"
        )

    kar_groups = _index_kar(kar_runs)
    base_groups = _index_base(base_runs)
    notes: list[str] = []
    rows: dict[str, list[ComparisonRow]] = defaultdict(list)
    slice_samples: dict[tuple[str, str], int] = {}
    used_base: set[tuple[str, str]] = set()
    for key in sorted(kar_groups):
        dataset, knowledge, backbone, adaptor, llm = key
        kar = kar_groups[key]
        if (dataset, backbone) not in base_groups:
            files_hint = ", ".join(str(r.path) for r in list(kar.values())[:2])
            raise ReportError(
                f"no base runs for dataset={dataset} backbone={backbone} to compare {files_hint} "
                f"against; include adaptor=none for that backbone in the sweep"
            )
        used_base.add((dataset, backbone))
        base = {
            seed: _pick_base(candidates, knowledge, llm)
            for seed, candidates in base_groups[(dataset, backbone)].items()
        }
        only_base = sorted(set(base) - set(kar))
        only_kar = sorted(set(kar) - set(base))
        if only_base or only_kar:
            parts = []
            if only_base:
                parts.append(f"seeds {only_base} have no KAR run")
            if only_kar:
                parts.append(f"seeds {only_kar} have no base run")
            notes.append(
                f"{dataset}/{knowledge}/{backbone}/{adaptor}/{llm}: {'; '.join(parts)} - "
                f"excluded from the paired test (still in the means)"
            )
        group_runs = [*kar.values(), *base.values()]
        sliced = sorted({s for run in group_runs for s in run.slice_samples})
        complete = [s for s in sliced if all(s in run.scores for run in group_runs)]
        if len(complete) < len(sliced):
            notes.append(
                f"{dataset}/{knowledge}/{backbone}/{adaptor}/{llm}: slices "
                f"{sorted(set(sliced) - set(complete))} are missing from some runs (older runs, "
                f"or a slice with a single class) - not compared"
            )
        for run in group_runs:
            for name in complete:
                slice_samples.setdefault((dataset, name), run.slice_samples[name])
        for split in (*SPLITS, *complete):
            rows[split].append(
                ComparisonRow(
                    split=split,
                    dataset=dataset,
                    knowledge=knowledge,
                    backbone=backbone,
                    adaptor=adaptor,
                    llm=llm,
                    base_seeds=tuple(sorted(base)),
                    kar_seeds=tuple(sorted(kar)),
                    metrics={m: _compare(m, split, base, kar) for m in metrics},
                )
            )
    for dataset, backbone in sorted(set(base_groups) - used_base):
        notes.append(
            f"{dataset}/{backbone}: base runs without any KAR run to compare with - ignored"
        )
    return ReportTables(
        root=root,
        metric=metric,
        metrics=metrics,
        test=rows["test"],
        valid=rows["valid"],
        notes=notes,
        slices={split: rows[split] for split in sorted(rows) if split not in SPLITS},
        slice_samples=slice_samples,
        roots=roots,
    )


# ------------------------------------------------------------------------------------ rendering
def _name(metric: str) -> str:
    return DISPLAY_NAMES.get(metric, metric)


def _mean_std(mean: float, std: float | None) -> str:
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.3g}"


def _seeds_cell(row: ComparisonRow) -> str:
    n_pairs = len(row.paired_seeds)
    unpaired = len(set(row.base_seeds) ^ set(row.kar_seeds))
    return f"{n_pairs}" if not unpaired else f"{n_pairs} (+{unpaired} unpaired)"


def to_frame(tables: ReportTables) -> pd.DataFrame:
    """One CSV row per (split, dataset, knowledge, backbone, adaptor, llm)."""
    records = []
    for split in tables.splits:
        for row in tables.rows(split):
            record: dict[str, Any] = {
                "split": split,
                "dataset": row.dataset,
                "knowledge": row.knowledge,
                "backbone": row.backbone,
                "adaptor": row.adaptor,
                "llm": row.llm,
                "base_runs": len(row.base_seeds),
                "kar_runs": len(row.kar_seeds),
                "paired_seeds": len(row.paired_seeds),
            }
            for metric, c in row.metrics.items():
                record |= {
                    f"{metric}_base_mean": c.base_mean,
                    f"{metric}_base_std": c.base_std,
                    f"{metric}_kar_mean": c.kar_mean,
                    f"{metric}_kar_std": c.kar_std,
                    f"{metric}_improvement_pct": c.improvement_pct,
                    f"{metric}_paired_improvement_std": c.paired_improvement_std,
                    f"{metric}_p_value": c.p_value,
                }
            records.append(record)
    return pd.DataFrame.from_records(records)


def _markdown_table(rows: list[ComparisonRow], metrics: Sequence[str]) -> list[str]:
    header = ["Backbone", "Adaptor", "LLM", "Seeds"]
    for m in metrics:
        header += [f"Base {_name(m)}", f"KAR {_name(m)}", f"Impr. {_name(m)}", f"p ({_name(m)})"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.backbone, row.adaptor, row.llm, _seeds_cell(row)]
        for m in metrics:
            c = row.metrics[m]
            cells += [
                _mean_std(c.base_mean, c.base_std),
                _mean_std(c.kar_mean, c.kar_std),
                f"{c.improvement_pct:+.2f}%",
                _p(c.p_value),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _split_sections(
    tables: ReportTables, split: str, suffix: Callable[[str], str], level: str = "###"
) -> list[str]:
    """One table per (dataset, knowledge) of `split`'s rows; `suffix(dataset)` ends the title."""
    lines: list[str] = []
    sections = sorted({(r.dataset, r.knowledge) for r in tables.rows(split)})
    for dataset, knowledge in sections:
        rows = [r for r in tables.rows(split) if (r.dataset, r.knowledge) == (dataset, knowledge)]
        rows.sort(key=lambda r: (r.backbone, r.adaptor, r.llm))
        lines += ["", f"{level} {dataset} · knowledge: {knowledge}{suffix(dataset)}", ""]
        lines += _markdown_table(rows, tables.metrics)
    return lines


def to_markdown(tables: ReportTables) -> str:
    lines = [
        f"# KAR vs base: {', '.join(map(str, tables.roots or (tables.root,)))}",
        "",
        "Mean ± sample std (ddof=1) over seeds. Impr. = relative improvement of the KAR mean "
        "over the base mean (an increase for AUC, a decrease for LogLoss). p = paired t-test "
        "across seeds (scipy.stats.ttest_rel); n/a with fewer than 2 paired seeds.",
    ]
    titled = [
        ("test", "Test split"),
        ("valid", "Validation split (checkpoint selection happens here)"),
    ]
    for split, title in titled:
        lines += ["", f"## {title}"]
        lines += _split_sections(tables, split, lambda dataset: "")
    if tables.slices:
        lines += [
            "",
            f"## Slices of the {SLICE_SPLIT} split",
            "",
            "The same runs scored on the samples where open-world knowledge should matter "
            "most (thresholds: `task.slices`, see kar/slices.py).",
        ]
        for split in sorted(tables.slices):
            name = split.split(":", 1)[1]
            lines += ["", f"### {SLICE_TITLES.get(name, name)}"]
            lines += _split_sections(
                tables,
                split,
                lambda dataset, split=split: (
                    f" · {tables.slice_samples.get((dataset, split), '?')} samples"
                ),
                level="####",
            )
    if tables.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in tables.notes]
    return "\n".join(lines) + "\n"


def _bar_labels(rows: list[ComparisonRow]) -> list[str]:
    # Only the parts that differ between bars; the backbone always shows.
    fields = ("dataset", "knowledge", "backbone", "adaptor", "llm")
    varying = [f for f in fields if f == "backbone" or len({getattr(r, f) for r in rows}) > 1]
    return ["/".join(getattr(r, f) for f in varying) for r in rows]


def plot_gains(tables: ReportTables, path: Path) -> Path:
    """Bar chart of the relative test improvement per backbone, error bars = paired-seed std."""
    # The object API with the Agg canvas: no pyplot global state, never a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = sorted(tables.test, key=lambda r: (r.backbone, r.dataset, r.knowledge, r.adaptor, r.llm))
    comparisons = [r.metrics[tables.metric] for r in rows]
    heights = [c.improvement_pct for c in comparisons]
    errors = [c.paired_improvement_std or 0.0 for c in comparisons]
    fig = Figure(figsize=(max(5.0, 1.2 * len(rows) + 2.0), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    positions = np.arange(len(rows))
    colors = ["tab:green" if h >= 0 else "tab:red" for h in heights]
    ax.bar(positions, heights, width=0.6, yerr=errors, capsize=5, color=colors, edgecolor="black")
    ax.set_xlim(-0.75, len(rows) - 0.25)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(positions, _bar_labels(rows), rotation=20 if len(rows) > 4 else 0)
    name = _name(tables.metric)
    change = "decrease" if tables.metric in LOWER_IS_BETTER else "improvement"
    ax.set_xlabel("Backbone")
    ax.set_ylabel(f"Relative test {name} {change} (%)")
    ax.set_title(f"KAR vs base, test {name}\n(error bars: std over paired seeds)")
    ax.use_sticky_edges = False  # let the zero line sit inside the frame, not on its edge
    ax.margins(y=0.15)
    fig.savefig(path, format="png", dpi=120)
    return path


def write_report(tables: ReportTables, out_dir: Path) -> list[Path]:
    """Write report.md, report.csv and report_gains.png into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, csv_path, png_path = (out_dir / name for name in REPORT_FILES)
    md_path.write_text(to_markdown(tables))
    to_frame(tables).to_csv(csv_path, index=False)
    plot_gains(tables, png_path)
    return [md_path, csv_path, png_path]


def log_to_wandb(tables: ReportTables, out_dir: Path) -> bool:
    """Log both tables (and the chart) to a W&B run of project "kar", job_type "report".

    Offline unless env WANDB_MODE says otherwise; WANDB_MODE=disabled makes it a no-op.
    Returns whether anything was logged.
    """
    from kar.tracking import LoggerConfig, resolve_mode

    mode = resolve_mode(LoggerConfig(project="kar", mode="offline"))
    if mode == "disabled":
        return False
    import wandb  # slow import: only when something is logged

    frame = to_frame(tables)
    run = wandb.init(
        project="kar",
        job_type="report",
        mode=mode,
        dir=str(out_dir),
        config={"root": str(tables.root), "metric": tables.metric},
        settings=wandb.Settings(x_disable_meta=True, console="off", save_code=False),
    )
    try:
        for split in tables.splits:
            part = frame[frame["split"] == split].astype(object)
            run.log({f"report/{split}": wandb.Table(dataframe=part.where(part.notna(), None))})
        png = out_dir / REPORT_FILES[2]
        if png.exists():
            run.log({"report/gains": wandb.Image(str(png))})
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
    return True


# ------------------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kar.report",
        description="Compare KAR runs with base (adaptor=none) runs of a Hydra multirun.",
    )
    parser.add_argument(
        "roots",
        type=Path,
        nargs="+",
        metavar="root",
        help="multirun directories (hydra.sweep.dir); the runs of all of them are pooled",
    )
    parser.add_argument(
        "--metric", default="auc", help="headline metric for the chart (default: auc)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write the report (default: the root)"
    )
    parser.add_argument(
        "--wandb",
        action="store_true",
        help="also log the tables to W&B (offline unless WANDB_MODE says otherwise)",
    )
    args = parser.parse_args(argv)
    try:
        tables = build_report(args.roots, metric=args.metric)
        out_dir = args.out if args.out is not None else args.roots[0]
        paths = write_report(tables, out_dir)
        if args.wandb:
            log_to_wandb(tables, out_dir)
    except (KarError, OSError) as err:  # bad input or unwritable --out: no traceback
        print(f"kar.report: error: {err}", file=sys.stderr)
        return 1
    print(to_markdown(tables))
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
