"""The project's files as a reader and a vendoring user rely on them: each file imports only files above it in
README's table (no circles, type-only imports counted), the LLM needs only its weights' reader and config.py nothing
of the project, the fast decoder's Triton code stays out of generate.py, and importing the user's entry points leaves
the compiler and FSDP out until they are used."""
import ast
import subprocess
import sys

from conftest import ROOT


def project_imports() -> dict[str, set[str]]:
    """file stem -> the project's files it imports, anywhere in it (functions and TYPE_CHECKING blocks too)."""
    files = {p.stem: p for p in ROOT.glob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module.split(".")[0])
        graph[name] = deps & set(files) - {name}
    return graph


def test_no_import_circles_and_files_import_only_files_below_them():
    graph = project_imports()
    state: dict[str, str] = {}

    def visit(u, path):
        state[u] = "open"
        for v in sorted(graph[u]):
            assert state.get(v) != "open", f"import circle: {' -> '.join(path + [u, v])}"
            if v not in state:
                visit(v, path + [u])
        state[u] = "done"
    for u in sorted(graph):
        if u not in state:
            visit(u, [])
    assert graph["weights"] == set() and graph["model"] == {"weights"}, graph["model"]  # the LLM alone, vendorable
    assert graph["config"] == set(), graph["config"]
    order = ["weights", "model", "tokenizer", "encoders", "multimodal", "quant_kernels", "quant", "lora", "media",
             "data", "preference", "align", "decode_kernels", "decode", "step_graph", "config", "track", "distributed",
             "dpo", "metrics", "evaluation", "checkpoint", "build", "train", "demo", "generate", "serve", "validate",
             "bench_inference", "bench"]  # README's table
    assert sorted(order) == sorted(graph)
    for i, name in enumerate(order):
        assert graph[name] <= set(order[:i]), f"{name}.py imports {sorted(graph[name] - set(order[:i]))}, below it"
    assert "demo" not in graph["train"] and "train" in graph["demo"]  # the demo sits above training


HEAVY = ("torch._dynamo", "torch._inductor", "torch.distributed.fsdp", "triton", "sympy")
# What the code below prints: the heavy modules that the project's imports (and `then`) load beyond bare torch.
# Measured against `import torch` of the same version, so a torch that loads one of them itself changes nothing.
LIGHT = ("import sys; sys.path.insert(0, sys.argv[1]); import torch; before = set(sys.modules); {imports}; {then}; "
         "print(sorted({{m for m in set(sys.modules) - before if m.split('.')[0] in {{'triton', 'sympy'}} or "
         "any(m == h or m.startswith(h + '.') for h in {heavy})}}))")


def loaded_beyond_torch(imports: str, then: str = "pass", *args: str) -> list[str]:
    code = LIGHT.format(imports=imports, then=then, heavy=HEAVY)
    r = subprocess.run([sys.executable, "-c", code, str(ROOT), *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return eval(r.stdout.strip().splitlines()[-1])


def test_generate_py_holds_no_triton_and_entry_points_and_loading_a_run_import_light(trained_run):
    """generate.load_run builds the model on the meta device without random init (which would import the
    compiler there) and reads its weights: the entry points' imports and one question's start pay for no dynamo,
    sympy or FSDP."""
    assert "triton" not in (ROOT / "generate.py").read_text()
    # decode.py imports its Triton kernels (decode_kernels.py) inside `load_kernels` only, for a compiled decoder
    top = {a.name for node in ast.parse((ROOT / "decode.py").read_text()).body if isinstance(node, ast.Import)
           for a in node.names}
    assert not top & {"decode_kernels", "triton"}, top
    assert loaded_beyond_torch("import generate, train, decode", "generate.load_run(sys.argv[2])",
                               str(trained_run)) == []


def test_the_lightness_check_sees_what_it_looks_for():
    """The check above names the compiler when something loads it, so it can fail."""
    assert "torch._dynamo" in loaded_beyond_torch("import model", "import torch._dynamo")


def test_the_forward_that_runs_is_the_one_in_the_class():
    """No module's `forward` is reassigned on a live object, and no kernel is chosen by autograd's grad mode: a fast
    path is a module that replaces another (lora.stack_lora, build.CheckpointedLayer, decode.DecodeLayer). The
    benchmarks' phase timer, which wraps methods for one profiling pass, is outside the rule."""
    for path in sorted(ROOT.glob("*.py")):
        if path.name.startswith("bench"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                assert ast.unparse(node.func) != "torch.is_grad_enabled", f"{path.name}:{node.lineno}"
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    patched = isinstance(t, ast.Attribute) and t.attr in ("forward", "__call__") \
                        and ast.unparse(t.value) != "self"
                    assert not patched, f"{path.name}:{node.lineno}: {ast.unparse(t)} reassigned"
