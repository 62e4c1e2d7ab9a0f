"""Routing rules: ``routing_rules/*.yaml`` → a compiled, ordered rule table; ``evaluate()``. Pure.

- :mod:`intake.rules.model`: conditions, rules, the rule set, the decision;
- :mod:`intake.rules.loader`: YAML files → a checked rule set (errors as ``file:line: reason``);
- :mod:`intake.rules.compile`: conditions → closures over a message's facts (one matcher);
- :mod:`intake.rules.facts`: the message as conditions see it;
- :mod:`intake.rules.evaluate`: the walk over the table, with a trace of every row;
- :mod:`intake.rules.explain`: ``intake rules explain``.

``evaluate(ruleset, ctx)`` is a pure function of the parsed message, its classification,
its mailbox and the time.
"""

from intake.rules.evaluate import evaluate, facts_of, rule_context
from intake.rules.loader import compile_rules, load_rules, rule_files
from intake.rules.model import (
    ACTIONS,
    CONDITIONS,
    OPERATORS,
    PRIORITIES,
    Condition,
    Decision,
    Rule,
    RuleContext,
    RuleSet,
    RulesError,
    RuleTimeout,
)

__all__ = ["ACTIONS", "CONDITIONS", "OPERATORS", "PRIORITIES", "Condition", "Decision", "Rule", "RuleContext",
           "RuleSet", "RulesError", "RuleTimeout", "compile_rules", "evaluate", "facts_of", "load_rules", "rule_context",
           "rule_files"]
