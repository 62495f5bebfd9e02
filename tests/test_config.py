"""The composed Hydra config: every option of every group builds, and bad input fails at start.

"At start" means in Hydra's composition or in `kar.config.validate`, before `kar.pipeline.run`
touches any data: those checks run without data files or a run directory. (Building the klg
import reads the real knowledge files, so that one test needs KAR_DATA_DIR.)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from kar.config import MAX_SUFFIX_CHARS, run_dir_suffix, validate
from kar.engine import TrainConfig, validate_config
from kar.errors import ConfigError
from kar.knowledge.encoder import TransformersEncoder
from kar.knowledge.llm.base import LLMProvider
from kar.models import KARModel, KnowledgeTables, build_model
from kar.nn.adaptor import HybridExpertAdaptor
from kar.registry import ADAPTORS, BACKBONES, DATASETS, ENCODERS, LLMS, init_kwargs
from kar.tracking import LoggerConfig, Tracker, tracking_run

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# Every config group; experiment holds optional presets (`experiment=<stem>`).
GROUPS = ("dataset", "llm", "encoder", "adaptor", "backbone", "task", "train", "paths", "logger")
REGISTRIES = {
    "dataset": DATASETS,
    "llm": LLMS,
    "encoder": ENCODERS,
    "adaptor": ADAPTORS,
    "backbone": BACKBONES,
}
SPEC = {"user": 9, "item": 15, "genre": 6, "gender": 3, "age": 7, "occupation": 5, "rating": 6}
KNOWLEDGE_DIM, BATCH, HISTORY, GENRES = 12, 6, 4, 3

Compose = Callable[..., DictConfig]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


GROUP_OPTIONS = [(group, option) for group in GROUPS for option in options(group)]
EXPERIMENTS = options("experiment") if (CONF / "experiment").is_dir() else []


def random_batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A batch in the CONTRACT format, with padding where the format has it."""

    def ids(high: int, *shape: int) -> torch.Tensor:
        return torch.randint(1, high, shape, generator=generator)

    hist_len = torch.arange(BATCH) % (HISTORY + 1)  # (B,) 0..L: empty and full histories
    valid = torch.arange(HISTORY).unsqueeze(0) < hist_len.unsqueeze(1)  # (B, L)
    n_genres = torch.randint(1, GENRES + 1, (BATCH,), generator=generator)  # (B,)
    genre_kept = torch.arange(GENRES).unsqueeze(0) < n_genres.unsqueeze(1)  # (B, G) right-padded
    return {
        "label": torch.randint(0, 2, (BATCH,), generator=generator).float(),
        "user": ids(SPEC["user"], BATCH),
        "item": ids(SPEC["item"], BATCH),
        "item_genres": ids(SPEC["genre"], BATCH, GENRES) * genre_kept,
        "gender": ids(SPEC["gender"], BATCH),
        "age": ids(SPEC["age"], BATCH),
        "occupation": ids(SPEC["occupation"], BATCH),
        "hist_items": ids(SPEC["item"], BATCH, HISTORY) * valid,
        "hist_genres": ids(SPEC["genre"], BATCH, HISTORY, GENRES) * valid.unsqueeze(-1),
        "hist_ratings": ids(SPEC["rating"], BATCH, HISTORY) * valid,
        "hist_len": hist_len,
    }


def knowledge_tables(generator: torch.Generator) -> KnowledgeTables:
    has_user = torch.arange(SPEC["user"]) % 2 == 1  # some users without knowledge
    return KnowledgeTables(
        user_vectors=torch.randn(SPEC["user"], KNOWLEDGE_DIM, generator=generator),
        item_vectors=torch.randn(SPEC["item"], KNOWLEDGE_DIM, generator=generator),
        user_has=has_user,
        item_has=torch.arange(SPEC["item"]) > 0,
    )


