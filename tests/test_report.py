"""kar.report on fake multirun directories whose expected numbers the tests compute themselves."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from kar.report import ReportError, build_report, log_to_wandb, main, write_report

SEEDS = (1, 2, 3)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# (backbone, adaptor) -> split -> metric -> one value per seed in SEEDS. The KAR gains differ
# between seeds, so the paired differences have a variance and the t-test a finite p-value.
SCORES = {
    ("dcnv2", "none"): {
        "test": {"auc": [0.7500, 0.7540, 0.7480], "logloss": [0.5900, 0.5870, 0.5920]},
        "valid": {"auc": [0.8000, 0.8030, 0.7990], "logloss": [0.5400, 0.5380, 0.5410]},
    },
    ("dcnv2", "hea"): {
        "test": {"auc": [0.7610, 0.7620, 0.7605], "logloss": [0.5810, 0.5800, 0.5850]},
        "valid": {"auc": [0.8090, 0.8100, 0.8060], "logloss": [0.5330, 0.5320, 0.5350]},
    },
    ("deepfm", "none"): {
        "test": {"auc": [0.7400, 0.7420, 0.7390], "logloss": [0.6000, 0.5980, 0.6010]},
        "valid": {"auc": [0.7900, 0.7910, 0.7880], "logloss": [0.5500, 0.5490, 0.5520]},
    },
    ("deepfm", "hea"): {
        "test": {"auc": [0.7390, 0.7425, 0.7370], "logloss": [0.6020, 0.5985, 0.6040]},
        "valid": {"auc": [0.7890, 0.7930, 0.7870], "logloss": [0.5510, 0.5470, 0.5560]},
    },
}


def write_run(
    path: Path,
    *,
    backbone: str,
    adaptor: str,
    seed: int,
    scores: dict[str, dict[str, float]],
    knowledge: str | None = None,
    llm: str = "klg",
    dataset: str = "ml-100k",
    slices: dict | None = None,
) -> Path:
    """A job directory with a metrics.json shaped like kar.pipeline.train writes it."""
    metrics = {
        "valid": scores["valid"],
        "test": scores["test"],
        "best_epoch": 2,
        "epochs_run": 4,
        "trainable_parameters": 1000,
        "backbone": backbone,
        "adaptor": adaptor,
        "llm": llm,
        "dataset": dataset,
        "seed": seed,
        "history": [],
    }
    if knowledge is not None:
        metrics["knowledge"] = knowledge
    if slices is not None:
        metrics["slices"] = slices
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path / "metrics.json"


def seed_scores(backbone: str, adaptor: str, seed: int) -> dict[str, dict[str, float]]:
    i = SEEDS.index(seed)
    table = SCORES[(backbone, adaptor)]
    return {split: {m: values[i] for m, values in table[split].items()} for split in table}


def make_sweep(root: Path, skip: set[tuple[str, str, int]] = frozenset()) -> Path:
    """2 backbones x {none, hea} x 3 seeds, numbered like Hydra's job dirs, minus `skip`."""
    job = 0
    for backbone in ("deepfm", "dcnv2"):  # not sorted: the report sorts
        for adaptor in ("none", "hea"):
            for seed in SEEDS:
                if (backbone, adaptor, seed) not in skip:
                    write_run(
                        root / f"{job}_adaptor={adaptor},backbone={backbone}",
                        backbone=backbone,
                        adaptor=adaptor,
                        seed=seed,
                        scores=seed_scores(backbone, adaptor, seed),
                    )
                job += 1
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def expected(backbone: str, split: str, metric: str, seeds: tuple[int, ...] = SEEDS) -> dict:
    """The numbers the report should show, computed here from SCORES alone."""
    base = np.array(SCORES[(backbone, "none")][split][metric])
    kar = np.array(SCORES[(backbone, "hea")][split][metric])
    idx = [SEEDS.index(s) for s in seeds]
    sign = 1.0 if metric == "auc" else -1.0  # LogLoss improves by going down
    per_seed = sign * (kar[idx] - base[idx]) / base[idx] * 100
    return {
        "base_mean": base.mean(),
        "base_std": base.std(ddof=1),
        "kar_mean": kar.mean(),
        "kar_std": kar.std(ddof=1),
        "improvement_pct": sign * (kar.mean() - base.mean()) / base.mean() * 100,
        "paired_improvement_std": per_seed.std(ddof=1),
        "p_value": stats.ttest_rel(kar[idx], base[idx]).pvalue,
    }


