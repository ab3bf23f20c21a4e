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


#: method name -> declaration (the order is the order of the tables)
REGISTRY: dict[str, Spec] = {
    "coop": Spec("coop:CoOp"),
    "promptfl": Spec("promptfl:PromptFL"),
    "fedotp": Spec("fedotp:FedOTPLite"),
    "fedpgp": Spec("fedpgp:FedPGP"),
    "dplora": Spec("dpfpl:DPLoRA"),
    "dpfpl": Spec("dpfpl:DPFPL"),
    "secfpp": Spec("secfpp:SecFPP", clusters=True),
    "secfpp-plain": Spec("secfpp:SecFPPPlain", ablation=True, clusters=True),
    "secfpp-global": Spec("secfpp:SecFPPGlobal", ablation=True),
    "fedsp": Spec("fedsp:FedSP", auxiliary=True),
    "fedsp-nokd": Spec("fedsp:FedSPNoKD", ablation=True, auxiliary=True),
    "fedsp-noalign": Spec("fedsp:FedSPNoAlign", ablation=True, auxiliary=True),
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


def get_method(name: str) -> type[Method]:
    """The class of method ``name``."""
    module, cls = spec(name).target.split(":")
    return getattr(import_module(f"pfpl.algorithms.{module}"), cls)
