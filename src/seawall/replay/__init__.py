"""The replay lab: replay an incident's overload against a simulated artifact manager.

One module per concern: ``simulator`` (the server that collapses), ``profile`` (the incident
timeline as a TOML file), ``load`` (build steps, webhooks, uploads and the clients that send
them), ``scenarios`` (what stands between the clients and the server), ``metrics`` (goodput
against the ideal), ``report`` (Markdown + PNG) and ``runner`` (compressed real time).
"""

from seawall.replay.profile import Profile, load_profile, shipped_profiles
from seawall.replay.simulator import Catalog, ServerModel, SimConfig, SimulatedRegistry

__all__ = [
    "Catalog",
    "Profile",
    "ServerModel",
    "SimConfig",
    "SimulatedRegistry",
    "load_profile",
    "shipped_profiles",
]