def build_from_config(cfg: DictConfig, generator: torch.Generator) -> KARModel:
    """The model `kar.pipeline.train` builds from this config, on small sizes."""
    adaptor_kwargs = init_kwargs(cfg.adaptor, ADAPTORS.get(cfg.adaptor.name))
    if cfg.adaptor.name != "none":
        adaptor_kwargs["out_dim"] = cfg.adaptor.out_dim
    return build_model(
        backbone=cfg.backbone.name,
        backbone_kwargs=init_kwargs(cfg.backbone, BACKBONES.get(cfg.backbone.name)),
        embed_dim=cfg.backbone.embed_dim,
        feature_spec=SPEC,
        adaptor=cfg.adaptor.name,
        adaptor_kwargs=adaptor_kwargs,
        knowledge=knowledge_tables(generator),
    )


# ------------------------------------------------------------------ every option composes
@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_every_group_option_composes_and_validates(
    compose_cfg: Compose, group: str, option: str
) -> None:
    cfg = validate(compose_cfg(f"{group}={option}"))

    node = cfg[group]
    written = OmegaConf.load(CONF / group / f"{option}.yaml")
    for key in written:
        if key != "defaults":
            assert key in node, f"{group}={option}: {key} lost in composition"
    assert not OmegaConf.is_missing(cfg, group)
    # validate resolves every interpolation: nothing is left for later to fail on.
    assert "${" not in OmegaConf.to_yaml(cfg)


def test_group_options_cover_every_registered_implementation() -> None:
    for group, registry in REGISTRIES.items():
        named = {OmegaConf.load(CONF / group / f"{o}.yaml").get("name") for o in options(group)}
        # bert-base inherits `name` from minilm through its defaults list
        named.discard(None)
        assert set(registry.names()) <= named, f"{group}: registered but no YAML names them"


