"""Which version of model.py each fast module was written against, and whether model.py still has it.

A fast module replaces some methods of a plain one (FastFeedForward its forward, FastAttention its attention on
grids, ...). Edit one of those methods in model.py and the fast version would silently keep the old behaviour; so
each fast class names the plain code it stands in for (`written_against`: method or function name -> a hash of
its code), and `fast.accelerate` leaves a module plain, and says so once, when model.py's code no longer hashes the
same. The hash ignores comments, docstrings and formatting: only a change of what the code does counts.

    python -m fast.fingerprint      # the hashes of model.py as it is now, to paste after updating a fast class
"""
import ast
import hashlib
import inspect
import sys
import textwrap


def code_hash(fn):
    """A short hash of a function's code without its name, docstring, comments or layout; None when its source
    cannot be read (a lambda, a function made at run time), which never matches."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    node = tree.body[0] if tree.body else None
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]                                     # the docstring
    key = ast.dump(ast.Module(body=[*body], type_ignores=[])) + ast.dump(node.args)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def plain_code(plain, name):
    """A method of the plain class, or a function of its module (e.g. model.gelu_tanh)."""
    return getattr(plain, name) if hasattr(plain, name) else getattr(sys.modules[plain.__module__], name)


def current(plain, names):
    return {name: code_hash(plain_code(plain, name)) for name in names}


def differences(plain, fast):
    """What of the plain code the fast class stands in for has changed: a list of names (empty: still the same).

    A torch layer (nn.Linear, nn.Dropout, ...) must still have torch's own forward."""
    expected = getattr(fast, "written_against", None)
    if expected is None:
        forward = plain.forward
        own = getattr(forward, "__module__", "").startswith("torch.") and \
            getattr(forward, "__qualname__", "") == f"{plain.__name__}.forward"
        return [] if own else ["forward"]
    now = current(plain, expected)
    return [name for name, h in expected.items() if now[name] != h]


def main():
    from fast.layers import SWAPS
    for plain, fast in SWAPS.items():
        names = getattr(fast, "written_against", None)
        if names is not None:
            print(f"{fast.__name__}.written_against = {current(plain, names)!r}")


if __name__ == "__main__":
    main()
