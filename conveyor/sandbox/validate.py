"""Static check of a ``code`` step for the flow validator: compiles, defines ``run(input)``.

Nothing is executed: the source is compiled (which also catches errors the parser lets
through, such as ``return`` outside a function) and the module's top level is searched for
``def run`` / ``async def run`` taking at least one positional argument. A ``run`` created
any other way (assignment, import) is rejected on purpose — the validator must be able to
see it, and the error message tells the author what to write.
"""

from __future__ import annotations

import ast


def validate_code(code: str, *, filename: str = "<step>") -> str | None:  # noqa: PLR0911 - one return per rule, first failure wins
    """``None`` when ``code`` is acceptable, else one line saying what is wrong and where."""
    if not isinstance(code, str) or not code.strip():
        return "code is empty: define a function run(input)"
    try:
        tree = ast.parse(code, filename, "exec")
        compile(tree, filename, "exec", dont_inherit=True)
    except SyntaxError as exc:
        where = f"line {exc.lineno}" if exc.lineno else "code"
        return f"{where}: {exc.msg}"
    except (ValueError, TypeError) as exc:  # NUL bytes and the like
        return f"code does not compile: {exc}"
    run: ast.FunctionDef | ast.AsyncFunctionDef | None = None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == "run":
            run = node
    if run is None:
        return "code must define a top-level function run(input)"
    args = run.args
    positional = len(args.posonlyargs) + len(args.args)
    if positional == 0 and args.vararg is None:
        return f"line {run.lineno}: run must take one argument: def run(input)"
    required = positional - len(args.defaults)
    if required > 1:
        return f"line {run.lineno}: run must take exactly one required argument: def run(input)"
    if any(d is None for d in args.kw_defaults):
        return f"line {run.lineno}: run must not have required keyword-only arguments"
    return None
