"""jfacerec's imports go one way, down the layers, and never in a loop.

Data flows one way: commands -> evaluation -> training | inference -> models -> data | losses ->
core. A module imports only its own layer and those below, never a peer group beside it, and no
chain of imports comes back to where it started. The checker (import_graph.py) reads the source
with `ast`; nothing here is imported, fixtures included.
"""

from pathlib import Path

from import_graph import (Layers, build_graph, describe_cycle, find_cycles, layer_of,
                          layer_violations)

TESTS = Path(__file__).resolve().parent
PACKAGE = TESTS.parent / "jfacerec"
FIXTURES = TESTS / "fixtures"

# Bottom layer first. Groups in one layer are peers and may not import each other. A pattern
# covers a module and everything under it; "=jfacerec" is the root package only.
LAYERS: Layers = [
    ("core", {"core": ["jfacerec.core", "jfacerec.metrics"]}),
    ("data | losses", {"data": ["jfacerec.data"], "losses": ["jfacerec.losses"]}),
    ("models", {"models": ["jfacerec.models"]}),
    ("training | inference", {"training": ["jfacerec.training"],
                              # jfacerec.matcher re-exports jfacerec.inference.matcher
                              "inference": ["jfacerec.inference", "jfacerec.matcher"]}),
    # Weights in and out (arcface_torch, ONNX): writes workdirs as training does, restores and
    # embeds as inference does.
    ("interop", {"interop": ["jfacerec.interop"]}),
    ("evaluation", {"evaluation": ["jfacerec.evaluation"]}),
    # The root __init__ lazily imports inference.
    ("commands", {"commands": ["jfacerec.train", "jfacerec.evaluate", "jfacerec.predict",
                               "jfacerec.gallery", "jfacerec.convert", "jfacerec.export",
                               "=jfacerec"]}),
]


def test_the_package_has_no_import_cycles():
    graph = build_graph(PACKAGE, "jfacerec")
    cycles = [describe_cycle(graph, cycle) for cycle in find_cycles(graph)]
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(cycles)


def test_imports_only_go_down_the_layers():
    violations = layer_violations(build_graph(PACKAGE, "jfacerec"), LAYERS)
    assert not violations, (f"{len(violations)} import(s) against the layers:\n"
                            + "\n".join(violations))


def test_every_module_belongs_to_a_layer():
    unplaced = [m for m in sorted(build_graph(PACKAGE, "jfacerec")) if layer_of(m, LAYERS) is None]
    assert not unplaced, ("modules in no layer (add them to LAYERS deliberately):\n"
                          + "\n".join(unplaced))


def test_the_checker_finds_a_cycle_in_a_fixture_package():
    graph = build_graph(FIXTURES / "cyclic_pkg", "cyclic_pkg")
    assert find_cycles(graph) == [["cyclic_pkg.a", "cyclic_pkg.b", "cyclic_pkg.c", "cyclic_pkg.a"]]
    assert describe_cycle(graph, find_cycles(graph)[0]) == (
        "cyclic_pkg.a -> cyclic_pkg.b -> cyclic_pkg.c -> cyclic_pkg.a\n"
        "    cyclic_pkg/a.py:3: cyclic_pkg.a imports cyclic_pkg.b\n"
        "    cyclic_pkg/b.py:5: cyclic_pkg.b imports cyclic_pkg.c\n"
        "    cyclic_pkg/c.py:3: cyclic_pkg.c imports cyclic_pkg.a")


FIXTURE_LAYERS: Layers = [
    ("bottom", {"low": ["upward_pkg.low"]}),
    ("middle", {"left": ["upward_pkg.left"], "right": ["upward_pkg.right"]}),
    ("top", {"high": ["upward_pkg.high", "=upward_pkg"]}),
]


def test_the_checker_finds_an_upward_import_in_a_fixture_package():
    violations = layer_violations(build_graph(FIXTURES / "upward_pkg", "upward_pkg"),
                                  FIXTURE_LAYERS)
    upward = [v for v in violations if " is above " in v]
    assert upward == ["upward_pkg/low.py:7: upward_pkg.low (low) imports upward_pkg.high (high): "
                      "layer 2 'top' is above layer 0 'bottom'"]


def test_peer_groups_in_one_layer_may_not_import_each_other():
    violations = layer_violations(build_graph(FIXTURES / "upward_pkg", "upward_pkg"),
                                  FIXTURE_LAYERS)
    peers = [v for v in violations if " are peers " in v]
    assert peers == [
        "upward_pkg/left.py:8: upward_pkg.left (left) imports upward_pkg.right (right): "
        "groups 'left' and 'right' are peers in layer 1 'middle'",
        "upward_pkg/right.py:3: upward_pkg.right (right) imports upward_pkg.left (left): "
        "groups 'right' and 'left' are peers in layer 1 'middle'"]
    assert len(violations) == 3  # and nothing else: left -> low and high -> low go down
