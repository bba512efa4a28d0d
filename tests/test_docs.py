"""The front door stays true: every relative link in README.md, docs/ and launch/ resolves (file and heading), every
`python -m mmdiff_jax...` command shown in a code block names a module, configs, presets, flags and config fields
that exist (parsed, not run), and docs/configs.md is what `python -m mmdiff_jax.config_reference` generates."""

from __future__ import annotations

import glob
import os
import re
import shlex

import pytest

from mmdiff_jax import cli, config_reference, configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(REPO, "README.md"), os.path.join(REPO, "launch", "README.md")] + sorted(
    glob.glob(os.path.join(REPO, "docs", "*.md")))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: str) -> set[str]:
    with open(path) as f:
        return {_slug(line.lstrip("#")) for line in f if line.startswith("#")}


def test_every_relative_link_resolves():
    broken = []
    for doc in DOCS:
        with open(doc) as f:
            text = f.read()
        for target in LINK.findall(text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file_part, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(os.path.dirname(doc), file_part)) if file_part else doc
            if not os.path.exists(path):
                broken.append(f"{os.path.relpath(doc, REPO)}: {target} (no such file)")
            elif anchor and path.endswith(".md") and anchor not in _anchors(path):
                broken.append(f"{os.path.relpath(doc, REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def _commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `python -m`) of every command in an indented or fenced code block."""
    found = []
    for doc in DOCS:
        with open(doc) as f:
            lines = f.read().splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            if line.startswith("    ") and "python -m mmdiff_jax" in line:
                start = i
                text = line
                while text.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    text = text.rstrip()[:-1] + " " + lines[i].strip()
                text = text.split("  #")[0]  # a trailing comment
                words = shlex.split(text, comments=False)
                at = words.index("-m")
                found.append((f"{os.path.relpath(doc, REPO)}:{start + 1}", words[at + 1:]))
            i += 1
    return found


COMMANDS = _commands()


def _flags_of(module: str) -> set[str]:
    """The flags a module defines (absl DEFINE_* or argparse add_argument), with --noX for absl booleans."""
    path = os.path.join(REPO, *module.split(".")) + ".py"
    with open(path) as f:
        source = f.read()
    names = set(re.findall(r"DEFINE_(?:\w+)\(\s*\"(\w+)\"", source))
    names |= {f"no{n}" for n in re.findall(r"DEFINE_bool\(\s*\"(\w+)\"", source)}
    names |= set(re.findall(r"add_argument\(\s*\"--(\w+)\"", source))
    return names | {"help", "helpfull"}


def _has_field(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return False
    return True


def test_the_docs_show_commands():
    assert len(COMMANDS) > 30, COMMANDS  # the parser below finds them


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_every_shown_command_names_what_exists(where, argv):
    module = argv[0]
    assert os.path.exists(os.path.join(REPO, *module.split(".")) + ".py"), f"{where}: no module {module}"
    known = _flags_of(module)
    config = None
    args = argv[1:]
    for k, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        name, _, value = arg[2:].partition("=")
        if name == "config":
            spec = value or args[k + 1]
            config = _load_config(cli.resolve_config(spec))  # raises on a bad name or preset
        elif name.startswith("config."):
            assert config is not None or module == "mmdiff_jax.bench", f"{where}: {arg} before --config"
            base = config if config is not None else _load_config(configs.path("digits_image_label"))
            assert _has_field(base, name[len("config."):]), f"{where}: no config field {name}"
        else:
            assert name in known, f"{where}: {module} has no flag --{name} (it has {sorted(known)})"


def _load_config(resolved: str):
    """The config of `FILE[:PRESET]` (as `cli.resolve_config` returns it)."""
    config_file, _, preset = resolved.partition(":")
    module_ns = {}
    with open(config_file) as f:
        exec(compile(f.read(), config_file, "exec"), module_ns)  # noqa: S102 - our own shipped configs
    return module_ns["get_config"](preset) if preset else module_ns["get_config"]()


def test_config_reference_is_current():
    with open(os.path.join(REPO, "docs", "configs.md")) as f:
        on_disk = f.read()
    assert on_disk == config_reference.render(), (
        "docs/configs.md is stale: run `python -m mmdiff_jax.config_reference > docs/configs.md`")


def test_config_reference_explains_every_field():
    rows = [line for line in config_reference.render().splitlines() if line.startswith("| `") and "." in line[:40]]
    unexplained = [row.split("|")[1].strip() for row in rows if row.rstrip().endswith("|  |")]
    assert not unexplained, unexplained
