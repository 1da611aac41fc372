"""Reference evaluation of parsed filter expressions for the tests: over items.csv strings
(the spelling a user sees), independent of every index the project builds; and the anchor
system's numeric spelling of an expression."""

from filtering.expression import All, And, Not, Or, Term


def satisfies(node, item, schema) -> bool:
    """Whether `item` (items.csv row: feature name -> list of spelled values) matches."""
    if isinstance(node, All):
        return True
    if isinstance(node, Term):
        spec = schema.features[node.feature_id]
        return spec.spell(node.value_id) in item[spec.name]
    if isinstance(node, Not):
        return not satisfies(node.child, item, schema)
    if isinstance(node, And):
        return all(satisfies(c, item, schema) for c in node.children)
    assert isinstance(node, Or)
    return any(satisfies(c, item, schema) for c in node.children)


def anchor_syntax(node) -> str:
    """The anchor system's numeric form: feature id : value id, & | ! (fully parenthesised)."""
    if isinstance(node, All):
        return ""
    if isinstance(node, Term):
        return f"{node.feature_id}:{node.value_id}"
    if isinstance(node, Not):
        return f"!({anchor_syntax(node.child)})"
    joiner = " & " if isinstance(node, And) else " | "
    return joiner.join(f"({anchor_syntax(c)})" for c in node.children)
