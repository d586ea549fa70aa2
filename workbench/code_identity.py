"""What identifies the code a plugin runs (an intervention, a cache policy, a statistic of one's own), for the
stores its numbers go into: the names of its functions and classes and a hash of their compiled code (bytecode
and constants, classes' simple attributes), wherever they were defined, a notebook cell included; not their
comments or docstrings. Edited code (a cell run again) is other code, so a store holding results of the old code
refuses to take the new code's under the same name (workbench/intervene_entries.py `code_of`,
workbench/statistics.py `identity`). The same code gives the same identity in every process of one Python
version."""

from __future__ import annotations

import hashlib
import inspect
import sys

NOT_USERS = ("workbench", "models", "torch", "numpy", *sys.stdlib_module_names)  # (classes not of the user's)


def code_identity(*things, values: tuple[str, ...] = ()) -> str:
    """'name, name (code <12 hex>)' of functions and classes `things` (duplicates counted once), and of `values`
    they read besides their code (texts: the module constants they name, `constants_read`; a reduce's closure)."""
    things = list(dict.fromkeys(things))
    digest = hashlib.sha256()
    for thing in things:
        for part in _compiled(thing):
            digest.update(part.encode() + b"\0")
    for value in values:
        digest.update(value.encode() + b"\0")
    names = dict.fromkeys(getattr(t, "__qualname__", type(t).__name__) for t in things)
    return f"{', '.join(names)} (code {digest.hexdigest()[:12]})"


def callable_identity(fn) -> str:
    """`code_identity` of any callable and the values it reads besides its code (a statistic's reduce): a
    function's closure and the constants among the module globals it names (two lambdas of `make(0.1)` and
    `make(0.5)` differ), a `functools.partial`'s function and arguments, a callable object's class and its simple
    attributes."""
    import functools

    values = []
    while isinstance(fn, functools.partial):
        values += [_const_text(fn.args), _const_text(tuple(sorted(fn.keywords.items())))]
        fn = fn.func
    if inspect.ismethod(fn):  # a bound method: its object's settings, its function
        values.append(_settings(fn.__self__))
        fn = fn.__func__
    if not (inspect.isfunction(fn) or inspect.isclass(fn)):  # a callable object: its settings, its class
        values.append(_settings(fn))
        fn = type(fn)
    if inspect.isfunction(fn):
        for cell in fn.__closure__ or ():
            try:
                values.append(_const_text(cell.cell_contents))
            except ValueError:  # (an empty cell)
                values.append("<empty>")
        values += [f"{n}={_const_text(fn.__globals__[n])}" for n in fn.__code__.co_names
                   if n in fn.__globals__ and _simple(fn.__globals__[n])]
    return code_identity(fn, values=tuple(values))


def constants_read(*things) -> tuple[str, ...]:
    """'name=value' of the simple module constants (numbers, text) that the code of `things` (functions, and the
    methods of classes, nested functions and lambdas included) names: a plugin's `SCALE = 0.5` edited to 0.0 is
    other code, as for a statistic's reduce (`callable_identity`). Empty when they name none."""
    def codes(code):
        yield code
        for c in code.co_consts:
            if inspect.iscode(c):
                yield from codes(c)

    funcs = []
    for thing in things:
        if inspect.isclass(thing):
            for value in vars(thing).values():
                value = getattr(value, "__func__", value)  # (static and class methods)
                funcs += [f for f in (value.fget, value.fset) if f] if isinstance(value, property) else [value]
        else:
            funcs.append(thing)
    found = {}
    for f in filter(inspect.isfunction, funcs):
        for code in codes(f.__code__):
            found.update({n: _const_text(f.__globals__[n]) for n in code.co_names
                          if n in f.__globals__ and _simple(f.__globals__[n])})
    return tuple(f"{n}={v}" for n, v in sorted(found.items()))


def _settings(obj) -> str:
    """An object's simple attributes (numbers, text), as text in a fixed order."""
    return _const_text(tuple(sorted((k, v) for k, v in getattr(obj, "__dict__", {}).items() if _simple(v))))


def _simple(value) -> bool:
    """A value `_const_text` writes out (a number, text, or a tuple or set of them)."""
    if isinstance(value, (tuple, set, frozenset)):
        return all(_simple(v) for v in value)
    return isinstance(value, (bool, int, float, complex, str, bytes, type(None)))


def _compiled(thing) -> list[str]:
    """A function's or a class's compiled code as text that is the same in every process."""
    if inspect.isclass(thing):
        out = [thing.__qualname__]
        for name, value in sorted(vars(thing).items()):
            if name in ("__doc__", "__module__", "__qualname__", "__dict__", "__weakref__", "__firstlineno__",
                        "__static_attributes__"):
                continue
            value = getattr(value, "__func__", value)  # (static and class methods)
            funcs = [f for f in (getattr(value, "fget", None), getattr(value, "fset", None)) if f] \
                if isinstance(value, property) else [value]
            for f in funcs:
                out += [name] + (_code_text(f.__code__) + [_const_text(f.__defaults__)] if hasattr(f, "__code__")
                                 else [_const_text(f)])
        return out
    return _code_text(thing.__code__) + [_const_text(thing.__defaults__)]


def _code_text(code) -> list[str]:
    consts = [("\n".join(_code_text(c)) if inspect.iscode(c) else _const_text(c)) for c in code.co_consts]
    return [code.co_code.hex(), repr(code.co_names), repr(code.co_varnames), *consts]


def _const_text(value) -> str:
    """A constant's text, the same in every process (a set's items sorted: their order follows the hash seed)."""
    if isinstance(value, (set, frozenset)):
        return f"{type(value).__name__}({sorted(map(_const_text, value))})"
    if isinstance(value, tuple):
        return f"({', '.join(map(_const_text, value))})"
    if isinstance(value, (bool, int, float, complex, str, bytes, type(None))):
        return repr(value)
    return type(value).__name__  # (an object: its kind only, not its address)
