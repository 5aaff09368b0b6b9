"""How much code a reader follows from one function: the project's definitions reachable from it.

    python3 tools/reach.py cpt_rft.py:grpo_step          # one GRPO step
    python3 tools/reach.py cpt_sft.py:sft_step --list    # one SFT step, each definition named
    python3 tools/reach.py cpt_rft.py:grpo_step --stop data.rewards   # not following into the verifier

From the start, every name the function's body uses that resolves to a function, method or class of the project
(a module's own top level, `import module` + `module.name`, `from module import name`, `self.name` in a class) is
followed, functions passed by reference included; library code is not. Printed: definitions, lines (each
definition's whole span, docstring and comments included) and files. A reader's measure, not a call graph: a
branch never taken on the way still counts, as a reader still reads it.
"""
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project_modules():
    """module name -> parsed file, for every .py file of the project outside tests/ and tools/."""
    mods = {}
    for folder, subdirs, files in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if d not in ("tests", "tools", "runs", "docs") and not d.startswith(".")]
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                mods[name] = ast.parse(open(path).read(), path)
    return mods


def definitions(mods):
    """(module, qualified name) -> node for top-level functions and classes and the methods of classes."""
    defs = {}
    for mod, tree in mods.items():
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defs[(mod, node.name)] = node
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, ast.FunctionDef):
                        defs[(mod, f"{node.name}.{sub.name}")] = sub
    return defs


def imports(tree, mods):
    """local name -> module (for `import m`) or (module, name) (for `from m import name`)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in mods:
                    names[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module in mods:
            for a in node.names:
                names[a.asname or a.name] = (node.module, a.name)
    return names


def reach(start_mod, start_name, mods, defs, stop=()):
    seen, todo = set(), [(start_mod, start_name)]
    imported = {m: imports(t, mods) for m, t in mods.items()}
    while todo:
        key = todo.pop()
        if key in seen or key not in defs or key[0] in stop:
            continue
        seen.add(key)
        mod, qual = key
        node = defs[key]
        cls = qual.split(".")[0] if "." in qual else None
        if isinstance(node, ast.ClassDef):  # a class used: its methods are read
            todo += [(mod, f"{node.name}.{s.name}") for s in node.body if isinstance(s, ast.FunctionDef)]
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name):
                target = imported[mod].get(sub.id)
                if isinstance(target, tuple):
                    todo.append(target)
                elif (mod, sub.id) in defs:
                    todo.append((mod, sub.id))
            elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name):
                base = sub.value.id
                if base == "self" and cls:
                    todo.append((mod, f"{cls}.{sub.attr}"))
                elif isinstance(imported[mod].get(base), str):
                    todo.append((imported[mod][base], sub.attr))
                elif (mod, base) in defs and isinstance(defs[(mod, base)], ast.ClassDef):
                    todo.append((mod, f"{base}.{sub.attr}"))
    return seen


def span(node):
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    return node.end_lineno - first + 1


def main():
    if len(sys.argv) < 2 or ":" not in sys.argv[1]:
        sys.exit(__doc__)
    path, name = sys.argv[1].split(":")
    path = os.path.normpath(path)
    mods = project_modules()
    defs = definitions(mods)
    start = (path[:-3].replace("/", "."), name)
    if start not in defs:
        sys.exit(f"reach.py: no definition {name} in {path}")
    stop = [sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--stop"]
    unknown = [m for m in stop if m not in mods or m == start[0]]
    if unknown:
        sys.exit(f"reach.py: --stop {' '.join(unknown)}: not a project module other than the start's "
                 f"({', '.join(sorted(mods))})")
    seen = reach(*start, mods, defs, stop)
    # a method inside a reached class is counted once: the class's span holds it
    classes = {(m, q) for m, q in seen if isinstance(defs[(m, q)], ast.ClassDef)}
    counted = [k for k in seen if not ("." in k[1] and (k[0], k[1].split(".")[0]) in classes)]
    lines = sum(span(defs[k]) for k in counted)
    files = sorted({m for m, _ in seen})
    print(f"{sys.argv[1]}: {len(seen)} definitions, {lines} lines, {len(files)} files ({', '.join(files)})")
    if "--list" in sys.argv:
        for m, q in sorted(seen, key=lambda k: (k[0], defs[k].lineno)):
            print(f"  {m.replace('.', '/')}.py:{defs[(m, q)].lineno} {q} ({span(defs[(m, q)])} lines)")


if __name__ == "__main__":
    main()
