"""One validated configuration model, loaded from TOML and overridable with ``--set key=value``.

Any invalid value becomes a single :class:`ConfigError` line that names the key, the value and
what is allowed.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from pfpl.algorithms import DEFAULT_METHODS, METHOD_NAMES, prompted_towers, spec
from pfpl.errors import ConfigError
from pfpl.privacy.modes import DP_MODES, MODES, is_private

__all__ = ["METHOD_NAMES", "Config", "ConfigError", "build_config", "load_config"]

#: the product of SecPC's three primes (pfpl.secure.field.PRIMES, a test keeps them equal): the
#: range its exact integer distances are recovered in, by the Chinese remainder theorem
SECPC_RANGE = 16777213 * 16777199 * 16777183


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BackboneConfig(Section):
    name: str = Field("embedded", description="'embedded' or an open_clip model name, e.g. ViT-B-16")
    pretrained: str | None = Field(None, description="open_clip pretrained tag or a local checkpoint path")
    device: Literal["auto", "cpu", "cuda"] = "auto"


# the dataset registry's names (pfpl.data.DATASETS; a test keeps the two equal)
DATASET_NAMES = (
    "shapes",
    "caltech101",
    "oxford_pets",
    "oxford_flowers",
    "food101",
    "dtd",
    "eurosat",
    "stanford_cars",
    "fgvc_aircraft",
    "sun397",
    "ucf101",
    "imagenet",
    "cifar10",
    "cifar100",
    "domainnet",
    "office_home",
    "pacs",
)


class DataConfig(Section):
    dataset: Literal[DATASET_NAMES] = Field("shapes", description="'shapes' (embedded world) or an on-disk dataset")
    root: Path | None = Field(None, description="folder holding the on-disk dataset's own folder (see README)")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="on-disk datasets without a val split: share held out")
    test_fraction: float = Field(0.2, ge=0, lt=1, description="per-domain datasets without split files: test share")
    workers: int = Field(2, ge=0, description="DataLoader workers decoding images for the one-time feature extraction")
    max_unreadable: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of a split's images that may be unreadable (skipped, counted); past it: error",
    )
    seed: int = Field(0, ge=0)
    train_per_class_domain: int = Field(20, ge=1)
    val_per_class_domain: int = Field(4, ge=1)
    test_per_class_domain: int = Field(10, ge=1)
    class_names: Literal["curated", "caption"] = Field(
        "curated",
        description="shapes: 'curated' names two colours with words pretraining never saw "
        "(room for prompt learning); 'caption' uses the captions' own words",
    )


class PromptConfig(Section):
    init: str = Field(
        "random",
        description="'random': N(0, init_std²) context vectors; or a phrase, e.g. 'a photo of a': the context "
        "starts as the phrase's token embeddings (CoOp's ctx_init) and n_ctx defaults to its word count",
    )
    n_ctx: int = Field(16, ge=1, le=64)
    init_std: float = Field(0.02, gt=0)
    template: str = Field("a photo of a {}.", description="hand-crafted zero-shot template; {} is the class name")
    modality: Literal["text", "vision", "both"] = Field(
        "text",
        description="which towers DP-FPL / DP-LoRA prompt (global + low-rank local on each): the text tower, the "
        "image tower (a ViT; the text classifier is then the frozen template) or both",
    )
    vision_tokens: int = Field(8, ge=1, le=64, description="vision prompt tokens per prompted image layer")
    vision_depth: int = Field(
        1, ge=1, description="image layers with their own vision prompt tokens: 1 = shallow (VPT), more = deep"
    )
    vision_start: int = Field(
        0,
        ge=0,
        description="the first prompted image layer; the layers below it run once per image and are cached",
    )

    @model_validator(mode="before")
    @classmethod
    def _n_ctx_from_phrase(cls, data: Any) -> Any:
        if isinstance(data, dict) and "n_ctx" not in data and isinstance(data.get("init"), str):
            words = data["init"].split()
            if words and data["init"].strip() != "random":
                data = {**data, "n_ctx": len(words)}
        return data

    @field_validator("init")
    @classmethod
    def _phrase(cls, value: str) -> str:
        value = " ".join(value.split())
        if not value:
            raise ValueError("must be 'random' or a phrase such as 'a photo of a'")
        if "{" in value or "}" in value:
            raise ValueError("is the phrase in front of the class name, without the {} slot, e.g. 'a photo of a'")
        return value

    @property
    def phrase(self) -> str | None:
        """The initialisation phrase, or None for random initialisation."""
        return None if self.init == "random" else self.init

    @field_validator("template")
    @classmethod
    def _one_slot(cls, value: str) -> str:
        if value.count("{}") != 1 or value.replace("{}", "").count("{") or value.replace("{}", "").count("}"):
            raise ValueError(
                "must contain the class-name slot {} exactly once and no other braces, e.g. 'a photo of a {}.'"
            )
        return value


MethodName = Literal[METHOD_NAMES]  # type: ignore[valid-type]


class FederationConfig(Section):
    n_clients: int = Field(10, ge=1)
    partition: Literal["iid", "pathological", "dirichlet", "domain", "domain_class"] = "pathological"
    alpha: float = Field(0.3, gt=0, description="Dirichlet concentration (partition = dirichlet)")
    classes_per_client: int | None = Field(None, ge=1, description="partition = domain_class")
    rounds: int = Field(20, ge=1)
    local_steps: int = Field(0, ge=0, description="steps per round; 0 = one local epoch")
    batch_size: int = Field(32, ge=1)
    sync: Literal["step", "fedavg"] = Field("step", description="step: DP-FPL's per-step gradient averaging")
    participation: float = Field(1.0, gt=0, le=1, description="fraction of clients sampled per round")
    secure_aggregation: bool = Field(
        False, description="the server learns only sums of the shared updates (SecAgg+, settings in [secure])"
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="probability a participant drops out of a round's exchange")
    client_sampling: Literal["fixed", "poisson"] = Field(
        "fixed",
        description="fixed: round(participation·N) clients per round; poisson: each client independently "
        "with probability participation (what client-level DP's accountant assumes)",
    )


class TrainConfig(Section):
    methods: list[MethodName] = Field(default_factory=lambda: list(DEFAULT_METHODS), min_length=1)
    lr: float = Field(0.02, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    cosine: bool = True
    rank: int = Field(8, ge=1, description="rank of DP-FPL / DP-LoRA / FedPGP local factors")
    fedpgp_mu: float = Field(1.0, ge=0)
    fedpgp_temperature: float = Field(0.5, gt=0)
    promptfolio_theta: float = Field(
        0.4, ge=0, le=1, description="PromptFolio's portfolio coefficient: 0 = the global prompt, 1 = the local one"
    )
    pfedmoap_experts: int = Field(
        10, ge=1, description="pFedMoAP: prompts each client's gate mixes, its own included (the paper's 10)"
    )
    pfedmoap_selection: Literal["nearest", "random"] = Field(
        "nearest", description="pFedMoAP: the other clients' prompts a client downloads: nearest by L2, or random"
    )
    pfedmoap_lambda: float = Field(0.5, ge=0, description="pFedMoAP: weight of the local prompt's own logits")
    pfedmoap_gating_dim: int = Field(128, ge=1, description="pFedMoAP: the gate's reduced feature width")
    pfedmoap_heads: int = Field(8, ge=1, description="pFedMoAP: attention heads of the gate")
    pfedmoap_scaling: float = Field(10.0, gt=0, description="pFedMoAP: the gate's dot-product scaling")
    fedotp_mass: float = Field(0.8, gt=0, le=1, description="FedOTP: the mass its partial transport moves (ρ)")
    fedotp_eps: float = Field(0.01, gt=0, description="FedOTP: the entropic regularisation of the transport")
    fedotp_iterations: int = Field(100, ge=1, description="FedOTP: at most this many Sinkhorn iterations")
    fedotp_tolerance: float = Field(1e-3, gt=0, description="FedOTP: stop when the scaling changes less (relative)")
    max_sequences: int = Field(
        4096,
        ge=1,
        description="memory budget: text-tower sequences alive at once; a training call takes this // classes "
        "clients (// classes × batch size under per-sample DP, which backpropagates every record)",
    )
    share_prefix: bool = Field(
        True, description="run a shared context's [SOS] ctx positions once per prompt set, not once per class"
    )
    max_images: int = Field(
        4096,
        ge=1,
        description="memory budget of vision prompts: images through the prompted image layers at once; a "
        "training call takes at most this // batch size clients",
    )


class DPConfig(Section):
    mode: Literal[DP_MODES] = Field(  # type: ignore[valid-type]
        "off", description="; ".join(f"{m.name}: {m.summary}" for m in MODES.values())
    )
    randomness: Literal["secret", "seeded"] = Field(
        "secret",
        description="secret: DP noise and batch draws from each party's own OS-entropy secret (the only setting "
        "with a formal guarantee); seeded: from the config seed, reproducible, an experiment with no formal guarantee",
    )
    target_epsilon: float | None = Field(
        None, gt=0, description="calibrate σ to this ε of the released prompt (inf = no noise)"
    )
    noise_multiplier: float = Field(0.0, ge=0, description="σ when no target_epsilon is given")
    delta: float = Field(1e-5, gt=0, lt=1)
    clip: float = Field(10.0, gt=0, description="per-sample clip norm C")
    clip_quantile: float | None = Field(
        None,
        gt=0,
        le=1,
        description="set C to this quantile of the per-record gradient norms measured on the public val split at "
        "the initial prompt (replaces dp.clip; costs no privacy of the training records)",
    )
    lr: float | None = Field(
        None,
        gt=0,
        description="learning rate of private runs; unset: pfpl's default for dp.mode and the target ε "
        "(chosen on the val split, pfpl.privacy.defaults), or train.lr when σ is given directly",
    )
    momentum: float | None = Field(
        None, ge=0, lt=1, description="momentum of private runs; unset: as dp.lr (train.momentum when σ is given)"
    )
    sampling: Literal["poisson", "shuffle"] = Field(
        "poisson", description="poisson: amplification by subsampling is claimed"
    )
    accountant: Literal["rdp", "prv"] = "rdp"
    global_dp: bool = Field(True, description="per-sample mode: GDP noise on the aggregated global gradient")
    client_clip: float = Field(
        0.0, ge=0, description="client-level DP: clip each client's global update to S (0 = off)"
    )
    client_noise_multiplier: float = Field(0.0, ge=0)


class SecFPPConfig(Section):
    recluster_every: int = Field(5, ge=1, description="rounds between two secure clusterings (after round 1)")
    class_rank: int = Field(
        1, ge=0, description="rank of the class-level prompts (0 = full rank: they overfit to the client's classes)"
    )
    cluster_on: Literal["images", "prompts"] = Field(
        "images", description="what SecPC clusters: each client's mean image feature, or its personalized prompt"
    )
    public_label_set: bool = Field(
        False,
        description="private runs: class-level prompts only for the classes a client holds, which its released "
        "prompt then reveals (the certificate says the label set is treated as public); default: every class",
    )
    projection_dim: int = Field(64, ge=2, le=256, description="dimension of the public random projection")
    frac_bits: int = Field(8, ge=1, le=12, description="fixed-point bits of the projected vectors")
    lcc_slices: int = Field(2, ge=1, le=8, description="K: column slices of the Lagrange code")
    lcc_privacy: int = Field(1, ge=1, le=8, description="T: colluding clients that learn nothing")
    initial_clusters: int = Field(2, ge=1, description="clusters the adaptive k-means starts from")
    restarts: int = Field(4, ge=1, le=32, description="adaptive k-means runs from public random starts")
    split_threshold: float = Field(
        0.4, gt=0, le=4, description="split a cluster whose mean squared distance (unit-norm vectors) exceeds this"
    )
    merge_threshold: float = Field(0.2, ge=0, le=4, description="merge centres closer (squared) than this")
    max_iterations: int = Field(40, ge=1)


class FedSPConfig(Section):
    auxiliary: Literal["shared", "truncate"] = Field(
        "shared", description="shared: the first `layers` blocks repeated to full depth; truncate: only them"
    )
    layers: int = Field(1, ge=1, description="transformer blocks the auxiliary model keeps (L_c)")
    server_data: Literal["val", "shard"] = Field(
        "val", description="the server's own data: the public val split, or a shard cut from the training split"
    )
    server_fraction: float = Field(0.1, gt=0, lt=1, description="server_data = shard: its share of each class")
    server_per_class: int | None = Field(
        None,
        ge=1,
        description="keep at most this many of the server's labelled images per class (seeded; a scarce server "
        "whose data does not outweigh the federation's); unset: all of them",
    )
    distill_steps: int = Field(300, ge=0, description="AdamW steps distilling the auxiliary model")
    distill_lr: float = Field(1e-3, gt=0)
    server_steps: int = Field(5, ge=0, description="steps the server fine-tunes the averaged prompt each round")
    server_lr: float = Field(0.02, gt=0)
    upload: Literal["prompt", "reference"] = Field(
        "prompt", description="prompt: clients send their prompt only; reference: also their body (leaks more)"
    )


class EvaluationConfig(Section):
    novel_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="base-to-novel: this seeded share of the classes is held out of every client's (and FedSP's "
        "server's) training data; runs then report base, novel and hm beside local (0 = off)",
    )
    held_out_domain: str | None = Field(
        None,
        description="leave-one-domain-out: this domain's (style's) records are held out of all training; runs then "
        "report held_out_domain, each client's prompt on that domain's test images of every class",
    )
    report: Literal["final", "mean-last-10"] = Field(
        "final",
        description="final: the accuracies after the last round; mean-last-10: their mean over the last 10 rounds "
        "(DP-FPL's published metric)",
    )


class SecureConfig(Section):
    ring_bits: int = Field(64, ge=16, le=64, description="masked vectors live in Z_2^ring_bits")
    frac_bits: int = Field(24, ge=0, le=48, description="fixed-point scale 2^frac_bits (no distributed DP)")
    threshold: float | None = Field(
        None,
        gt=0.5,
        le=1,
        description="fraction of a neighbourhood needed to unmask; unset: the smallest the rules allow "
        "(a strict majority, and no decodable cut of a sparse graph), chosen with the degree",
    )
    graph: Literal["sparse", "full"] = Field("sparse", description="SecAgg+'s O(log n) neighbours, or everyone")
    degree: int | None = Field(
        None,
        ge=2,
        description="neighbours per client in the sparse graph (even); unset: the smallest that meets "
        "secure.failure_target at secure.dropout_tolerance (pfpl.secure.params.choose)",
    )
    dropout_tolerance: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="the per-instance dropout rate the chosen degree must tolerate; unset: federation.dropout, "
        "at least 0.1",
    )
    failure_target: float = Field(
        0.01, gt=0, lt=1, description="bound on the probability that an instance cannot unmask (chosen degree)"
    )
    noise_bits: int = Field(16, ge=4, le=30, description="distributed DP: integer noise std 2^noise_bits")
    colluders: int | None = Field(
        None,
        ge=0,
        description="clients that may collude with the server: distributed DP's noise is sized so that the honest "
        "survivors (threshold − colluders) carry it alone; unset: threshold − 1, the most secure aggregation tolerates",
    )


class Config(Section):
    seed: int = Field(0, ge=0)
    cache_dir: Path = Path(".pfpl-cache")
    output_dir: Path = Path("runs")
    backbone: BackboneConfig = BackboneConfig()
    data: DataConfig = DataConfig()
    prompt: PromptConfig = PromptConfig()
    federation: FederationConfig = FederationConfig()
    train: TrainConfig = TrainConfig()
    dp: DPConfig = DPConfig()
    secure: SecureConfig = SecureConfig()
    secfpp: SecFPPConfig = SecFPPConfig()
    fedsp: FedSPConfig = FedSPConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    _notes: list[str] = PrivateAttr(default_factory=list)

    @property
    def notes(self) -> list[str]:
        """How defaults were resolved for this config, for the user (e.g. methods a private run leaves out)."""
        return list(self._notes)

    @property
    def private(self) -> bool:
        """Whether any DP mechanism runs (sample-level or client-level noise): :func:`pfpl.privacy.modes.is_private`."""
        return is_private(self.dp)


def default_methods_for_privacy(cfg: Config) -> tuple[list[str], list[str]]:
    """(methods, left out) for a private run of ``cfg``: where ``train.methods`` is left at its default,
    SecFPP clustering on raw image features is left out — no ε would hold for it (it is refused when
    listed, :mod:`pfpl.privacy.rules`). Methods the config lists are kept as they are."""
    methods = list(cfg.train.methods)
    if "methods" in cfg.train.model_fields_set or cfg.secfpp.cluster_on != "images":
        return methods, []
    left = [m for m in methods if spec(m).clusters]
    return [m for m in methods if m not in left], left


def _parse_value(raw: str) -> Any:
    """A TOML literal when the text is one (numbers, booleans, arrays, quoted strings), else the text."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config error: {key}: {'.'.join(parts[:-1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def _one_line(model: type[BaseModel], err: ValidationError) -> ConfigError:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc)
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(_allowed_keys(model, loc))
        return ConfigError(f"config error: {key} is not a known key (allowed here: {allowed})")
    message = first["msg"].removeprefix("Value error, ")
    return ConfigError(f"config error: {key} = {first.get('input')!r}: {message}")