@pytest.mark.parametrize("backbone", options("backbone"))
@pytest.mark.parametrize("adaptor", options("adaptor"))
def test_every_backbone_and_adaptor_builds_and_predicts(
    compose_cfg: Compose, backbone: str, adaptor: str
) -> None:
    cfg = validate(compose_cfg(f"backbone={backbone}", f"adaptor={adaptor}"))
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    model = build_from_config(cfg, generator)
    logits = model(random_batch(generator))

    assert isinstance(model.backbone, BACKBONES.get(cfg.backbone.name))
    assert logits.shape == (BATCH,) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    if cfg.adaptor.name == "none":
        assert model.adaptor is None
    else:
        assert isinstance(model.adaptor, HybridExpertAdaptor)
        assert model.adaptor.shared.n_experts == cfg.adaptor.n_shared
        assert model.adaptor.out_dim == cfg.backbone.embed_dim
        logits.sum().backward()  # knowledge reaches the logits through the adaptor
        grads = [p.grad for p in model.adaptor.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("option", options("dataset"))
def test_dataset_options_instantiate(compose_cfg: Compose, option: str) -> None:
    cfg = validate(compose_cfg(f"dataset={option}"))
    cls = DATASETS.get(cfg.dataset.name)
    dataset = cls(cfg.dataset.root, **init_kwargs(cfg.dataset, cls))
    assert isinstance(dataset, cls) and callable(dataset.load)  # reading is the data stage's


@pytest.mark.parametrize("option", options("llm"))
def test_llm_options_instantiate(compose_cfg: Compose, data_dir: Path, option: str) -> None:
    # The klg import reads its files when built; they sit in the real data folder.
    cfg = validate(compose_cfg(f"llm={option}", f"paths.data_dir={data_dir}"))
    cls = LLMS.get(cfg.llm.name)
    provider = cls(**init_kwargs(cfg.llm, cls))
    assert isinstance(provider, LLMProvider)
    assert provider.key.startswith(f"{cfg.llm.name}:")


def test_gpt35_with_dcnv2_composes_without_needing_the_key(
    compose_cfg: Compose, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = validate(compose_cfg("backbone=dcnv2", "llm=gpt35"))

    assert (cfg.backbone.name, cfg.llm.name, cfg.llm.model) == ("dcnv2", "openai", "gpt-3.5-turbo")
    assert cfg.llm.api_key_env == "OPENAI_API_KEY"  # the variable's name, never a key
    provider = LLMS.get("openai")(**init_kwargs(cfg.llm, LLMS.get("openai")))
    assert "gpt-3.5-turbo" in provider.key


def test_minilm_encoder_instantiates_offline(compose_cfg: Compose) -> None:
    cfg = validate(compose_cfg("encoder=minilm"))
    encoder = TransformersEncoder(**init_kwargs(cfg.encoder, TransformersEncoder))
    assert encoder.dim == 384
    assert encoder.key.startswith("transformers:all-MiniLM-L6-v2:")


def test_bert_base_encoder_instantiates_from_the_hub_cache_or_names_the_fix(
    compose_cfg: Compose, monkeypatch: pytest.MonkeyPatch
) -> None:
    """encoder=bert-base is a Hugging Face Hub id, not a packaged model.

    Building it loads its config and tokenizer (the weights wait for the first encode), so it
    works offline exactly when the hub cache holds them. Without network access (these machines)
    and without that cache, it must fail at once with a message naming the setting and the fix,
    not retry the network for half a minute.
    """
    cfg = validate(compose_cfg("encoder=bert-base"))
    assert (cfg.encoder.path, cfg.encoder.pooling) == ("bert-base-uncased", "mean")
    # HF_HUB_OFFLINE is read when huggingface_hub is imported, long before any fixture runs.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    kwargs = init_kwargs(cfg.encoder, TransformersEncoder)

    cached = huggingface_hub.try_to_load_from_cache("bert-base-uncased", "config.json")
    if isinstance(cached, str):
        assert TransformersEncoder(**kwargs).dim == 768
        return
    with pytest.raises(ConfigError) as err:
        TransformersEncoder(**kwargs)
    message = str(err.value)
    assert "encoder.path='bert-base-uncased'" in message
    assert "local model folder" in message and "HF_HUB_OFFLINE" in message


def test_train_task_paths_and_logger_become_their_typed_objects(compose_cfg: Compose) -> None:
    cfg = validate(compose_cfg())
    train = OmegaConf.to_object(cfg.train)
    assert isinstance(train, TrainConfig)
    validate_config(train)
    assert cfg.task.name == "ctr" and cfg.task.monitor == "auc"
    assert cfg.paths.store.startswith(cfg.paths.cache_dir)


@pytest.mark.parametrize("option", options("logger"))
def test_logger_options_open_a_tracker(compose_cfg: Compose, tmp_path: Path, option: str) -> None:
    cfg = validate(compose_cfg(f"logger={option}"))
    logger = OmegaConf.to_object(cfg.logger)
    assert isinstance(logger, LoggerConfig) and logger.name == cfg.logger.name
    # WANDB_MODE=disabled (conftest): a W&B run is not opened, but the config is checked.
    with tracking_run(logger, {"seed": 1}, tmp_path) as tracker:
        assert isinstance(tracker, Tracker)


@pytest.mark.parametrize("option", EXPERIMENTS)
def test_experiment_presets_compose(compose_cfg: Compose, option: str) -> None:
    validate(compose_cfg(f"experiment={option}"))


def test_an_experiment_preset_wins_over_the_main_config(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "experiment").mkdir(exist_ok=True)
    (conf / "experiment" / "autoint_seed7.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - override /backbone: autoint\n  - override /adaptor: small\n"
        "seed: 7\nknowledge: user\ntrain:\n  lr: 5.0e-4\n"
    )
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = validate(compose(config_name="config", overrides=["experiment=autoint_seed7"]))
            overridden = compose(
                config_name="config", overrides=["experiment=autoint_seed7", "seed=3"]
            )
    finally:
        GlobalHydra.instance().clear()

    assert (cfg.backbone.name, cfg.adaptor.n_dedicated) == ("autoint", 2)
    assert (cfg.seed, cfg.knowledge, cfg.train.lr) == (7, "user", 5e-4)
    assert overridden.seed == 3  # the command line still wins over the preset


def test_run_dir_is_one_directory_named_by_time_and_overrides(compose_cfg: Compose) -> None:
    def run_dir(*overrides: str) -> Path:
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
        return Path(cfg.hydra.run.dir)

    plain = run_dir()
    assert plain.parent.parent == Path("outputs/runs")
    assert re.fullmatch(r"\d\d-\d\d-\d\d", plain.name), plain.name

    # seed and paths are left out of the name; a path value must not nest directories.
    named = run_dir("encoder.path=/models/tiny", "backbone=din", "seed=3", "paths.cache_dir=/c")
    assert named.parent.parent == Path("outputs/runs")
    assert re.fullmatch(r"\d\d-\d\d-\d\d_backbone=din,encoder.path=_models_tiny", named.name)

    # Sorted, the differing override comes last, beyond the shortened part: the hash differs.
    many = ["encoder.path=/a/very/long/folder/name/for/the/encoder/model"]
    many += [f"train.{key}=1" for key in ("max_epochs", "patience", "lr")]
    long_a = run_dir(*many, "train.weight_decay=0.1")
    long_b = run_dir(*many, "train.weight_decay=0.2")
    assert long_a.parent.parent == Path("outputs/runs")
    assert len(long_a.name) == len("00-00-00_") + MAX_SUFFIX_CHARS
    suffix_a, suffix_b = long_a.name[8:], long_b.name[8:]  # after the time, which may tick
    assert suffix_a[:-12] == suffix_b[:-12] and suffix_a != suffix_b


def test_run_dir_suffix_keeps_short_names_and_hashes_long_ones() -> None:
    assert run_dir_suffix("") == ""
    assert run_dir_suffix("a=1,b=x/y") == "_a=1,b=x_y"
    long = ",".join(f"key{i}=value{i}" for i in range(40))
    suffix = run_dir_suffix(long)
    assert len(suffix) == 1 + MAX_SUFFIX_CHARS and "/" not in suffix
    assert suffix != run_dir_suffix(long + "0") and suffix == run_dir_suffix(long)


# ---------------------------------------------------------------- bad input fails at start
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lrr=1", ["train.lrr", "Key 'lrr' not in 'TrainConfig'"]),
        ("train.lr=abc", ["train.lr", "'abc'", "Float"]),
        ("stage=foo", ["'foo'", "data, generate, encode, train"]),
        ("backbone=dcnv3", ["backbone", "dcnv3", "dcnv2"]),
    ],
)
def test_hydra_rejects_typos_and_wrong_types(
    compose_cfg: Compose, override: str, expected: list[str]
) -> None:
    with pytest.raises(HydraException) as err:
        compose_cfg(override)
    message = _full_message(err.value)
    for part in expected:
        assert part in message, f"{part!r} not in: {message}"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["+backbone.cross_layerz=2"], ["cross_layerz", "valid keys", "cross_layers"]),
        (["backbone.cross_layers=abc"], ["cross_layers", "'abc'", "Integer"]),
        (["+adaptor.n_expertz=3"], ["n_expertz", "valid keys", "n_dedicated"]),
        (["adaptor.dropout=high"], ["dropout", "'high'"]),
        (["encoder.user_text=foo"], ["encoder.user_text='foo'", "history+answer, answer"]),
        (["+encoder.max_len=64"], ["max_len", "max_length"]),
        (["knowledge=foo"], ["knowledge='foo'", "both, user, item"]),
        (["llm=gpt35", "llm.temperature=warm"], ["temperature", "'warm'"]),
        (["+llm.api_key=sk-x", "llm=gpt35"], ["api_key", "api_key_env"]),
        (["dataset.test_ratio=1.5"], ["dataset.test_ratio=1.5", "between 0 and 1"]),
        (["train.batch_size=0"], ["train.batch_size=0", "at least 1"]),
        (["train.lr=-1"], ["train.lr=-1", "positive"]),
        (["task.monitor=logloss"], ["task.monitor='logloss'", "auc"]),
        (["task.slices.cold_item_max_train=-1"], ["cold_item_max_train=-1", ">= 0"]),
    ],
)
def test_validate_rejects_bad_group_values(
    compose_cfg: Compose, overrides: list[str], expected: list[str]
) -> None:
    cfg = compose_cfg(*overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    for part in expected:
        assert part in str(err.value), f"{part!r} not in: {err.value}"


FIELD_BACKBONES = [n for n in BACKBONES.names() if BACKBONES.get(n).injection == "field"]


@pytest.mark.parametrize("backbone", FIELD_BACKBONES)
def test_adaptor_out_dim_must_fit_a_field_injection_backbone(
    compose_cfg: Compose, backbone: str
) -> None:
    """Caught by validate, i.e. before the data, generate and encode stages spend any time."""
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(f"backbone={backbone}", "adaptor.out_dim=16"))
    message = str(err.value)
    assert "adaptor.out_dim=16" in message and "backbone.embed_dim=32" in message
    assert f"backbone={backbone}" in message
    assert "adaptor.out_dim=32" in message  # the fix
    dense = [n for n in BACKBONES.names() if BACKBONES.get(n).injection == "dense"]
    assert dense and all(name in message for name in dense)