def test_csv_and_markdown_match_independent_computation(tmp_path: Path) -> None:
    root = make_sweep(tmp_path / "sweep")
    paths = write_report(build_report(root), tmp_path / "out")
    assert [p.name for p in paths] == ["report.md", "report.csv", "report_gains.png"]

    rows = read_csv(tmp_path / "out" / "report.csv")
    assert [(r["split"], r["backbone"]) for r in rows] == [
        ("test", "dcnv2"),
        ("test", "deepfm"),
        ("valid", "dcnv2"),
        ("valid", "deepfm"),
    ]
    for row in rows:
        assert (row["dataset"], row["knowledge"], row["adaptor"], row["llm"]) == (
            "ml-100k",
            "both",
            "hea",
            "klg",
        )
        assert (row["base_runs"], row["kar_runs"], row["paired_seeds"]) == ("3", "3", "3")
        for metric in ("auc", "logloss"):
            for name, value in expected(row["backbone"], row["split"], metric).items():
                assert float(row[f"{metric}_{name}"]) == pytest.approx(value, rel=1e-9), (
                    row["split"],
                    row["backbone"],
                    metric,
                    name,
                )
    # The fake numbers make KAR help DCNv2 and hurt DeepFM: the signs must come through.
    assert float(rows[0]["auc_improvement_pct"]) > 0 > float(rows[1]["auc_improvement_pct"])

    md = (tmp_path / "out" / "report.md").read_text()
    test_part, valid_part = md.split("## Validation split")
    assert "## Test split" in test_part
    e = expected("dcnv2", "test", "auc")
    assert f"{e['base_mean']:.4f} ± {e['base_std']:.4f}" in test_part
    assert f"{e['kar_mean']:.4f} ± {e['kar_std']:.4f}" in test_part
    assert f"{e['improvement_pct']:+.2f}%" in test_part
    assert f"{e['p_value']:.3g}" in test_part
    e_valid = expected("deepfm", "valid", "logloss")
    assert f"{e_valid['improvement_pct']:+.2f}%" in valid_part
    assert test_part.index("| dcnv2 |") < test_part.index("| deepfm |")
    assert "ml-100k · knowledge: both" in test_part


def test_gains_chart_is_a_png(tmp_path: Path) -> None:
    root = make_sweep(tmp_path / "sweep")
    write_report(build_report(root), root)
    png = root / "report_gains.png"
    data = png.read_bytes()
    assert len(data) > 1000
    assert data[:8] == PNG_MAGIC