def build_config(data: dict[str, Any], overrides: list[str] | None = None, model: type[Config] = Config) -> Config:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"config error: override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), _parse_value(raw.strip()))
    try:
        cfg = model.model_validate(data)
    except ValidationError as err:
        raise _one_line(model, err) from None
    _check_together(cfg)
    if cfg.private:
        methods, left = default_methods_for_privacy(cfg)
        if left:
            cfg.train.methods = methods
            cfg._notes.append(
                f"left out of this private run's default methods: {', '.join(left)} (it clusters clients on raw "
                "image features, which no DP covers; list it with secfpp.cluster_on='prompts' to include it)"
            )
    return cfg


def _check_together(cfg: Config) -> None:
    """Values that are valid alone but not together."""
    phrase = cfg.prompt.phrase
    if phrase and cfg.prompt.n_ctx != len(phrase.split()):
        raise ConfigError(
            f"config error: prompt.init = {phrase!r} starts the context from its {len(phrase.split())} words, but "
            f"prompt.n_ctx = {cfg.prompt.n_ctx}; set prompt.n_ctx = {len(phrase.split())} or leave it unset"
        )
    auxiliary = [m for m in cfg.train.methods if spec(m).auxiliary]
    if auxiliary and cfg.federation.sync != "fedavg":
        raise ConfigError(
            f"config error: {auxiliary[0]} trains two stages per round and sends its prompt once: it needs "
            f"federation.sync = 'fedavg' (not {cfg.federation.sync!r})"
        )
    if auxiliary and cfg.fedsp.upload == "reference" and cfg.federation.secure_aggregation:
        raise ConfigError(
            "config error: fedsp.upload = 'reference' sends every client's auxiliary body to the server in the "
            "clear; it cannot run with federation.secure_aggregation (use fedsp.upload = 'prompt')"
        )
    clustering = [m for m in cfg.train.methods if spec(m).clusters]
    needed = 2 * (cfg.secfpp.lcc_slices + cfg.secfpp.lcc_privacy - 1) + 1
    if clustering and cfg.federation.n_clients < needed:
        raise ConfigError(
            f"config error: {clustering[0]}'s secure clustering needs at least 2·(K + T − 1) + 1 = {needed} clients "
            f"(secfpp.lcc_slices K = {cfg.secfpp.lcc_slices}, secfpp.lcc_privacy T = {cfg.secfpp.lcc_privacy}); "
            f"federation.n_clients is {cfg.federation.n_clients}"
        )
    if clustering:
        n, f, d = cfg.federation.n_clients, cfg.secfpp.frac_bits, cfg.secfpp.projection_dim
        largest = 4 * n**4 * (2**f + d**0.5) ** 2  # n_a²·n_b²·‖c_a − c_b‖² of unit vectors at 2^frac_bits
        if largest >= SECPC_RANGE // 2:
            raise ConfigError(
                f"config error: {clustering[0]}'s secure distances for {n} clients at secfpp.frac_bits = {f} can "
                f"reach {largest:.3g}, beyond the ±{SECPC_RANGE // 2:.3g} its three primes hold (they would wrap "
                "silently); lower secfpp.frac_bits or federation.n_clients"
            )
    _check_vision(cfg)
    text = [m for m in cfg.train.methods if prompted_towers(m, cfg.prompt.modality) != "vision"]
    if text and cfg.train.rank > cfg.prompt.n_ctx:
        raise ConfigError(
            f"config error: train.rank = {cfg.train.rank} must be at most prompt.n_ctx = {cfg.prompt.n_ctx} "
            "(a rank-k factor of an n_ctx × dim prompt)"
        )
    _check_classifiers(cfg)


