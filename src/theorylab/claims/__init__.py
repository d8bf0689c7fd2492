"""The claims registry and engine. Each ``q*`` module registers the functions that measure its claims."""

from .base import Evidence, Section, claim, claim_sections, extra, extra_sections
from .catalogue import CATALOGUE, CLAIM_IDS, ClaimInfo
from .engine import UnknownClaimError, run_claims, run_section, select_sections

__all__ = [
    "CATALOGUE",
    "CLAIM_IDS",
    "ClaimInfo",
    "Evidence",
    "Section",
    "UnknownClaimError",
    "claim",
    "claim_sections",
    "extra",
    "extra_sections",
    "run_claims",
    "run_section",
    "select_sections",
]
