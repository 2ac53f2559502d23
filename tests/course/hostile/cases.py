"""Hostile submissions, built from the real lab 1 solution: each breaks one rule on purpose.

``build(dest, course_root)`` writes ``<case>.ipynb`` files into ``dest`` and returns
``{case: Expect}``: the score it must get (what its honest parts earn) and a word the report
must contain. Paths the attacks aim at are filled in for the course being graded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nbformat

LAB = "lab01_precision_formats"
FULL = 13.0


@dataclass(frozen=True)
class Expect:
    score: float | None           # None: only `status` is checked
    status: str = "graded"
    report: str = ""              # a phrase the outcome's message must contain
    zero: tuple[str, ...] = ()    # exercises that must score 0
    what: str = ""                # one line for the docs table


def _free(source: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_code_cell(source)


def _insert_after(nb, cell_id: str, cell) -> None:
    index = next(i for i, c in enumerate(nb.cells) if c.get("id") == cell_id)
    nb.cells.insert(index + 1, cell)


def _set(nb, cell_id: str, source: str) -> None:
    next(c for c in nb.cells if c.get("id") == cell_id).source = source


def _probe(paths: list[str], action: str, report: bool = True) -> str:
    """A cell that tries ``action`` on each path; with ``report``, it prints a marker when that works
    (writes are judged from outside instead: a write into the box's private /tmp succeeds, harmlessly)."""
    mark = "        print('BREACH', p)\n" if report else ""
    return (f"import os, shutil\nfor p in {paths!r}:\n    try:\n        {action}\n"
            f"{mark}    except Exception:\n        pass\n")


def build(dest: Path, course_root: Path, solution: nbformat.NotebookNode, repo: Path) -> dict[str, Expect]:
    dest.mkdir(parents=True, exist_ok=True)
    cases: dict[str, tuple[nbformat.NotebookNode, Expect]] = {}

    def case(name, expect, edit=None, raw: str | None = None):
        nb = nbformat.from_dict(solution)
        if edit:
            edit(nb)
        cases[name] = (raw if raw is not None else nb, expect)

    secrets = [str(course_root / "masters" / f"{LAB}.py"), str(course_root / "reference" / LAB / "split_bits.npz"),
               str(course_root / "gradebook.db"), str(repo / "course" / "masters" / f"{LAB}.py"),
               str(course_root / "submitted" / "alice" / LAB / f"{LAB}.ipynb"), "/etc/shadow", "/root/.ssh/id_rsa"]
    targets = [str(course_root / "gradebook.db"), str(course_root / "submitted" / "alice" / LAB / f"{LAB}.ipynb"),
               str(repo / "README.md"), str(repo / "qcore" / "checks.py")]

    case("infinite_loop", Expect(FULL, report="time limit", what="`while True: pass` in a free cell"),
         lambda nb: _insert_after(nb, "setup", _free("while True:\n    pass\n")))
    case("allocate_50gb", Expect(FULL, what="allocates and fills 50 GB"),
         lambda nb: _insert_after(nb, "setup", _free("import torch\nx = torch.empty(50 * 2**30, dtype=torch.uint8)\nx.fill_(1)\n")))
    case("os_exit", Expect(FULL, report="stopped the kernel", what="`os._exit(1)` kills the kernel"),
         lambda nb: _insert_after(nb, "setup", _free("import os\nos._exit(1)\n")))
    case("sys_exit", Expect(FULL, what="`sys.exit(3)`"),
         lambda nb: _insert_after(nb, "setup", _free("import sys\nsys.exit(3)\n")))
    case("fork_bomb", Expect(FULL, what="processes that fork without end"),
         lambda nb: _insert_after(nb, "setup", _free(
             "import os\ndef bomb():\n    while True:\n        if os.fork() == 0:\n            try:\n"
             "                bomb()\n            finally:\n                os._exit(0)\nbomb()\n")))
    case("output_100mb", Expect(FULL, what="prints 100 MB"),
         lambda nb: _insert_after(nb, "setup", _free("print('x' * (100 * 2**20))\n")))
    case("stderr_flood", Expect(FULL, what="100k lines to stderr in a free cell"),
         lambda nb: _insert_after(nb, "setup", _free("import sys\nfor i in range(100_000):\n    sys.stderr.write('junk\\n')\n")))
    case("stderr_in_graded_function", Expect(FULL - 1, zero=("ex5_model_bytes_tests",),
                                              what="the graded function writes to stderr"),
         lambda nb: _set(nb, "ex5_model_bytes",
                         "import sys, math\ndef model_bytes(n_params, bits, group_size=None, scale_bits=16):\n"
                         "    sys.stderr.write('debug\\n')\n    extra = 0 if group_size is None else math.ceil(n_params / group_size) * scale_bits\n"
                         "    return (n_params * bits + extra) / 8\n"))
    case("read_secrets", Expect(FULL, what="reads masters, references, gradebook, others' work, system secrets"),
         lambda nb: _insert_after(nb, "setup", _free(_probe(secrets, "open(p, 'rb').read(16)"))))
    case("write_gradebook", Expect(FULL, what="overwrites and deletes the gradebook, another student's work, the code"),
         lambda nb: _insert_after(nb, "setup", _free(
             _probe(targets, "open(p, 'ab').write(b'x')", False) + _probe(targets, "os.remove(p)", False))))
    case("network", Expect(FULL, what="opens sockets to the internet and to the host's loopback"),
         lambda nb: _insert_after(nb, "setup", _free(
             "import socket\nfor host, port in [('pypi.org', 443), ('1.1.1.1', 53), ('8.8.8.8', 443), ('127.0.0.1', 22)]:\n"
             "    try:\n        socket.create_connection((host, port), timeout=2).close()\n        print('BREACH', host)\n"
             "    except OSError:\n        pass\n")))
    case("deleted_test_cell", Expect(None, zero=("ex1_split_bits_tests",), what="deletes a locked test cell"),
         lambda nb: nb.cells.remove(next(c for c in nb.cells if c.get("id") == "ex1_split_bits_tests")))

    def duplicate(nb):
        cell = next(c for c in nb.cells if c.get("id") == "ex2_fields_to_value_tests")
        _insert_after(nb, "ex2_fields_to_value_tests", nbformat.from_dict(cell))
    case("duplicated_test_cell", Expect(FULL, report="duplicate", what="duplicates a test cell (no extra credit)"),
         duplicate)

    def reorder(nb):
        i = next(i for i, c in enumerate(nb.cells) if c.get("id") == "ex3_format_limits_tests")
        cell = nb.cells.pop(i)
        j = next(i for i, c in enumerate(nb.cells) if c.get("id") == "ex3_format_limits")
        nb.cells.insert(j, cell)
    case("reordered_cells", Expect(FULL - 2, zero=("ex3_format_limits_tests",), what="moves a test cell above its solution"),
         reorder)

    def edit_locked(nb):
        _set(nb, "ex4_round_to_bf16", "def round_to_bf16(x):\n    return x.clone()\n")
        _set(nb, "ex4_round_to_bf16_tests", "print('all good')\n")
    case("edited_test_cell", Expect(FULL - 3, zero=("ex4_round_to_bf16_tests",),
                                    what="wrong answer plus a test cell edited to pass"), edit_locked)

    def patch_checks(nb):
        _set(nb, "ex1_split_bits", "import torch\ndef split_bits(x):\n    z = torch.zeros(x.shape, dtype=torch.int64)\n"
                                   "    return z, z, z\n")
        _insert_after(nb, "ex1_split_bits", _free(
            "import qcore.checks as qc, torch, numpy.testing\nok = lambda *a, **k: None\n"
            "qc.check_equal = qc.check_close = qc.check_true = ok\ncheck_equal = check_close = check_true = ok\n"
            "torch.equal = torch.allclose = lambda *a, **k: True\nnumpy.testing.assert_array_equal = ok\n"))
    case("monkeypatched_checks", Expect(FULL - 2, report="tampering", zero=("ex1_split_bits_tests",),
                                        what="wrong answer plus checks, torch.equal/allclose and numpy.testing patched to pass"),
         patch_checks)

    # --- the classes of issue 18: faking what the kernel reports, reading what the box hides,
    # lying return values, delegation bound early, replacing modules and tracing frames
    untouched = nbformat.read(repo / "labs" / f"{LAB}.ipynb", as_version=4)

    def on_untouched(name, expect, cell_source):
        nb = nbformat.from_dict(untouched)
        _insert_after(nb, "setup", _free(cell_source))
        cases[name] = (nb, expect)

    on_untouched("silenced_failures", Expect(0.0, report="not run", what="untouched, plus IPython told to swallow every exception"),
                 "ip = get_ipython()\nip.set_custom_exc((BaseException,), lambda *a, **k: None)\n")
    on_untouched("forged_replies", Expect(0.0, report="not run", what="untouched, plus the kernel's replies and error outputs rewritten as success"),
                 "from ipykernel import kernelbase\n_send = kernelbase.Kernel.send_response\n"
                 "def send_response(self, stream, msg_or_type, content=None, *args, **kwargs):\n"
                 "    if msg_or_type == 'error':\n        return None\n"
                 "    if isinstance(content, dict) and content.get('status') == 'error':\n"
                 "        content = {'status': 'ok', 'execution_count': content.get('execution_count')}\n"
                 "    return _send(self, stream, msg_or_type, content, *args, **kwargs)\n"
                 "kernelbase.Kernel.send_response = send_response\n")
    hidden_files = [str(repo / "solutions" / f"{LAB}.ipynb"), str(course_root / "masters" / f"{LAB}.py"),
                    str(repo / "course" / "refgen" / f"{LAB}.py"), str(course_root / "reference" / LAB / "model_bytes.npz")]
    on_untouched("runs_the_solution", Expect(0.0, what="untouched, plus the instructor's solution notebook imported as a module"),
                 "import json, sys\nfor p in %r:\n    try:\n        code = open(p).read()\n        print('BREACH', p)\n"
                 "        if p.endswith('.ipynb'):\n"
                 "            code = '\\n'.join(''.join(c['source']) for c in json.loads(code)['cells'] if c['cell_type'] == 'code')\n"
                 "        open('leaked.py', 'w').write(code)\n        from leaked import *\n    except Exception:\n        pass\n"
                 % hidden_files)

    import numpy as np
    with np.load(repo / "course" / "reference" / LAB / "model_bytes.npz") as ref:  # what one run asked, and its answers
        table = {}
        for prefix in ("", "visible_"):
            rows = zip(*(ref[prefix + k].tolist() for k in ("n_params", "bits", "group_size", "scale_bits")))
            table.update({(n, b, g, sb): e for (n, b, g, sb), e in zip(rows, ref[prefix + "expected"].tolist())})
    case("answers_from_a_table", Expect(FULL - 1, zero=("ex5_model_bytes_tests",),
                                        what="exercise 5 answered from a table of another run's questions and answers"),
         lambda nb: _set(nb, "ex5_model_bytes", f"TABLE = {table!r}\n"
                         "def model_bytes(n_params, bits, group_size=None, scale_bits=16):\n"
                         "    return TABLE.get((float(n_params), float(bits), group_size or 0, scale_bits), n_params * bits / 8)\n"))
    case("lying_tensor", Expect(FULL - 3, report="not run", zero=("ex4_round_to_bf16_tests",),
                                what="exercise 4 returns a tensor subclass that answers equal to every comparison"),
         lambda nb: _set(nb, "ex4_round_to_bf16",
                         "import torch\nclass Yes(torch.Tensor):\n    @classmethod\n"
                         "    def __torch_function__(cls, func, types, args=(), kwargs=None):\n"
                         "        if func in (torch.equal, torch.allclose):\n            return True\n"
                         "        return super().__torch_function__(func, types, args, kwargs or {})\n"
                         "def round_to_bf16(x):\n    return x.clone().as_subclass(Yes)\n"))
    case("lying_float", Expect(FULL - 1, zero=("ex5_model_bytes_tests",),
                               what="exercise 5 returns a float that equals everything"),
         lambda nb: _set(nb, "ex5_model_bytes",
                         "class Yes(float):\n    def __eq__(self, other):\n        return True\n"
                         "    def __float__(self):\n        return 3.825e9\n"
                         "def model_bytes(n_params, bits, group_size=None, scale_bits=16):\n    return Yes(n_params * bits / 8)\n"))

    def bound_early(nb):
        _set(nb, "ex1_split_bits", "import qcore.formats as qf\n"
             "def _make():\n    split, fmt = qf.decompose, {torch.float32: qf.FP32, torch.float16: qf.FP16, torch.bfloat16: qf.BF16}\n"
             "    return lambda x: split(x, fmt[x.dtype])\nsplit_bits = _make()\n")
        _set(nb, "ex3_format_limits", "def format_limits(exponent_bits, mantissa_bits, has_inf=True, _finfo=torch.finfo):\n"
             "    fi = _finfo({(8, 23): torch.float32, (5, 10): torch.float16, (8, 7): torch.bfloat16}.get((exponent_bits, mantissa_bits), torch.float32))\n"
             "    return {'max': fi.max, 'min_normal': fi.tiny, 'min_subnormal': fi.tiny * fi.eps, 'eps': fi.eps}\n")
        _set(nb, "ex5_model_bytes", "from qcore.formats import memory_bytes as _mb\n"
             "def model_bytes(n_params, bits, group_size=None, scale_bits=16, _f=_mb):\n    return _f(n_params, bits, group_size, scale_bits)\n")
    case("delegation_bound_early", Expect(FULL - 5, report="forbidden", zero=("ex1_split_bits_tests", "ex3_format_limits_tests", "ex5_model_bytes_tests"),
                                          what="library functions held in a closure, a default argument and an import alias"),
         bound_early)
    case("replaced_modules", Expect(FULL, report="not run", what="`sys.modules` entries of the checking code replaced"),
         lambda nb: _insert_after(nb, "setup", _free(
             "import sys, types\nfake = types.ModuleType('qcore.asking')\nsys.modules['qcore.asking'] = fake\n"
             "sys.modules['qcore.checks'] = fake\n")))

    def traced(nb):
        _set(nb, "ex5_model_bytes", "def model_bytes(n_params, bits, group_size=None, scale_bits=16):\n    return n_params * bits / 8\n")
        _insert_after(nb, "ex5_model_bytes", _free(
            "import sys\ndef tracer(frame, event, arg):\n    if event == 'return' and frame.f_code.co_name == 'model_bytes':\n"
            "        pass\n    return tracer\nsys.settrace(tracer)\n"))
    case("traced_frames", Expect(FULL - 1, report="not run", zero=("ex5_model_bytes_tests",),
                                 what="a trace function set to watch the test's frames"), traced)

    def patched_ask(nb):
        _set(nb, "ex5_model_bytes", "def model_bytes(n_params, bits, group_size=None, scale_bits=16):\n"
             "    return memory_bytes(n_params, bits, group_size, scale_bits)\n")
        _insert_after(nb, "ex5_model_bytes", _free(
            "import contextlib\nimport qcore.asking as qa\nqa.blocked = lambda names: contextlib.nullcontext()\n"))
    case("patched_ask", Expect(FULL - 1, report="not run", zero=("ex5_model_bytes_tests",),
                               what="the hidden test's blocking switched off, and exercise 5 delegating"), patched_ask)
    case("not_json", Expect(0.0, status="invalid", report="not a readable notebook", what="a file that is not JSON"),
         raw="{ this is not a notebook")

    def evil_kernel(nb):
        nb.metadata["kernelspec"] = {"name": "evil-kernel", "display_name": "evil", "language": "python"}
    case("unknown_kernel", Expect(FULL, what="names a kernel that does not exist"), evil_kernel)

    out = {}
    for name, (nb, expect) in cases.items():
        path = dest / f"{name}.ipynb"
        if isinstance(nb, str):
            path.write_text(nb)
        else:
            nbformat.write(nb, path)
        out[name] = expect
    return out


# ----------------------------------------------------------------------------- a lab that loads a model
MODEL_LAB = "lab02_calibration"
MODEL_FULL = 13.0


def build_model_lab(dest: Path, course_root: Path, solution: nbformat.NotebookNode, repo: Path) -> dict[str, Expect]:
    """Cases of the same classes on lab 2 (13 points), which calibrates on the sentiment model's
    activations: the judge holds there too, with a model in the kernel."""
    dest.mkdir(parents=True, exist_ok=True)
    untouched = nbformat.read(repo / "labs" / f"{MODEL_LAB}.ipynb", as_version=4)
    cases: dict[str, tuple[nbformat.NotebookNode, Expect]] = {}

    def case(name, expect, base, edit):
        nb = nbformat.from_dict(base)
        edit(nb)
        cases[name] = (nb, expect)

    case("lab2_silenced_failures", Expect(0.0, report="not run", what="untouched, plus IPython told to swallow every exception"),
         untouched, lambda nb: _insert_after(nb, "setup", _free(
             "get_ipython().set_custom_exc((BaseException,), lambda *a, **k: None)\n")))
    case("lab2_runs_the_solution", Expect(0.0, what="untouched, plus the instructor's solution notebook read and imported"),
         untouched, lambda nb: _insert_after(nb, "setup", _free(
             "import json\ntry:\n"
             f"    cells = json.load(open({str(repo / 'solutions' / f'{MODEL_LAB}.ipynb')!r}))['cells']\n    print('BREACH')\n"
             "    open('leaked.py', 'w').write('\\n'.join(''.join(c['source']) for c in cells if c['cell_type'] == 'code'))\n"
             "    from leaked import *\nexcept Exception:\n    pass\n")))

    def bound_early(nb):
        _set(nb, "ex2_quantize", "def quantize_affine(x, scale, zero_point, qmin, qmax, _q=torch.quantize_per_tensor):\n"
             "    return _q(x, float(scale), int(zero_point), torch.quint8).int_repr().to(torch.int32).clamp(qmin, qmax)\n"
             "def dequantize_affine(q, scale, zero_point):\n    return ((q.to(torch.float32) - zero_point) * scale).to(torch.float32)\n")
        _set(nb, "ex6_pack", "def _make():\n    from qcore.packing import pack_int4, unpack_int4\n"
             "    return (lambda codes: pack_int4(codes.to(torch.int64))), (lambda packed, shape: unpack_int4(packed, shape))\n"
             "pack_4bit, unpack_4bit = _make()\n")
    case("lab2_delegation_bound_early", Expect(MODEL_FULL - 4, report="forbidden", zero=("ex2_quantize_tests", "ex6_pack_tests"),
                                               what="torch's quantizer kept in a default argument, qcore's packing in a closure"),
         solution, bound_early)
    case("lab2_lying_tensor", Expect(MODEL_FULL - 2, report="not run", zero=("ex6_pack_tests",),
                                     what="exercise 6 returns a tensor subclass that answers equal to every comparison"),
         solution, lambda nb: _set(nb, "ex6_pack",
                                   "import math\nclass Yes(torch.Tensor):\n    @classmethod\n"
                                   "    def __torch_function__(cls, func, types, args=(), kwargs=None):\n"
                                   "        return True if func is torch.equal else super().__torch_function__(func, types, args, kwargs or {})\n"
                                   "def pack_4bit(codes):\n    return torch.zeros((codes.numel() + 1) // 2, dtype=torch.uint8).as_subclass(Yes)\n"
                                   "def unpack_4bit(packed, shape):\n    return torch.zeros(shape, dtype=torch.uint8).as_subclass(Yes)\n"))
    case("lab2_replaced_modules", Expect(MODEL_FULL, report="not run", what="`sys.modules` entry of the asking code replaced"),
         solution, lambda nb: _insert_after(nb, "setup", _free(
             "import sys, types\nsys.modules['qcore.asking'] = types.ModuleType('qcore.asking')\n")))
    out = {}
    for name, (nb, expect) in cases.items():
        nbformat.write(nb, dest / f"{name}.ipynb")
        out[name] = expect
    return out
