"""The MoE runtime: routing, the experts forward (`moe_forward`), backends, `MoELayer`, transformers hook-up."""

from moekit.runtime.experts import moe_forward
from moekit.runtime.layer import MoELayer, MoEOutput
from moekit.runtime.routing import Routing, route

__all__ = ["moe_forward", "MoELayer", "MoEOutput", "Routing", "route"]
