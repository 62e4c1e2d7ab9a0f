"""What intake ships: the example routing rules and the Japanese and English templates."""

from pathlib import Path

SHIPPED = Path(__file__).resolve().parent
#: Used for any template the configured folder does not have.
TEMPLATES = SHIPPED / "templates"
#: Used when no rules folder exists and none is configured (a first start).
ROUTING_RULES = SHIPPED / "routing_rules"
