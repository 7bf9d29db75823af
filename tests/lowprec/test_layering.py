"""The numerics core's layering: each module imports only the modules below it (no cycles), no other module's
private names, and the public names other code relies on stay importable from their documented homes."""

import ast
import importlib
import pathlib

import pytest

import lowprec

ROOT = pathlib.Path(lowprec.__file__).parent
# bottom up; a module may import only modules listed before it
LAYERS = ["formats", "spec", "rounding", "fast", "scaling", "quantize", "codecs", "delayed"]


def lowprec_imports(name: str) -> list[tuple[str, list[str]]]:
    """(module, imported names) for every lowprec import in lowprec/<name>.py."""
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1 and not mod:  # from . import scaling
                out += [(a.name, []) for a in node.names]
            elif node.level == 1 or mod.startswith("lowprec"):
                out.append((mod.removeprefix("lowprec.").removeprefix("lowprec"), [a.name for a in node.names]))
    return out


@pytest.mark.parametrize("name", LAYERS)
def test_imports_only_lower_layers_and_no_private_names(name):
    below = set(LAYERS[: LAYERS.index(name)])
    for mod, names in lowprec_imports(name):
        assert mod in below, f"lowprec.{name} imports lowprec.{mod}, which is not below it"
        assert not [n for n in names if n.startswith("_")], f"lowprec.{name} imports private {names} from {mod}"


def test_public_names_keep_their_homes():
    # importlib: `lowprec.quantize` is the function (the package re-exports it over the module's name)
    codecs, delayed, quantize, scaling, spec = (importlib.import_module(f"lowprec.{m}")
                                                for m in ("codecs", "delayed", "quantize", "scaling", "spec"))

    for n in ("QuantSpec", "Rounding", "Scaling", "spec", "quantize", "quantize_with_scale", "round_to_format",
              "compiled_quantizer", "SCALED_FORMATS"):
        assert n in quantize.__all__ and getattr(quantize, n) is getattr(lowprec, n)
    assert quantize.QuantSpec is spec.QuantSpec and quantize.round_to_format is lowprec.rounding.round_to_format
    for n in ("Encoded", "encode", "decode", "element_scale", "values_to_codes", "codes_to_values", "pack_nibbles",
              "unpack_nibbles", "NonFiniteError"):
        assert n in codecs.__all__
    assert issubclass(codecs.NonFiniteError, ValueError)
    assert callable(scaling.finite_amax) and delayed.DelayedScaler is lowprec.DelayedScaler
