"""Every TensorRT name ovseg uses, checked against the real Python bindings of the TensorRT that imports here (run.sh
makes a venv per TensorRT version, over stub native libraries). No GPU, no ovseg import: the code is read, not run.

The uses are derived from the code: each Python file under SOURCES is parsed, and a TensorRT object is followed from
the module (``import tensorrt as trt``, or a parameter named ``trt``) through attribute access, calls (a class
gives an instance; a method gives what the real binding's signature says it returns) and plain assignments
(``builder = trt.Builder(logger)``, ``self.engine = ...``). Each attribute must exist, and each call must fit one of
the real signatures (pybind11 docstrings; ``inspect`` for Python functions): its count of positional arguments and
its keyword names. Then the one behaviour the tests' stand-ins copy from the real bindings: a NULL factory (the stub
libraries return NULL, as TensorRT does without a usable GPU) raises TypeError. One line per fault; exit 1 on any.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import sys
from pathlib import Path

import tensorrt as trt

TRT = f"TensorRT {trt.__version__}"
ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("runtime", "export", "calib", "benchmarks", "ovseg")
MISSING = object()


class Param:
    def __init__(self, text: str):  # "name: type" or "name: type = default", as pybind11 writes them
        self.name, self.default = text.split(":")[0].strip(), " = " in text


def _split(params: str) -> list[str]:
    """Top-level commas only: annotations and defaults nest brackets ("typing.Tuple[int, int]", "<Severity: 2>")."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(params):
        depth += c in "([{<"
        depth -= c in ")]}>"
        if c == "," and depth == 0:
            parts.append(params[start:i])
            start = i + 1
    return [p for p in (*parts, params[start:]) if p.strip()]


def signatures(f) -> list[tuple[list[Param], str]]:
    """The overloads of a pybind11 function or method: (parameters without self, return annotation)."""
    name = getattr(f, "__name__", "")
    found = []
    for line in (f.__doc__ or "").splitlines():
        m = re.match(rf"^(?:\d+\. )?{re.escape(name)}\((.*)\) -> (.+)$", line.strip())
        if m and m.group(1) != "*args, **kwargs":
            params = [Param(p) for p in _split(m.group(1))]
            found.append((params[1:] if params and params[0].name == "self" else params, m.group(2)))
    return found


def fits(params: list[Param], positional: int, keywords: set[str]) -> bool:
    rest = params[positional:]
    names = {p.name for p in rest}
    return positional <= len(params) and keywords <= names and all(p.default or p.name in keywords for p in rest)


def resolve(annotation: str):
    """The class a return annotation names in the bindings ("tensorrt_bindings.tensorrt.ICudaEngine"), or None."""
    obj = trt
    for part in re.sub(r"^(tensorrt_bindings\.)?tensorrt\.", "", annotation.strip()).split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) else None


