"""One module per method (DESIGN §1). The method list is written here once; the config validates
against it without importing torch, and :func:`get_method` imports a method's module on demand."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pfpl.algorithms.base import Method

#: method name -> "module:class" (the order is the order of the tables)
REGISTRY: dict[str, str] = {
    "coop": "coop:CoOp",
    "promptfl": "promptfl:PromptFL",
    "fedotp": "fedotp:FedOTPLite",
    "fedpgp": "fedpgp:FedPGP",
    "dplora": "dpfpl:DPLoRA",
    "dpfpl": "dpfpl:DPFPL",
    "secfpp": "secfpp:SecFPP",
    "secfpp-plain": "secfpp:SecFPPPlain",
    "secfpp-global": "secfpp:SecFPPGlobal",
    "fedsp": "fedsp:FedSP",
    "fedsp-nokd": "fedsp:FedSPNoKD",
    "fedsp-noalign": "fedsp:FedSPNoAlign",
}
METHOD_NAMES: tuple[str, ...] = tuple(REGISTRY)
#: ablations are run by name, not by default
ABLATIONS: tuple[str, ...] = ("secfpp-plain", "secfpp-global", "fedsp-nokd", "fedsp-noalign")
#: methods that train on an auxiliary model the server distils (FedSP): they need FedAvg sync
AUXILIARY_METHODS: tuple[str, ...] = ("fedsp", "fedsp-nokd", "fedsp-noalign")
#: methods that cluster clients on a vector of their own (SecFPP's SecPC; ``secfpp.cluster_on``)
CLUSTERING_METHODS: tuple[str, ...] = ("secfpp", "secfpp-plain")
# FedSP needs FedAvg sync and its own benchmark (configs/fedsp.toml): it is run by name, not by default
DEFAULT_METHODS: tuple[str, ...] = tuple(m for m in METHOD_NAMES if m not in ABLATIONS + AUXILIARY_METHODS)


def get_method(name: str) -> type[Method]:
    """The class of method ``name``."""
    if name not in REGISTRY:
        from pfpl.errors import ConfigError

        raise ConfigError(f"config error: method {name!r} is unknown; known: {', '.join(METHOD_NAMES)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(import_module(f"pfpl.algorithms.{module}"), cls)