def _check_classifiers(cfg: Config) -> None:
    """Methods whose classifier is not one context, and pFedMoAP's downloads of other clients' prompts."""
    several = [m for m in cfg.train.methods if not spec(m).one_context]
    if several and cfg.dp.clip_quantile is not None:
        raise ConfigError(
            f"config error: dp.clip_quantile measures gradient norms of one context's class features; {several[0]}'s "
            "classifier is more than one context: set dp.clip instead"
        )
    downloads = [m for m in cfg.train.methods if spec(m).downloads]
    if downloads and cfg.federation.secure_aggregation:
        raise ConfigError(
            f"config error: {downloads[0]}'s clients download other clients' prompts one by one (its experts), so "
            "the server must hold each prompt, which secure aggregation (it reveals only sums) exists to hide; run "
            f"{downloads[0]} without federation.secure_aggregation"
        )


def _check_vision(cfg: Config) -> None:
    """Vision prompts: where ``prompt.modality`` applies, and what their privacy cannot be."""
    pr = cfg.prompt
    if pr.modality != "text":
        text_only = [m for m in cfg.train.methods if spec(m).towers == "text"]
        if text_only:
            raise ConfigError(
                f"config error: prompt.modality = {pr.modality!r} applies to dpfpl and dplora, but train.methods "
                f"also has {', '.join(text_only)}, which prompt only the text tower; leave them out (vpt, ivlp and "
                "maple are the vision and both-tower methods)"
            )
    vision = [m for m in cfg.train.methods if prompted_towers(m, pr.modality) != "text"]
    if not vision:
        return
    if cfg.dp.mode == "feature":
        raise ConfigError(
            f"config error: dp.mode = 'feature' cannot cover {vision[0]}'s vision prompts (their gradient depends "
            "on each image through the image tower, not only on the class text features); use dp.mode = 'per-sample'"
        )
    if cfg.dp.clip_quantile is not None:
        raise ConfigError(
            f"config error: dp.clip_quantile measures gradient norms w.r.t. the text context; {vision[0]} has vision "
            "prompts: set dp.clip instead"
        )
    lowrank = [m for m in vision if spec(m).towers == "modality"]
    if lowrank and cfg.train.rank > pr.vision_depth * pr.vision_tokens:
        raise ConfigError(
            f"config error: train.rank = {cfg.train.rank} must be at most prompt.vision_depth × prompt.vision_tokens "
            f"= {pr.vision_depth * pr.vision_tokens} for {lowrank[0]}'s vision prompts (a rank-k factor of them)"
        )
    if "maple" in vision and pr.vision_tokens > pr.n_ctx:
        raise ConfigError(
            f"config error: maple projects its {pr.vision_tokens} vision tokens (prompt.vision_tokens) from the "
            f"first text context tokens; prompt.n_ctx = {pr.n_ctx} is fewer"
        )


def load_config(path: Path | str | None = None, overrides: list[str] | None = None) -> Config:
    """The config from a TOML file (or the defaults) with ``key=value`` overrides applied."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config error: config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config error: {path} is not valid TOML: {exc}") from None
    return build_config(data, overrides)
