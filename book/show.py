"""`show`: the source of the code that actually runs, in the notebook, so the code a reader studies is the code
that ran.

    show(ops.rms_norm)                              # a function or class of refimpl, kernels or book
    show(ops.rms_norm, part="inv_rms")              # only the lines from the first one naming `inv_rms` ...
    show("kernels/rms_norm.cu", part="rms_norm")    # a CUDA C file, or one __global__ kernel of it

A function swapped in by `kernels.use` is unwrapped to the kernel it counts, so under a swap `show` shows the
kernel. In a notebook the code appears highlighted (Markdown with a fenced block); elsewhere it is printed.
Either way the source text is returned.

Does not include: code that is not in a file (a lambda typed in a cell shows its own line only).
"""

from __future__ import annotations

import inspect
import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cuda_kernel(source: str, name: str, where: str) -> str:
    """The text of `__global__ ... name(...) { ... }` in `source`, braces matched."""
    match = re.search(rf"(?:template\s*<[^>]*>\s*)?(?:extern \"C\"\s*)?__global__[^;{{]*?\b{re.escape(name)}\s*\(",
                      source)
    if match is None:
        kernels = re.findall(r"__global__[^;{(]*?\b(\w+)\s*\(", source)
        raise ValueError(f"show: {where} has no __global__ kernel named {name!r}; it has {', '.join(kernels)}")
    depth, start = 0, source.index("{", match.end())
    for i in range(start, len(source)):
        depth += {"{": 1, "}": -1}.get(source[i], 0)
        if depth == 0:
            line_start = source.rfind("\n", 0, match.start()) + 1
            return source[line_start:i + 1]
    raise ValueError(f"show: the kernel {name!r} in {where} has unbalanced braces")


def _python_part(source: str, part: str, where: str) -> str:
    """From the first line that names `part` to the end of that line's block (its indentation closing)."""
    lines = source.splitlines()
    first = next((i for i, line in enumerate(lines) if re.search(rf"\b{re.escape(part)}\b", line)), None)
    if first is None:
        raise ValueError(f"show: {where} never mentions {part!r}")
    indent = len(lines[first]) - len(lines[first].lstrip())
    end = first + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
        end += 1
    return "\n".join(lines[first:end]).rstrip()


def source_of(obj, part: str | None = None) -> tuple[str, str, str]:
    """(source text, where it lives, language) of `obj`: a function, class or module, or a path to a .cu or .py file
    (relative to the repository). `part` narrows it to one CUDA kernel, or to the block that names it."""
    if isinstance(obj, (str, Path)):
        path = Path(obj) if Path(obj).is_absolute() else ROOT / obj
        if not path.is_file():
            raise ValueError(f"show: no file {obj!r} (paths are relative to {ROOT})")
        text, where = path.read_text(), str(path.relative_to(ROOT))
        language = "cuda" if path.suffix in (".cu", ".cuh") else "python"
    else:
        obj = inspect.unwrap(obj)                      # a kernel swapped in by kernels.use: show the kernel
        try:
            text = textwrap.dedent(inspect.getsource(obj))
            path = Path(inspect.getsourcefile(obj)).resolve()
        except (TypeError, OSError) as err:
            raise ValueError(f"show: no source for {obj!r} ({err})") from None
        line = inspect.getsourcelines(obj)[1]
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}"
        language = "python"
    if part is not None:
        text = _cuda_kernel(text, part, where) if language == "cuda" else _python_part(text, part, where)
        where += f" ({part})"
    return text.rstrip() + "\n", where, language


def display_markdown(markdown: str, plain: str | None = None) -> None:
    """Show `markdown` rendered in a notebook; print `plain` (default: the Markdown itself) anywhere else."""
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
        shell = get_ipython()
    except ImportError:
        shell = None
    if shell is not None and shell.__class__.__name__ != "TerminalInteractiveShell":
        display(Markdown(markdown))
    else:
        print(markdown if plain is None else plain)


def show(obj, part: str | None = None) -> str:
    """Display the source of `obj` (see the module docstring) and return it."""
    text, where, language = source_of(obj, part)
    display_markdown(f"`{where}`\n\n```{language}\n{text}```", plain=f"# {where}\n{text}")
    return text
