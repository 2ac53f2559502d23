"""A look at the student's code from outside the kernel, for what no check inside it can see.

While a hidden test asks (``qcore.asking``), the functions its exercise must not call are
blocked: Python functions by their code objects, torch functions by a torch function mode, C
functions of ``math``/``numpy`` by name. Two things escape any check made inside the process,
because the process is the student's:

- **tampering**: code that reaches the machinery, a module's namespace or the interpreter:
  ``getattr`` with a computed name, ``__import__``/``importlib``, ``eval``/``exec``, ``sys.modules``,
  frames and tracing, ``gc``, ``ctypes``, IPython's hooks and magics (but ``%matplotlib``, ``%time``
  and ``%timeit``, whose code is checked), an attribute of a module assigned,
  dunder attributes such as ``__code__``, torch function modes switched off, threads and other
  processes (where no block holds);
- **early binding of a C function**: a forbidden C function (``math.frexp``, ``numpy.finfo``) used
  other than by a direct call (an attribute ``np.frexp``, or a name it was imported as, kept in a
  default argument or an alias), or fetched with ``getattr(np, "frexp")``.

Honest lab code needs none of these. The grader does not run a cell that holds one
(``qcourse.autograde``): the cell is replaced by an error that names the construct, so the rest
of the notebook earns what it earns without it, and the report says which cell and why.

Example:
    >>> found = check_cells([(3, "import sys\\nf = sys.modules['qcore.formats']")], set())
    >>> [(f.cell, f.what) for f in found]
    [(3, 'sys.modules (line 2)')]
    >>> [f.what for f in check_cells([(4, "y = np.frexp(x)\\ng = lambda v, f=np.frexp: f(v)")], {"frexp"})]
    ['frexp referenced without being called (line 2)']
"""
from __future__ import annotations

import ast
from dataclasses import dataclass

from IPython.core.inputtransformer2 import TransformerManager

# Calls and names that reach past the student's own objects.
DYNAMIC_CALLS = {"__import__", "eval", "exec", "compile", "globals", "locals", "vars", "breakpoint",
                 "get_ipython", "delattr", "setattr"}
# Modules whose use reaches the interpreter, the kernel or another process (where no block holds).
DYNAMIC_MODULES = {"importlib", "imp", "inspect", "gc", "ctypes", "cffi", "builtins", "marshal", "pickle",
                   "dill", "cloudpickle", "copyreg", "shelve", "runpy", "code", "codeop", "subprocess",
                   "multiprocessing", "concurrent", "pty", "IPython", "ipykernel", "traitlets", "jupyter_client",
                   "zmq", "nbformat", "nbgrader", "nbclient", "qcourse", "threading", "_thread", "asyncio",
                   "pdb", "bdb", "trace", "sys_monitoring"}
ALLOWED_FROM: dict[str, set[str]] = {}
SYS_ATTRS = {"modules", "_getframe", "settrace", "setprofile", "meta_path", "path_hooks", "path_importer_cache",
             "addaudithook", "_current_frames", "monitoring", "breakpointhook", "gettrace", "getprofile"}
OS_ATTRS = {"system", "popen", "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe",
            "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnvp", "posix_spawn", "posix_spawnp", "forkpty"}
TORCH_SWITCHES = ("_C", "overrides", "DisableTorchFunction", "_disabled_torch_function_impl",
                  "TorchFunctionMode", "_len_torch_function_stack", "_pop_torch_function_stack")
HARMLESS_DUNDERS = {"__init__", "__name__", "__qualname__", "__module__", "__doc__", "__len__", "__version__",
                    "__main__", "__file__",
                    "__getitem__", "__setitem__", "__iter__", "__next__", "__repr__", "__str__", "__call__",
                    "__enter__", "__exit__", "__post_init__"}


# Magics an honest notebook uses; the code that time/timeit run is checked like any other.
SAFE_MAGICS = {"matplotlib": None, "time": "code", "timeit": "code"}


@dataclass(frozen=True)
class Finding:
    """One construct found in the student's cell ``cell`` (its index in the notebook)."""

    cell: int
    what: str


def _python(source: str) -> str:
    """A cell as Python: magics become the ``get_ipython()`` calls IPython would run."""
    return TransformerManager().transform_cell(source)


