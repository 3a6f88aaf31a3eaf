"""The MoE runtime: routing, the experts forward (`moe_forward`), backends, `MoELayer`, transformers hook-up."""

from moekit.runtime.experts import moe_forward
from moekit.runtime.layer import Experts, MoELayer, MoEOutput, SharedExpert
from moekit.runtime.routing import ROUTERS, Router, Routing, route

__all__ = [
    "moe_forward",
    "Experts",
    "MoELayer",
    "MoEOutput",
    "SharedExpert",
    "ROUTERS",
    "Router",
    "Routing",
    "route",
]
