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
- **a forbidden C function** (``math.frexp``, ``numpy.percentile``), which has no code object to
  swap: only its name where it lives is blocked, so it may be called there (``np.percentile(...)``)
  but not reached by another path (``numpy.core.umath.frexp``), held before a test runs (a default
  argument, an alias) or fetched with ``getattr(np, "frexp")``.

Honest lab code needs none of these. The grader does not run a cell that holds one
(``qcourse.autograde``): the cell is replaced by an error that names the construct, so the rest
of the notebook earns what it earns without it, and the report says which cell and why.

Example:
    >>> found = check_cells([(3, "import sys\\nf = sys.modules['qcore.formats']")], set())
    >>> [(f.cell, f.what) for f in found]
    [(3, 'sys.modules (line 2)')]
    >>> cell = "import numpy as np\\ny = np.frexp(1.0)\\nz = np.core.umath.frexp(1.0)\\ng = lambda v, f=np.frexp: f(v)"
    >>> [f.what for f in check_cells([(4, cell)], {"numpy.frexp"})]
    ['numpy.core.umath.frexp: a forbidden C function by another path (line 3)', 'numpy.frexp held without being called (line 4)']
"""
from __future__ import annotations

import ast
import threading
from dataclasses import dataclass

from IPython.core.inputtransformer2 import TransformerManager

# Calls and names that reach past the student's own objects.
DYNAMIC_CALLS = {"__import__", "eval", "exec", "compile", "globals", "locals", "vars", "breakpoint",
                 "get_ipython", "delattr", "setattr"}
BY_NAME = {"attrgetter", "methodcaller"}  # getattr by another name
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
    def __init__(self, c_functions: set[str], aliases: dict[str, str]):
        self.found: list[tuple[str, int]] = []
        self.c_functions = c_functions  # dotted names, e.g. "numpy.percentile"
        self.c_names = {d.rsplit(".", 1)[-1] for d in c_functions}
        self.aliases = aliases  # local name -> the module or member it was imported as
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
            dotted = f"{node.module}.{alias.name}"
            if alias.name in self.c_names and dotted not in self.c_functions and _same_object(dotted, self.c_functions):
                self.flag(node, f"from {node.module} import {alias.name}: a forbidden C function by another path")
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
                    inner = _parse(arg.value)
                    if inner is not None:
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
            elif name.value in self.c_names:
                self.flag(node, f"getattr(..., {name.value!r}): a forbidden C function")
        self.generic_visit(node)

    def visit_Name(self, node):
        if node.id in ("getattr", "__builtins__") and id(node) not in self.called:
            self.flag(node, f"{node.id} used as a value")
        if node.id in BY_NAME:
            self.flag(node, node.id)
        held = self.aliases.get(node.id, "")
        if held in self.c_functions and id(node) not in self.called:
            self.flag(node, f"{node.id} ({held}) held without being called")
        self.generic_visit(node)

    def visit_Attribute(self, node):
        attr, base = node.attr, node.value
        if attr.startswith("__") and attr.endswith("__") and attr not in HARMLESS_DUNDERS:
            self.flag(node, f".{attr}")
        if isinstance(base, ast.Name) and base.id == "sys" and attr in SYS_ATTRS:
            self.flag(node, f"sys.{attr}")
        if isinstance(base, ast.Name) and base.id == "os" and attr in OS_ATTRS:
            self.flag(node, f"os.{attr}")
        if attr in TORCH_SWITCHES or attr in BY_NAME:
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

    def _dotted(self, node) -> str | None:
        """The module path an attribute chain stands for (``np.core.umath`` -> ``numpy.core.umath``)."""
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id in self.aliases:
            return ".".join([self.aliases[node.id], *reversed(parts)])
        return None

    def _early(self, node, name: str):
        # A C function has no code object to swap: only its name where it lives is blocked. So it
        # may be called there (np.percentile(...)), not reached by another path (numpy.core.umath.frexp
        # is numpy.frexp) nor held before the test runs (a default argument, an alias).
        if name not in self.c_names or not isinstance(node, ast.Attribute):
            return
        base = self._dotted(node.value)
        if base is None:
            return  # an attribute of the student's own object
        dotted = f"{base}.{name}"
        if dotted not in self.c_functions and not _same_object(dotted, self.c_functions):
            return  # another function of that name (torch.quantile is not numpy.quantile)
        if dotted not in self.c_functions:
            self.flag(node, f"{dotted}: a forbidden C function by another path")
        elif id(node) not in self.called:
            self.flag(node, f"{dotted} held without being called")


def _same_object(dotted: str, c_functions: set[str]) -> bool:
    """Whether ``dotted`` is one of the forbidden C functions under another name, resolved here
    (only inside the packages those functions come from: nothing else is imported by the grader)."""
    from qcore.asking import _resolve

    packages = {d.split(".")[0] for d in c_functions}
    if dotted.split(".")[0] not in packages:
        return False
    import warnings

    with warnings.catch_warnings():  # numpy.core and the like warn that they moved
        warnings.simplefilter("ignore")
        try:
            target = _resolve(dotted)
        except Exception:
            return False
        return any(_resolve(d) is target for d in c_functions)


def _aliases(trees) -> dict[str, str]:
    """What each imported name stands for, over all cells (``import numpy as np``: np -> numpy)."""
    found = {}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    found[a.asname] = a.name if a.asname else None
                    if not a.asname:
                        found[a.name.split(".")[0]] = a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    found[a.asname or a.name] = f"{node.module}.{a.name}"
    return {k: v for k, v in found.items() if k and v}


_PARSING = threading.Lock()  # CPython 3.11's parser is not safe in threads (autograde grades in several)


def _parse(source: str):
    with _PARSING:
        try:
            return ast.parse(_python(source))
        except SyntaxError:
            return None


def check_cells(cells: list[tuple[int, str]], c_functions: set[str], context: list[str] = ()) -> list[Finding]:
    """Findings in the student's code cells (``(index, source)``); ``c_functions``: the dotted
    names of the lab's forbidden C functions (see the module's docstring); ``context``: the lab's
    own cells, whose imports (``import numpy as np``) the student's code uses too. A cell that
    does not parse is left alone: it fails in the kernel too."""
    found, trees = [], []
    for index, source in cells:
        tree = _parse(source)
        if tree is not None:
            trees.append((index, tree))
    given = [t for t in map(_parse, context) if t is not None]
    aliases = _aliases([*given, *(tree for _, tree in trees)])
    for index, tree in trees:
        visitor = _Visitor(c_functions, aliases)
        visitor.visit(tree)  # a call is visited before its function: the function is known as called
        for what, line in dict.fromkeys(visitor.found):
            found.append(Finding(index, f"{what} (line {line})"))
    return found
