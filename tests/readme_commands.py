"""The command blocks of README.md, parsed for tests/test_readme.py.

A block is a fenced ```bash or ```python code block (indented fences, as in a list item, count
too). A bash block is a list of commands: `\\` continuation lines are joined, comment lines and
trailing `# ...` comments dropped, and `&&` chains split into one command each; leading
`NAME=value` words are the command's environment. Any other shell syntax (pipes, `;`, redirection,
substitution) is refused, so that a README command is never half understood.
"""

from __future__ import annotations

import dataclasses
import re
import shlex

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SHELL_OPERATORS = {"|", "||", ";", "&", ">", ">>", "<", "2>", "2>&1", "&>", "$(", "`"}


@dataclasses.dataclass(frozen=True)
class Command:
    text: str  # the command as one line: its words (unquoted) joined by single spaces
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Block:
    index: int  # 0-based, counting the bash and python blocks of the README in order
    lang: str  # "bash" or "python"
    line: int  # 1-based line of the opening fence in README.md
    code: str
    commands: tuple[Command, ...] = ()  # bash blocks only

    @property
    def id(self) -> str:
        if self.lang == "python":  # its first line past the imports
            lines = [l for l in self.code.splitlines() if l.strip()]
            first = next((l for l in lines if not l.startswith(("import ", "from "))), lines[0])
        else:
            first = self.commands[0].text
        if self.lang == "bash" and self.commands and self.commands[0].argv[0] == "pip":
            first = next((c.text for c in self.commands if c.argv[0] != "pip"), first)
        first = re.sub(r"^python3? (-m )?", "", first.split("  #")[0])
        slug = re.sub(r"[^A-Za-z0-9_.:,-]+", "_", first)[:60].strip("_")
        return f"{self.index:02d}-{self.lang}-{slug}"


def blocks(readme: str) -> list[Block]:
    """The bash and python blocks of a README's text, in order."""
    found, lines, i = [], readme.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, lang, start = opening["indent"], opening["lang"], i
        body = []
        i += 1
        while i < len(lines) and not (FENCE.match(lines[i])
                                      and not FENCE.match(lines[i])["lang"]):
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1  # the closing fence
        if lang in ("bash", "sh", "shell", "console"):
            lang = "bash"
        if lang not in ("bash", "python"):
            continue
        code = "\n".join(body) + "\n"
        commands = tuple(split_commands(code)) if lang == "bash" else ()
        found.append(Block(len(found), lang, start + 1, code, commands))
    return found


def split_commands(code: str) -> list[Command]:
    """The commands of a bash block's code (see the module docstring)."""
    joined, current = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    if current:
        joined.append(current)
    commands = []
    for line in joined:
        if not line.strip() or line.strip().startswith("#"):
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>()`")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words = list(lexer)
        for part in _split_on(words, "&&"):
            commands.append(_command(part, line))
    return commands


def _split_on(words: list[str], separator: str) -> list[list[str]]:
    parts, current = [], []
    for word in words:
        if word == separator:
            parts.append(current)
            current = []
        else:
            current.append(word)
    parts.append(current)
    return parts


def _command(words: list[str], line: str) -> Command:
    if not words:
        raise ValueError(f"an empty command in the README line {line!r}")
    for word in words:
        if word in SHELL_OPERATORS or set(word) <= set(";&|<>()`"):
            raise ValueError(f"shell operator {word!r} in the README line {line!r}: "
                             f"tests/readme_commands.py runs plain commands and && chains only")
    env = []
    while words and ASSIGNMENT.match(words[0]):
        name, _, value = words[0].partition("=")
        env.append((name, value))
        words = words[1:]
    if not words:
        raise ValueError(f"only assignments in the README line {line!r}")
    text = " ".join([f"{k}={v}" for k, v in env] + words)
    return Command(text, tuple(words), tuple(env))