class Uses(ast.NodeVisitor):
    """Walks one file in source order; ``names``: local names and ``self.x`` bound to the module or a class."""

    def __init__(self, file: Path):
        self.file, self.names, self.uses, self.faults = file, {}, set(), []

    def fault(self, node, text: str) -> None:
        self.faults.append(f"{os.path.relpath(self.file, ROOT)}:{node.lineno}: {text}")

    def key(self, node) -> str | None:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            return f"self.{node.attr}"
        return None

    def visit_Import(self, node) -> None:
        for alias in node.names:
            if alias.name == "tensorrt":
                self.names[alias.asname or "tensorrt"] = trt

    def visit_ClassDef(self, node) -> None:
        outer = self.names
        self.names = {k: v for k, v in outer.items() if not k.startswith("self.")}
        self.generic_visit(node)
        self.names = outer

    def visit_FunctionDef(self, node) -> None:
        outer = dict(self.names)
        args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
        for a in args:
            self.names.pop(a.arg, None)
            if a.arg == "trt":  # the project's convention: load_tensorrt()'s module, passed on as `trt`
                self.names["trt"] = trt
        self.generic_visit(node)
        selfs = {k: v for k, v in self.names.items() if k.startswith("self.")}  # kept for the class's next methods
        self.names = {**outer, **selfs}

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Assign(self, node) -> None:
        value = self.type_of(node.value)
        for target in node.targets:
            key = self.key(target)
            if key and value is not None:
                self.names[key] = value
            elif key:
                self.names.pop(key, None)
            else:
                self.visit(target)

    def visit_Attribute(self, node) -> None:
        self.type_of(node)

    def visit_Call(self, node) -> None:
        self.type_of(node)

    def member(self, node: ast.Attribute):
        """``node.attr`` of a TensorRT object, recorded and checked; None when the base is not TensorRT."""
        base = self.type_of(node.value)
        if base is None:
            return None
        owner = "tensorrt" if base is trt else base.__qualname__
        self.uses.add(f"{owner}.{node.attr}")
        obj = getattr(base, node.attr, MISSING)
        if obj is MISSING:
            self.fault(node, f"{TRT} has no {owner}.{node.attr}")
            return None
        return obj

    def type_of(self, node):
        """The module or the TensorRT class ``node`` evaluates to (visiting what it contains), else None."""
        if isinstance(node, ast.Name):
            return self.names.get(node.id)
        if isinstance(node, ast.Attribute):
            key = self.key(node)
            if key in self.names:
                return self.names[key]
            obj = self.member(node)
            return obj if isinstance(obj, type) else None
        if isinstance(node, ast.Call):
            callee = self.member(node.func) if isinstance(node.func, ast.Attribute) else None
            if not isinstance(node.func, ast.Attribute):
                self.visit(node.func)
            for arg in (*node.args, *(k.value for k in node.keywords)):
                self.visit(arg)
            return None if callee is None else self.call(node, callee)
        self.generic_visit(node)
        return None

    def call(self, node: ast.Call, callee):
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            return None  # *args or **kwargs: the arity is not known from the code
        positional, keywords = len(node.args), {k.arg for k in node.keywords if k.arg}
        what = ast.unparse(node.func)
        if not callable(callee):
            self.fault(node, f"{what} is called, and is not callable in {TRT} (a property or value)")
            return None
        if inspect.isfunction(callee):  # the bindings' Python helpers (nptype)
            try:
                inspect.signature(callee).bind(*range(positional), **dict.fromkeys(keywords))
            except TypeError as e:
                self.fault(node, f"{what}: {e}, in {TRT}'s {inspect.signature(callee)}")
            return None
        overloads = signatures(callee.__init__ if isinstance(callee, type) else callee)
        if not overloads:
            self.fault(node, f"{what} is called, and {TRT} gives it no signature (no constructor?)")
            return None
        matching = [ret for params, ret in overloads if fits(params, positional, keywords)]
        if not matching:
            have = " or ".join(f"({', '.join(p.name for p in params)})" for params, _ in overloads)
            given = ", ".join([*(["_"] * positional), *(f"{k}=" for k in sorted(keywords))])
            self.fault(node, f"{what}({given}) fits no signature of {TRT}: {have}")
            return None
        return callee if isinstance(callee, type) else resolve(matching[0])


def null_factories() -> list[str]:
    """The stand-ins raise TypeError where the real bindings get NULL from TensorRT (no usable GPU)."""
    faults = []
    for factory in (trt.Builder, trt.Runtime):
        try:
            factory(trt.Logger(trt.Logger.WARNING))
        except TypeError:
            continue
        faults.append(
            f"{TRT}'s {factory.__name__} does not raise TypeError over a NULL factory, as the tests' stand-ins do"
        )
    return faults


def main(paths: list[str]) -> int:
    files = [Path(p).resolve() for p in paths] or sorted(f for d in SOURCES for f in (ROOT / d).rglob("*.py"))
    uses, faults = set(), []
    for f in files:
        walker = Uses(f)
        walker.visit(ast.parse(f.read_text(), str(f)))
        uses |= walker.uses
        faults += walker.faults
    faults += null_factories()
    for line in faults:
        print(f"trt-api: {line}", file=sys.stderr)
    print(f"trt-api: {TRT}: {len(uses)} names used, {len(faults)} faults")
    return 1 if faults else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
