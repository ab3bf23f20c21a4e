"""One module per method (DESIGN §1). Every method is declared here once, with what the rest of pfpl
must know about it before its module (and torch) is imported: the config validates against these
declarations, the engine wires a method by them, and :func:`get_method` imports the module on demand.
What a method shares and trains is declared by its class (:class:`~pfpl.algorithms.base.Param`
scopes); its server phases by :meth:`~pfpl.algorithms.base.Method.server_phases`."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pfpl.algorithms.base import Method


@dataclass(frozen=True)
class Spec:
    """A method's declaration (torch-free)."""

    target: str  # "module:class" in pfpl.algorithms
    #: an ablation: run by name, not by default
    ablation: bool = False
    #: trains on an auxiliary model the server distils from its full model and ships once (FedSP):
    #: needs FedAvg sync and a server data split; the auxiliary body is part of the client's state
    auxiliary: bool = False
    #: groups clients by a vector of each client's own (SecFPP's SecPC, ``secfpp.cluster_on``): a
    #: server phase that asks the clients, so its input is a release that must be accounted
    clusters: bool = False
    #: which towers it prompts: "text", "vision", "both", or "modality" (chosen by ``prompt.modality``).
    #: Vision prompts make the image features functions of the prompt: the image tower's prompted
    #: layers run every step, and feature-mode DP cannot cover them
    towers: str = "text"
    #: the released prompt is one context (shared or per class) that the prompt tower turns into the
    #: client's classifier; False (PromptFolio's feature mix, pFedMoAP's gate, FedOTP's transport plan):
    #: export / predict, audit and ``dp.clip_quantile`` refuse the method
    one_context: bool = True
    #: clients download other clients' prompts (pFedMoAP's experts): each download is its owner's release,
    #: so secure aggregation (which hides only sums) and client-level DP are refused with it
    downloads: bool = False
    #: scores images by their patch features (FedOTP's transport plan): the run caches the image tower's
    #: patch features beside the pooled ones (``Features.tokens``); not on Flower yet
    patches: bool = False


#: method name -> declaration (the order is the order of the tables)
REGISTRY: dict[str, Spec] = {
    "coop": Spec("coop:CoOp"),
    "promptfl": Spec("promptfl:PromptFL"),
    "fedotp-lite": Spec("fedotp:FedOTPLite"),  # "fedotp" before issue 29 (DP-FPL's FedOTP baseline)
    "fedpgp": Spec("fedpgp:FedPGP"),
    "dplora": Spec("dpfpl:DPLoRA", towers="modality"),
    "dpfpl": Spec("dpfpl:DPFPL", towers="modality"),
    "secfpp": Spec("secfpp:SecFPP", clusters=True),
    "secfpp-plain": Spec("secfpp:SecFPPPlain", ablation=True, clusters=True),
    "secfpp-global": Spec("secfpp:SecFPPGlobal", ablation=True),
    "secfpp-client": Spec("secfpp:SecFPPClientPrompt", ablation=True, clusters=True),
    "fedsp": Spec("fedsp:FedSP", auxiliary=True),
    "fedsp-nokd": Spec("fedsp:FedSPNoKD", ablation=True, auxiliary=True),
    "fedsp-noalign": Spec("fedsp:FedSPNoAlign", ablation=True, auxiliary=True),
    "fedsp-server-only": Spec("fedsp:FedSPServerOnly", ablation=True, auxiliary=True),
    "fedsp-clients-only": Spec("fedsp:FedSPClientsOnly", ablation=True, auxiliary=True),
    # vision and multimodal prompts: ablations, so the default tables do not change
    "vpt": Spec("vpt:VPT", ablation=True, towers="vision"),
    "ivlp": Spec("ivlp:IVLP", ablation=True, towers="both"),
    "maple": Spec("maple:MaPLe", ablation=True, towers="both"),
    # the field's personalised / generative baselines (issue 29): run by name, so the default tables do not change
    "promptfolio": Spec("promptfolio:PromptFolio", ablation=True, one_context=False),
    "pfedmoap": Spec("pfedmoap:PFedMoAP", ablation=True, one_context=False, downloads=True),
    "fedtpg": Spec("fedtpg:FedTPG", ablation=True),
    "fedotp": Spec("fedotp:FedOTP", ablation=True, one_context=False, patches=True),
}
METHOD_NAMES: tuple[str, ...] = tuple(REGISTRY)
# FedSP needs FedAvg sync and its own benchmark (configs/fedsp.toml): it is run by name, not by default
DEFAULT_METHODS: tuple[str, ...] = tuple(m for m, s in REGISTRY.items() if not (s.ablation or s.auxiliary))


def spec(name: str) -> Spec:
    """The declaration of method ``name``."""
    if name not in REGISTRY:
        from pfpl.errors import ConfigError

        raise ConfigError(f"config error: method {name!r} is unknown; known: {', '.join(METHOD_NAMES)}")
    return REGISTRY[name]


def prompted_towers(name: str, modality: str = "text") -> str:
    """What method ``name`` prompts (text, vision or both) with ``prompt.modality = modality``."""
    towers = spec(name).towers
    return modality if towers == "modality" else towers


def prompts_vision(name: str, modality: str = "text") -> bool:
    return prompted_towers(name, modality) != "text"


def get_method(name: str) -> type[Method]:
    """The class of method ``name``."""
    module, cls = spec(name).target.split(":")
    return getattr(import_module(f"pfpl.algorithms.{module}"), cls)