def test_runs_are_paired_by_seed(tmp_path: Path) -> None:
    # DCNv2: KAR lacks seed 3 and has an extra seed 4 with no base partner.
    root = make_sweep(tmp_path / "sweep", skip={("dcnv2", "hea", 3)})
    extra = {"test": {"auc": 0.99, "logloss": 0.1}, "valid": {"auc": 0.99, "logloss": 0.1}}
    write_run(root / "extra", backbone="dcnv2", adaptor="hea", seed=4, scores=extra)
    tables = build_report(root)

    row = next(r for r in tables.test if r.backbone == "dcnv2")
    assert row.paired_seeds == (1, 2)
    base = np.array(SCORES[("dcnv2", "none")]["test"]["auc"][:2])
    kar = np.array(SCORES[("dcnv2", "hea")]["test"]["auc"][:2])
    auc = row.metrics["auc"]
    assert auc.p_value == pytest.approx(stats.ttest_rel(kar, base).pvalue, rel=1e-9)
    # Means use every run of each side, the unpaired ones included.
    assert auc.kar_mean == pytest.approx(np.mean([*kar, 0.99]))
    assert auc.base_mean == pytest.approx(np.mean(SCORES[("dcnv2", "none")]["test"]["auc"]))
    assert len(auc.paired_improvements_pct) == 2

    (note,) = tables.notes
    assert "dcnv2" in note and "[3] have no KAR run" in note and "[4] have no base run" in note
    write_report(tables, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| dcnv2 | hea | klg | 2 (+2 unpaired) |" in md
    assert "## Notes" in md and "excluded from the paired test" in md
    csv_row = next(
        r
        for r in read_csv(tmp_path / "out" / "report.csv")
        if (r["split"], r["backbone"]) == ("test", "dcnv2")
    )
    assert (csv_row["base_runs"], csv_row["kar_runs"], csv_row["paired_seeds"]) == ("3", "3", "2")


def test_fewer_than_two_pairs_gives_no_p_value(tmp_path: Path) -> None:
    root = make_sweep(
        tmp_path / "sweep", skip={("dcnv2", "hea", 2), ("dcnv2", "hea", 3), ("deepfm", "none", 3)}
    )
    tables = build_report(root)
    dcnv2 = next(r for r in tables.test if r.backbone == "dcnv2")
    assert dcnv2.metrics["auc"].p_value is None
    assert dcnv2.metrics["auc"].kar_std is None  # a single run has no spread
    assert dcnv2.metrics["auc"].paired_improvement_std is None
    deepfm = next(r for r in tables.test if r.backbone == "deepfm")
    assert deepfm.metrics["auc"].p_value is not None  # 2 pairs still test
    write_report(tables, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    dcnv2_line = next(line for line in md.splitlines() if line.startswith("| dcnv2 |"))
    assert dcnv2_line.count("n/a") == 2  # AUC and LogLoss
    csv_row = read_csv(tmp_path / "out" / "report.csv")[0]
    assert csv_row["backbone"] == "dcnv2" and csv_row["auc_p_value"] == ""


def test_knowledge_settings_share_the_base_runs(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    for seed in SEEDS:
        write_run(
            root / f"base{seed}",
            backbone="dcnv2",
            adaptor="none",
            seed=seed,
            scores=seed_scores("dcnv2", "none", seed),
        )
        write_run(
            root / f"user{seed}",
            backbone="dcnv2",
            adaptor="hea",
            seed=seed,
            knowledge="user",
            scores=seed_scores("dcnv2", "hea", seed),
        )
        # No knowledge field: the job's config.yaml next to it says which knowledge it used.
        item = write_run(
            root / f"item{seed}",
            backbone="dcnv2",
            adaptor="hea",
            seed=seed,
            scores=seed_scores("deepfm", "hea", seed),
        )
        (item.parent / "config.yaml").write_text("seed: 1\nknowledge: item\n")
    tables = build_report(root)
    assert [(r.knowledge, r.backbone) for r in tables.test] == [
        ("item", "dcnv2"),
        ("user", "dcnv2"),
    ]
    item_row, user_row = tables.test
    assert item_row.metrics["auc"].kar_mean == pytest.approx(
        np.mean(SCORES[("deepfm", "hea")]["test"]["auc"])
    )
    assert user_row.metrics["auc"].base_mean == item_row.metrics["auc"].base_mean
    write_report(tables, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "knowledge: item" in md and "knowledge: user" in md
    assert {r["knowledge"] for r in read_csv(tmp_path / "out" / "report.csv")} == {"item", "user"}


def test_each_adaptor_gets_its_own_rows(tmp_path: Path) -> None:
    root = make_sweep(tmp_path / "sweep")
    for seed in SEEDS:
        write_run(
            root / f"moe{seed}",
            backbone="dcnv2",
            adaptor="moe",
            seed=seed,
            scores=seed_scores("deepfm", "hea", seed),
        )
    tables = build_report(root)
    assert [(r.backbone, r.adaptor) for r in tables.test] == [
        ("dcnv2", "hea"),
        ("dcnv2", "moe"),
        ("deepfm", "hea"),
    ]
    assert tables.test[0].metrics["auc"].base_mean == tables.test[1].metrics["auc"].base_mean


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such directory"):
        build_report(tmp_path / "nope")


def test_no_metrics_files(tmp_path: Path) -> None:
    (tmp_path / "0_adaptor=none").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no metrics\.json"):
        build_report(tmp_path)


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    root = make_sweep(tmp_path / "sweep")
    broken = root / "0_adaptor=none,backbone=deepfm" / "metrics.json"
    broken.write_text('{"valid": {"auc": 0.8')
    with pytest.raises(ReportError, match="not valid JSON") as err:
        build_report(root)
    assert str(broken) in str(err.value)


@pytest.mark.parametrize(
    ("drop", "message"),
    [("seed", "missing key 'seed'"), ("test.logloss", "missing key test.logloss")],
)
def test_missing_field_names_file_and_key(tmp_path: Path, drop: str, message: str) -> None:
    root = make_sweep(tmp_path / "sweep")
    path = root / "4_adaptor=hea,backbone=deepfm" / "metrics.json"
    data = json.loads(path.read_text())
    if "." in drop:
        split, metric = drop.split(".")
        del data[split][metric]
    else:
        del data[drop]
    path.write_text(json.dumps(data))
    with pytest.raises(ReportError, match=message) as err:
        build_report(root)
    assert str(path) in str(err.value)


def test_unknown_metric_is_named(tmp_path: Path) -> None:
    root = make_sweep(tmp_path / "sweep")
    with pytest.raises(ReportError, match=r"missing key test\.gauc.*auc, logloss"):
        build_report(root, metric="gauc")


def test_no_base_runs(tmp_path: Path) -> None:
    root = make_sweep(
        tmp_path / "sweep",
        skip={(b, "none", s) for b in ("dcnv2", "deepfm") for s in SEEDS},
    )
    with pytest.raises(ReportError, match="adaptor=none"):
        build_report(root)


def test_backbone_without_base_runs(tmp_path: Path) -> None:
    root = make_sweep(tmp_path / "sweep", skip={("deepfm", "none", s) for s in SEEDS})
    with pytest.raises(ReportError, match=r"backbone=deepfm.*adaptor=none"):
        build_report(root)


def test_duplicate_kar_runs_are_refused(tmp_path: Path) -> None:
    root = make_sweep(tmp_path / "sweep")
    write_run(
        root / "again",
        backbone="dcnv2",
        adaptor="hea",
        seed=1,
        scores=seed_scores("dcnv2", "hea", 1),
    )
    with pytest.raises(ReportError, match="two KAR runs") as err:
        build_report(root)
    assert str(root / "again" / "metrics.json") in str(err.value)


def test_cli_writes_next_to_the_jobs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_sweep(tmp_path / "sweep")
    assert main([str(root)]) == 0
    out = capsys.readouterr().out
    assert "| dcnv2 | hea | klg | 3 |" in out
    for name in ("report.md", "report.csv", "report_gains.png"):
        assert (root / name).stat().st_size > 0


def test_cli_logloss_metric_and_out_dir(tmp_path: Path) -> None:
    root = make_sweep(tmp_path / "sweep")
    assert main([str(root), "--metric", "logloss", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report_gains.png").read_bytes()[:8] == PNG_MAGIC
    assert not (root / "report.md").exists()


def test_cli_reports_errors_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kar.report: error:") and str(tmp_path / "missing") in err
    assert "Traceback" not in err


def test_wandb_disabled_is_a_no_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    root = make_sweep(tmp_path / "sweep")
    out = tmp_path / "out"
    assert main([str(root), "--out", str(out), "--wandb"]) == 0
    assert log_to_wandb(build_report(root), out) is False
    assert sorted(p.name for p in out.iterdir()) == [
        "report.csv",
        "report.md",
        "report_gains.png",
    ]


def sliced_sweep(root: Path, seeds: tuple[int, ...], adaptors=("none", "hea")) -> Path:
    """dcnv2 runs whose metrics.json carries slices; a KAR slice AUC gains 0.01 + 0.001 * seed."""
    for adaptor in adaptors:
        for seed in seeds:
            scores = seed_scores("dcnv2", adaptor, seed)
            cold_auc = 0.70 + (0.01 + 0.001 * seed if adaptor == "hea" else 0.0)
            write_run(
                root / f"{seed}_adaptor={adaptor}",
                backbone="dcnv2",
                adaptor=adaptor,
                seed=seed,
                scores=scores,
                slices={
                    "test": {
                        "cold_items": {
                            "samples": 1003,
                            "positive_rate": 0.37,
                            "auc": cold_auc,
                            "logloss": 0.6,
                        },
                        # a single class: no metrics, so never compared
                        "short_history_users": {"samples": 3, "positive_rate": 1.0},
                    },
                    "valid": {"cold_items": {"samples": 9, "auc": 0.5, "logloss": 0.7}},
                },
            )
    return root


def test_slices_are_compared_like_the_test_split(tmp_path: Path) -> None:
    tables = build_report(sliced_sweep(tmp_path / "sweep", SEEDS))

    assert tables.splits == ("test", "valid", "test:cold_items")
    (row,) = tables.rows("test:cold_items")
    auc = row.metrics["auc"]
    kar = [0.70 + 0.01 + 0.001 * s for s in SEEDS]
    assert auc.base_mean == pytest.approx(0.70)
    assert auc.kar_mean == pytest.approx(np.mean(kar))
    assert auc.improvement_pct == pytest.approx((np.mean(kar) - 0.70) / 0.70 * 100)
    assert auc.p_value == pytest.approx(stats.ttest_rel(kar, [0.70] * 3).pvalue)
    markdown = (Path(write_report(tables, tmp_path / "out")[0])).read_text()
    assert "## Slices of the test split" in markdown
    assert "Cold items" in markdown and "1003 samples" in markdown
    assert "short_history" not in markdown and "Users with short" not in markdown
    splits = [r["split"] for r in read_csv(tmp_path / "out" / "report.csv")]
    assert splits == ["test", "valid", "test:cold_items"]


def test_runs_of_several_directories_are_pooled(tmp_path: Path) -> None:
    base_dir = sliced_sweep(tmp_path / "base", SEEDS, adaptors=("none",))
    kar_dir = sliced_sweep(tmp_path / "kar", SEEDS, adaptors=("hea",))

    with pytest.raises(ReportError, match="adaptor=none"):
        build_report(kar_dir)  # alone, nothing to compare with
    tables = build_report([base_dir, kar_dir])

    (row,) = tables.test
    assert row.paired_seeds == SEEDS
    assert row.metrics["auc"].kar_mean == pytest.approx(
        expected("dcnv2", "test", "auc")["kar_mean"]
    )
    assert main([str(base_dir), str(kar_dir), "--out", str(tmp_path / "out")]) == 0
    assert str(kar_dir) in (tmp_path / "out" / "report.md").read_text()
