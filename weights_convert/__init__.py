"""Translation between t2v's parameter names and other checkpoint vocabularies.

Every conversion is a table of `Rule`s (source keys -> target keys, with a tensor transform and
its inverse) applied with strict accounting: each source key is used by exactly one rule or
matched by an explicit ignore pattern, and each rule finds all of its inputs.
"""

from weights_convert.table import ConversionError, Rule, convert, invert

__all__ = ["ConversionError", "Rule", "convert", "invert"]
