"""What a pass did to a graph, as counts of its ops: which ops it removed and which it added (after vLLM's
``check_before_ops`` / ``check_after_ops``, with exact counts where the test knows them)."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from torch import fx


def op_counts(gm: fx.GraphModule) -> Counter:
    """How many ``call_function`` nodes of each target the graph has. Passes rewrite their graph in place, so take
    this before the pass and compare the graph after it with it."""
    return Counter(node.target for node in gm.graph.nodes if node.op == "call_function")


def _as_mapping(ops: Mapping | Iterable | None) -> dict:
    return dict(ops) if isinstance(ops, Mapping) else dict.fromkeys(ops or (), None)


def assert_ops_changed(before: fx.GraphModule | Counter, after: fx.GraphModule | Counter,
                       removed: Mapping | Iterable | None = None, added: Mapping | Iterable | None = None,
                       dead_code_ok: bool = False) -> None:
    """Assert the net change of op counts from ``before`` to ``after`` (graph modules or ``op_counts``).

    ``removed`` / ``added`` map each op to how many nodes of it fewer / more there are (``None``, or the op given
    in a set: at least one). Every other op keeps its count; with ``dead_code_ok`` it may also lose nodes (the
    clean-up dropping what the pass made dead, e.g. a causal mask), never gain any.
    """
    before, after = (x if isinstance(x, Counter) else op_counts(x) for x in (before, after))
    change = {op: after[op] - before[op] for op in before.keys() | after.keys() if after[op] != before[op]}
    removed, added = _as_mapping(removed), _as_mapping(added)
    assert not removed.keys() & added.keys(), "counts are net: an op is either removed or added"
    expected = {**{op: None if n is None else -n for op, n in removed.items()}, **added}
    wrong = []
    for op in expected.keys() | change.keys():
        got, want = change.get(op, 0), expected.get(op, 0)
        if op not in expected:
            ok = got == 0 or (dead_code_ok and got < 0)
        elif want is None:
            ok = got > 0 if op in added else got < 0
        else:
            ok = got == want
        if not ok:
            expected_text = f"{want:+d}" if want is not None else "some fewer" if op in removed else "some more"
            wrong.append(f"{op}: {got:+d} (expected {expected_text})")
    assert not wrong, "ops changed other than expected:\n  " + "\n  ".join(sorted(wrong))
