"""The real relay binary, as the tests run it, and the package README's TOML."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parent.parent
REPO = PACKAGE.parent
README = PACKAGE / "README.md"


def relay_binary() -> Path:
    """$OUTBOX_RELAY_BIN, else the debug build `cargo test` leaves (built here if missing)."""
    if os.environ.get("OUTBOX_RELAY_BIN"):
        return Path(os.environ["OUTBOX_RELAY_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    binary = target / "debug" / "outbox-relay"
    if not binary.exists():
        subprocess.run(["cargo", "build", "--locked", "--bin", "outbox-relay"], cwd=REPO, check=True)
    return binary


def run(binary: Path, config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_RELAY") and k != "DATABASE_URL"}
    result = subprocess.run(
        [str(binary), "--config", str(config), *args], capture_output=True, text=True, env=env, timeout=60
    )
    if check and result.returncode != 0:
        raise AssertionError(f"outbox-relay {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def readme_blocks(lang: str) -> list[str]:
    """The package README's fenced code blocks of one language, in order."""
    text = README.read_text()
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def readme_relay_toml() -> dict[str, Any]:
    """Every TOML block of the package README, merged: the route and the channels."""
    merged: dict[str, Any] = {}
    for block in readme_blocks("toml"):
        for key, value in tomllib.loads(block).items():
            if isinstance(value, list):
                merged.setdefault(key, []).extend(value)
            elif isinstance(value, dict):
                merged.setdefault(key, {}).update(value)
            else:
                merged[key] = value
    return merged


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, str):
        # A JSON string without \u-escapes of non-ASCII is a valid TOML basic string.
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(doc: dict[str, Any]) -> str:
    """Enough TOML for a relay config: tables of scalars, tables of tables, arrays of tables."""
    out: list[str] = []

    def table(path: str, body: dict[str, Any]) -> None:
        scalars = {k: v for k, v in body.items() if not isinstance(v, dict)}
        out.append(f"[{path}]")
        out.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
        for k, v in body.items():
            if isinstance(v, dict):
                table(f"{path}.{k}", v)

    for key, value in doc.items():
        if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            for item in value:
                out.append(f"[[{key}]]")
                out.extend(f"{k} = {_toml_value(v)}" for k, v in item.items())
        elif isinstance(value, dict):
            table(key, value)
        else:
            raise TypeError(f"top-level {key!r} must be a table")
    return "\n".join(out) + "\n"


def minimal_config(url: str, slot: str) -> dict[str, Any]:
    """The package README's route with the log provider everywhere: enough for migrate and setup."""
    readme = readme_relay_toml()
    return {
        "source": {"database_url": url, "slot": slot, "publication": slot},
        "routes": readme["routes"],
        "channels": {name: {"provider": "log"} for name in readme["channels"]},
        "metrics": {"listen": ""},
    }