def test_adaptor_out_dim_is_free_for_dense_backbones_and_without_adaptor(
    compose_cfg: Compose,
) -> None:
    dense = next(n for n in BACKBONES.names() if BACKBONES.get(n).injection == "dense")
    cfg = validate(compose_cfg(f"backbone={dense}", "adaptor.out_dim=16"))
    generator = torch.Generator().manual_seed(0)
    model = build_from_config(cfg, generator)
    assert model(random_batch(generator)).shape == (BATCH,)
    assert model.adaptor is not None and model.adaptor.out_dim == 16

    validate(compose_cfg("backbone=autoint", "adaptor=none"))
    # Following the message's advice fixes it.
    validate(compose_cfg("backbone=autoint", "adaptor.out_dim=32"))
    validate(compose_cfg("backbone=autoint", "backbone.embed_dim=16", "adaptor.out_dim=16"))


def test_autoint_is_a_field_injection_backbone() -> None:
    assert "autoint" in FIELD_BACKBONES  # the out_dim check above is not vacuous


def test_unknown_implementation_name_lists_the_registered_ones(compose_cfg: Compose) -> None:
    registered = re.escape(", ".join(BACKBONES.names()))
    with pytest.raises(ConfigError, match=rf"unknown backbone 'dcnv9'; registered: {registered}\."):
        validate(compose_cfg("backbone.name=dcnv9"))


# ------------------------------------------------------------------------- the real CLI
def test_cli_prints_the_composed_config(compose_cfg: Compose) -> None:
    overrides = ["backbone=dcnv2", "llm=gpt35", "train.lr=0.002"]
    printed = subprocess.run(
        [sys.executable, "-m", "kar", *overrides, "--cfg", "job"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    config = yaml.safe_load(printed)

    assert config == yaml.safe_load(OmegaConf.to_yaml(compose_cfg(*overrides)))
    assert set(GROUPS) <= set(config) and "hydra" not in config
    assert (config["backbone"]["name"], config["llm"]["name"]) == ("dcnv2", "openai")
    assert config["train"]["lr"] == 0.002 and config["stage"] == "train"


def _full_message(err: BaseException) -> str:
    """Hydra wraps OmegaConf errors: the text of the whole cause chain."""
    parts = []
    current: BaseException | None = err
    while current is not None:
        parts.append(str(current))
        current = current.__cause__ or current.__context__
    return "\n".join(parts)