class _Visitor(ast.NodeVisitor):
    def __init__(self, early: set[str], imported_early: set[str]):
        self.found: list[tuple[str, int]] = []
        self.early = early
        self.imported_early = imported_early  # local names a forbidden C function was imported as
        self.modules: set[str] = set()  # names bound to modules (or their members) by imports
        self.called: set[int] = set()   # ids of nodes that are the function of a call
        self.safe_shell: set[int] = set()  # get_ipython names of a safe magic's call

    def flag(self, node, what: str):
        self.found.append((what, getattr(node, "lineno", 0)))

    def visit_Import(self, node):
        for alias in node.names:
            root = alias.name.split(".")[0]
            if root in DYNAMIC_MODULES:
                self.flag(node, f"import {alias.name}")
            self.modules.add((alias.asname or root))
        self.generic_visit(node)

    def visit_ImportFrom(self, node):
        root = (node.module or "").split(".")[0]
        for alias in node.names:
            if root in DYNAMIC_MODULES and alias.name not in ALLOWED_FROM.get(root, ()):
                self.flag(node, f"from {node.module} import {alias.name}")
            if alias.name == "*":
                self.flag(node, f"from {node.module} import *")
            self.modules.add(alias.asname or alias.name)
        self.generic_visit(node)

    def _safe_magic(self, node) -> bool:
        """``get_ipython().run_line_magic('timeit', code)`` and the like: the shell call is allowed,
        the code it runs is checked here."""
        fn = node.func
        if not (isinstance(fn, ast.Attribute) and fn.attr in ("run_line_magic", "run_cell_magic")
                and isinstance(fn.value, ast.Call) and getattr(fn.value.func, "id", None) == "get_ipython"
                and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in SAFE_MAGICS):
            return False
        self.safe_shell.add(id(fn.value.func))
        if SAFE_MAGICS[node.args[0].value] == "code":
            for arg in node.args[1:]:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.strip():
                    try:
                        inner = ast.parse(_python(arg.value))
                    except SyntaxError:
                        continue
                    for sub in ast.walk(inner):
                        if isinstance(sub, ast.Call):
                            self.called.add(id(sub.func))
                    self.visit(inner)
        return True

    def visit_Call(self, node):
        self.called.add(id(node.func))
        fn = node.func
        self._safe_magic(node)
        if isinstance(fn, ast.Name) and fn.id in DYNAMIC_CALLS and not (fn.id == "get_ipython" and id(fn) in self.safe_shell):
            self.flag(node, f"{fn.id}()")
        if isinstance(fn, ast.Name) and fn.id == "getattr":
            name = node.args[1] if len(node.args) >= 2 else None
            if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                self.flag(node, "getattr() with a computed name")
            elif name.value in self.early:
                self.flag(node, f"getattr(..., {name.value!r})")
        self.generic_visit(node)

    def visit_Name(self, node):
        if node.id in ("getattr", "__builtins__") and id(node) not in self.called:
            self.flag(node, f"{node.id} used as a value")
        if node.id in self.imported_early and id(node) not in self.called:
            self.flag(node, f"{node.id} referenced without being called")
        self.generic_visit(node)

    def visit_Attribute(self, node):
        attr, base = node.attr, node.value
        if attr.startswith("__") and attr.endswith("__") and attr not in HARMLESS_DUNDERS:
            self.flag(node, f".{attr}")
        if isinstance(base, ast.Name) and base.id == "sys" and attr in SYS_ATTRS:
            self.flag(node, f"sys.{attr}")
        if isinstance(base, ast.Name) and base.id == "os" and attr in OS_ATTRS:
            self.flag(node, f"os.{attr}")
        if attr in TORCH_SWITCHES:
            self.flag(node, f".{attr}")
        if isinstance(node.ctx, (ast.Store, ast.Del)) and self._from_module(base):
            self.flag(node, f"assigns {ast.unparse(node)}, an attribute of a module")
        self._early(node, attr)
        self.generic_visit(node)

    def visit_Constant(self, node):
        if isinstance(node.value, str):
            text = node.value
            if "__" in text and any(d in text for d in ("__code__", "__globals__", "__dict__", "__closure__",
                                                        "__builtins__", "__import__", "__class__", "__subclasses__")):
                self.flag(node, f"the string {text[:40]!r}")
        self.generic_visit(node)

    def _from_module(self, node) -> bool:
        while isinstance(node, ast.Attribute):
            node = node.value
        return isinstance(node, ast.Name) and node.id in self.modules

    def _early(self, node, name: str):
        if name in self.early and id(node) not in self.called:
            self.flag(node, f"{name} referenced without being called")


def check_cells(cells: list[tuple[int, str]], early: set[str]) -> list[Finding]:
    """Findings in the student's code cells (``(index, source)``); ``early``: the names of the
    lab's forbidden C functions (see the module's docstring). A cell that does not parse is left
    alone: it fails in the kernel too."""
    found, trees = [], []
    for index, source in cells:
        try:
            trees.append((index, ast.parse(_python(source))))
        except SyntaxError:
            continue
    imported_early = {alias.asname or alias.name for _, tree in trees for node in ast.walk(tree)
                      if isinstance(node, ast.ImportFrom) for alias in node.names if alias.name in early}
    for index, tree in trees:
        visitor = _Visitor(early, imported_early)
        for node in ast.walk(tree):  # the calls first, so that a called name is known as called
            if isinstance(node, ast.Call):
                visitor.called.add(id(node.func))
        visitor.visit(tree)
        for what, line in dict.fromkeys(visitor.found):
            found.append(Finding(index, f"{what} (line {line})"))
    return found
